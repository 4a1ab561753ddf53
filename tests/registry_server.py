"""A real Docker registry on 127.0.0.1 for tests: Debian's docker-registry (the CNCF distribution server), its storage
in a tmp dir. Docker trusts 127.0.0.0/8 as an insecure registry by default, so it speaks plain HTTP, no TLS.

    reg = start_registry(tmp_dir)    # reg.host: "127.0.0.1:PORT"; reg.digest("team/name", "tag"): what it serves
    reg.stop()

A team's registry keeps the layers of its earlier pushes, and a push sends only the layers it lacks. `seed_layers` gives
one repository of a new registry the layers that `keep_layers` kept from the same repository in an earlier test run (a
machine-wide cache beside Inductor's in the temp dir): no image, tag or manifest, only layer blobs and the repository's
links to them. Docker asks the registry for each layer it knows a digest of (from its own record of earlier pushes) and
sends none that the registry has, so it compresses none of them again. An empty cache is an empty registry.
"""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from sshd import free_port

BINARY = "/usr/bin/docker-registry"
LAYER_CACHE = Path(tempfile.gettempdir()) / f"nanogpt-test-registry-layers-{getpass.getuser()}"
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


def _layer_links(storage: Path, repo: str) -> Path:
    return storage / "docker" / "registry" / "v2" / "repositories" / repo / "_layers" / "sha256"


def _link_or_copy(src: Path, dst: Path) -> None:
    """A blob never changes once written (the registry moves a finished upload into place), so a hard link shares it."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copyfile(src, dst)


def seed_layers(reg: Registry, repo: str, cache: Path = LAYER_CACHE) -> int:
    """Give `repo` the layer blobs kept in `cache` (see the module's docstring); returns how many."""
    links = _layer_links(cache, repo)
    if not links.is_dir():
        return 0
    count = 0
    for link in links.glob("*/link"):
        digest = link.read_text()
        blob = cache / reg.blob_path(digest).relative_to(reg.root)
        if not blob.is_file():
            continue
        _link_or_copy(blob, reg.blob_path(digest))
        mine = _layer_links(reg.root, repo) / link.parent.name / "link"
        mine.parent.mkdir(parents=True, exist_ok=True)
        mine.write_text(digest)
        count += 1
    return count


def keep_layers(reg: Registry, repo: str, cache: Path = LAYER_CACHE) -> None:
    """Replace what `cache` keeps with the blobs `repo` links to now; a cache that cannot be written is left as it was."""
    new = cache.with_name(f"{cache.name}.new-{os.getpid()}")
    old = cache.with_name(f"{cache.name}.old-{os.getpid()}")
    for left in [*cache.parent.glob(f"{cache.name}.new-*"), *cache.parent.glob(f"{cache.name}.old-*")]:  # a killed run's
        pid = left.name.rpartition("-")[2]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(left, ignore_errors=True)
    try:
        for link in _layer_links(reg.root, repo).glob("*/link"):
            digest = link.read_text()
            if reg.blob_path(digest).is_file():
                _link_or_copy(reg.blob_path(digest), new / reg.blob_path(digest).relative_to(reg.root))
                kept = _layer_links(new, repo) / link.parent.name / "link"
                kept.parent.mkdir(parents=True, exist_ok=True)
                kept.write_text(digest)
        if cache.exists():
            cache.rename(old)
        new.rename(cache)
    except OSError:
        pass
    finally:
        shutil.rmtree(new, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
