#!/usr/bin/env bash
# Build the local stand-in for the CUDA base image, for tests: Debian bookworm (Python 3.11, which the
# CPU torch wheel targets) made with debootstrap and imported into Docker. No registry is reachable from
# the test machines, so nothing can be pulled. Skips the work if the image already exists (cached between
# runs on the same machine, and rebuilt when VERSION below changes).
#
# Test-only, never in the real docker/Dockerfile:
# - the host's CA bundle (TLS to PyPI is intercepted on these machines);
# - OMP_NUM_THREADS=1, inherited by the trainer images built on it: the tests' containers share two cores with the
#   pytest workers (each on one thread too), and torch's OpenMP threads spin while they wait for a core, so a
#   container on every core burns several times the CPU of its work. A real box's trainer uses its cores.
set -euo pipefail
IMAGE=${1:-nanogpt-test-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
VERSION=2  # raise it with any change to what goes into the image

if [ "$(docker image inspect --format '{{index .Config.Labels "nanogpt.test-base"}}' "$IMAGE" 2>/dev/null)" = "$VERSION" ]; then
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
  --change 'ENV OMP_NUM_THREADS=1' \
  --change "LABEL nanogpt.test-base=$VERSION" \
  - "$IMAGE" >/dev/null
echo "built test base image $IMAGE"
