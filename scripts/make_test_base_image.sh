#!/usr/bin/env bash
# Build the local stand-in for the CUDA base image, for tests: Debian bookworm (Python 3.11, which the
# CPU torch wheel targets) made with debootstrap and imported into Docker. No registry is reachable from
# the test machines, so nothing can be pulled. Skips the work if the image already exists (cached between
# runs on the same machine).
#
# Test-only: the host's CA bundle goes into this image (TLS to PyPI is intercepted on these machines);
# the real docker/Dockerfile never carries it.
set -euo pipefail
IMAGE=${1:-nanogpt-test-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "test base image $IMAGE already present"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "error: debootstrap is not installed: apt-get install -y debootstrap" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "error: debootstrap needs root to build the test base image" >&2; exit 1; }

ca=$(python3 -m pip config get global.cert 2>/dev/null || true)
[ -f "$ca" ] || ca=/etc/ssl/certs/ca-certificates.crt
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$work/rootfs" "$MIRROR" >"$work/log" 2>&1 \
  || { tail -20 "$work/log" >&2; echo "error: debootstrap failed (see above)" >&2; exit 1; }
cp "$ca" "$work/rootfs/etc/ssl/certs/host-ca-bundle.crt"
tar -C "$work/rootfs" -c . | docker import \
  --change 'ENV PIP_CERT=/etc/ssl/certs/host-ca-bundle.crt' \
  --change 'ENV REQUESTS_CA_BUNDLE=/etc/ssl/certs/host-ca-bundle.crt' \
  --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/host-ca-bundle.crt' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  - "$IMAGE" >/dev/null
echo "built test base image $IMAGE"
