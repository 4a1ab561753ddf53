"""Get the trainer image onto the box, the cheapest way that fits.

- default: send the image's source (a few hundred KB: what .dockerignore lets into the build) and `docker build`
  there, where the cloud network pulls the CUDA base and PyTorch fast; nothing big leaves the laptop.
- `--image REGISTRY/NAME:TAG`: `docker pull` on the box.
- `--ship`: `docker save` here streamed into `docker load` there, for an image built locally or an offline box.

Each path is skipped when the box already has the same image: the source build is tagged with the hash of
the exact build context, a shipped image is compared by image id, and `docker pull` checks by digest itself.
"""

from __future__ import annotations

import hashlib
import io
import shlex
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from infra.ssh import run, stream
from job import contract
from job.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
ALWAYS = ("docker/Dockerfile", ".dockerignore")  # docker reads these even though .dockerignore excludes them


def context_files(root: Path = ROOT, extra_wheels: str | None = None) -> list[tuple[str, Path]]:
    """(name in the archive, file) for the build context: the paths .dockerignore allows in, so the box builds
    from exactly what `make build-image` would send; .dockerignore is the one list of what the image needs."""
    allowed = [line[1:].strip().rstrip("/") for line in (root / ".dockerignore").read_text().splitlines() if line.startswith("!")]
    files: dict[str, Path] = {name: root / name for name in ALWAYS}
    for entry in allowed:
        p = root / entry
        for f in ([p] if p.is_file() else sorted(p.rglob("*")) if p.is_dir() else []):
            if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc":
                files[f.relative_to(root).as_posix()] = f
    if extra_wheels:
        wheels = sorted(Path(extra_wheels).expanduser().glob("*.whl"))
        if not wheels:
            raise UserError(f"no .whl files in {extra_wheels}: --wheels takes a directory of wheels to install in the image")
        files.update({f"docker/wheels/{w.name}": w for w in wheels})
    return sorted(files.items())


def write_context(files: list[tuple[str, Path]], out) -> str:
    """A reproducible tar (sorted, no times or owners) so that the same source always has the same hash."""
    h = hashlib.sha256()

    class Hashing(io.RawIOBase):
        def writable(self):
            return True

        def write(self, b):
            h.update(b)
            return out.write(b)

    with tarfile.open(fileobj=Hashing(), mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name, path in files:
            info = tarfile.TarInfo(name)
            info.size = path.stat().st_size
            info.mode = 0o755 if path.stat().st_mode & 0o100 else 0o644
            with open(path, "rb") as f:
                tar.addfile(info, f)
    return h.hexdigest()


def image_id(conn, docker: str, ref: str) -> str | None:
    res = run(conn, f"{docker} image inspect --format '{{{{.Id}}}}' {shlex.quote(ref)}", warn=True)
    return res.stdout.strip() if res.ok else None


def _chunks(f, size: int = 1 << 20, progress=None):
    while chunk := f.read(size):
        if progress:
            progress(len(chunk))
        yield chunk


def build_on_box(conn, docker: str, *, name: str = contract.IMAGE_NAME, build_args: dict[str, str] | None = None,
                 wheels: str | None = None, out=sys.stdout) -> str:
    files = context_files(extra_wheels=wheels)
    with tempfile.TemporaryFile() as tmp:
        digest = write_context(files, tmp)
        tag = f"{name}:src-{digest[:12]}"
        if image_id(conn, docker, tag):
            out.write(f"image {tag} is already on {conn.host} (same source): not rebuilding\n")
            return tag
        size = tmp.tell()
        tmp.seek(0)
        out.write(f"sending the image source to {conn.host} ({size / 2**20:.1f} MiB) and building {tag} there\n")
        remote = f".cache/nanogpt/build/src-{digest[:12]}"
        q = shlex.quote(remote)
        if stream(conn, f"rm -rf {q} && mkdir -p {q} && tar -xf - -C {q}", out=out, stdin_chunks=_chunks(tmp)) != 0:
            raise UserError(f"could not unpack the build context on {conn.host} (disk full?): check `df -h ~` there")
    args = {"WORKDIR": contract.WORKDIR, "LOG_DIR": contract.LOG_DIR, "PERSISTENT": contract.PERSISTENT, **(build_args or {})}
    flags = " ".join(f"--build-arg {shlex.quote(f'{k}={v}')}" for k, v in args.items())
    cmd = f"{docker} build -f {q}/docker/Dockerfile {flags} -t {shlex.quote(tag)} -t {shlex.quote(name)}:latest {q}"
    status = stream(conn, f"{cmd} 2>&1; rc=$?; rm -rf {q}; exit $rc", out=out)
    if status != 0:
        raise UserError(f"docker build failed on {conn.host} (exit {status}): the build log is above")
    return tag


def pull_on_box(conn, docker: str, image: str, out=sys.stdout) -> str:
    if stream(conn, f"{docker} pull {shlex.quote(image)} 2>&1", out=out) != 0:
        raise UserError(f"docker pull {image} failed on {conn.host}: check the name and tag, and for a private registry run "
                        f"`docker login REGISTRY` on the box")
    return image


def ship_to_box(conn, docker: str, image: str, out=sys.stdout, local_docker: str = "docker") -> str:
    try:
        local = subprocess.run([local_docker, "image", "inspect", "--format", "{{.Id}}", image], capture_output=True, text=True)
    except FileNotFoundError:
        raise UserError("--ship needs Docker on this machine to `docker save` the image: install it, or build on the box (no --ship)") from None
    if local.returncode != 0:
        raise UserError(f"no image {image} on this machine to ship: build it with `make build-image` or name another with --image")
    if image_id(conn, docker, image) == local.stdout.strip():
        out.write(f"{conn.host} already has {image} ({local.stdout.strip()[:19]}): not shipping\n")
        return image
    out.write(f"shipping {image} to {conn.host} (docker save | docker load)\n")
    save = subprocess.Popen([local_docker, "save", image], stdout=subprocess.PIPE)
    sent = [0]

    def progress(n):
        sent[0] += n
        if sent[0] // (256 << 20) != (sent[0] - n) // (256 << 20):
            out.write(f"  sent {sent[0] / 2**20:,.0f} MiB\n")
            out.flush()

    try:
        status = stream(conn, f"{docker} load 2>&1", out=out, stdin_chunks=_chunks(save.stdout, progress=progress))
    finally:
        save.stdout.close()
        save.wait()
    if save.returncode != 0 or status != 0:
        raise UserError(f"shipping {image} to {conn.host} failed (docker save exit {save.returncode}, docker load exit {status}): "
                        "check disk space on both sides")
    return image


def ensure_image(conn, docker: str, *, image: str | None = None, ship: bool = False, build_args: dict[str, str] | None = None,
                 wheels: str | None = None, out=sys.stdout) -> str:
    """Make the image available on the box and return the reference to run."""
    if ship:
        return ship_to_box(conn, docker, image or f"{contract.IMAGE_NAME}:latest", out=out)
    if image:
        return pull_on_box(conn, docker, image, out=out)
    return build_on_box(conn, docker, build_args=build_args, wheels=wheels, out=out)
