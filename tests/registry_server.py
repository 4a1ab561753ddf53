"""A real Docker registry on 127.0.0.1 for tests: Debian's docker-registry (the CNCF distribution server), its storage
in a tmp dir. Docker trusts 127.0.0.0/8 as an insecure registry by default, so it speaks plain HTTP, no TLS.

    reg = start_registry(tmp_dir)    # reg.host: "127.0.0.1:PORT"; reg.digest("team/name", "tag"): what it serves
    reg.stop()
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from sshd import free_port

BINARY = "/usr/bin/docker-registry"
SKIP_REASON = "docker-registry is not installed (CI installs it in .ci/run)"
# What docker pushes (a schema 2 manifest) and what a registry serves as a list; HEAD with these gets the digest a
# pull by tag resolves to.
ACCEPT = ", ".join(["application/vnd.docker.distribution.manifest.v2+json", "application/vnd.docker.distribution.manifest.list.v2+json",
                    "application/vnd.oci.image.manifest.v1+json", "application/vnd.oci.image.index.v1+json"])


@dataclass
class Registry:
    port: int
    root: Path  # its storage: docker/registry/v2/{blobs,repositories}
    proc: subprocess.Popen

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def digest(self, repo: str, reference: str) -> str | None:
        """The manifest digest the registry serves for repo:reference (a tag or a digest), or None."""
        req = urllib.request.Request(f"http://{self.host}/v2/{repo}/manifests/{reference}", method="HEAD", headers={"Accept": ACCEPT})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.headers["Docker-Content-Digest"]
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise

    def blob_path(self, digest: str) -> Path:
        """Where the registry keeps a blob (a manifest is one too) on its disk."""
        hexdigest = digest.removeprefix("sha256:")
        return self.root / "docker" / "registry" / "v2" / "blobs" / "sha256" / hexdigest[:2] / hexdigest / "data"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def registry_available() -> bool:
    return os.access(BINARY, os.X_OK)


def start_registry(tmp_dir: Path, timeout: float = 30) -> Registry:
    tmp_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = tmp_dir / "config.yml"
    # No cache of blob descriptors: a test that changes the storage under it sees the change.
    config.write_text(f"version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n"
                      f"    rootdirectory: {tmp_dir / 'storage'}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n")
    log = open(tmp_dir / "registry.log", "wb")
    proc = subprocess.Popen([BINARY, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
    reg = Registry(port, tmp_dir / "storage", proc)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"docker-registry exited ({proc.returncode}): {(tmp_dir / 'registry.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://{reg.host}/v2/", timeout=2) as resp:
                if resp.status == 200:
                    return reg
        except OSError:
            time.sleep(0.1)
    reg.stop()
    raise RuntimeError(f"docker-registry did not answer on {reg.host} within {timeout:g} s")
