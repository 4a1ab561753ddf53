"""Get the trainer image onto the box, the cheapest way that fits.

- default: send the image's source (a few hundred KB: what .dockerignore lets into the build) and `docker build`
  there, where the cloud network pulls the CUDA base and PyTorch fast; nothing big leaves the laptop.
- `--image REGISTRY/NAME:TAG`: `docker pull` on the box.
- `--ship`: `docker save` here streamed into `docker load` there, for an image built locally or an offline box.

Each path is skipped when the box already has the same image: the source build is tagged with the hash of
the exact build context and build args, a shipped image is compared by image id, and `docker pull` checks by
digest itself.

Every path is for one CUDA flavour of the pinned torch (infra/flavour.py), the newest the box's driver runs: the
build gets the flavour's base image and wheel index and has the flavour in its tag (nanogpt-train:src-HASH-cu128);
`--image REGISTRY/NAME:{flavour}` pulls the tag of that flavour; `--ship` sends NAME:<flavour> as
`make build-image CUDA=...` tags it.
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

from infra.flavour import DEFAULT, Flavour
from infra.ssh import run, stream
from job import contract
from job.errors import UserError
from job.identity import git_commit

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


class _Discard(io.RawIOBase):
    """Where the context goes when only its hash and size are wanted (a dry run)."""

    size = 0

    def writable(self):
        return True

    def write(self, b):
        self.size += len(b)
        return len(b)


def build_args_for(flavour: Flavour, build_args: dict[str, str] | None = None) -> dict[str, str]:
    """The container contract, then the flavour's base image and wheel index; --build-arg given by hand wins. The
    commit of this checkout goes in too, for the runs' identity (job/identity.py): a new commit is a new image tag."""
    commit = {"GIT_COMMIT": c} if (c := git_commit()[0]) else {}
    return {"WORKDIR": contract.WORKDIR, "LOG_DIR": contract.LOG_DIR, "PERSISTENT": contract.PERSISTENT, **commit,
            **flavour.build_args(), **(build_args or {})}


def source_tag(context_digest: str, args: dict[str, str], flavour: Flavour, name: str = contract.IMAGE_NAME) -> str:
    """The same source built with the same args is the same image: the tag says so, and which flavour it is."""
    h = hashlib.sha256(context_digest.encode())
    for k in sorted(args):
        h.update(f"\0{k}={args[k]}".encode())
    return f"{name}:src-{h.hexdigest()[:12]}-{flavour.name}"


def build_command(docker: str, tag: str, args: dict[str, str], context: str, name: str = contract.IMAGE_NAME) -> str:
    flags = " ".join(f"--build-arg {shlex.quote(f'{k}={v}')}" for k, v in args.items())
    return f"{docker} build -f {context}/docker/Dockerfile {flags} -t {shlex.quote(tag)} -t {shlex.quote(name)}:latest {context}"


def build_on_box(conn, docker: str, *, flavour: Flavour = DEFAULT, name: str = contract.IMAGE_NAME,
                 build_args: dict[str, str] | None = None, wheels: str | None = None, out=sys.stdout) -> str:
    files = context_files(extra_wheels=wheels)
    args = build_args_for(flavour, build_args)
    with tempfile.TemporaryFile() as tmp:
        digest = write_context(files, tmp)
        tag = source_tag(digest, args, flavour, name)
        if image_id(conn, docker, tag):
            out.write(f"image {tag} is already on {conn.host} (same source): not rebuilding\n")
            return tag
        size = tmp.tell()
        tmp.seek(0)
        out.write(f"sending the image source to {conn.host} ({size / 2**20:.1f} MiB) and building {tag} there "
                  f"(CUDA {flavour.cuda_text}, {args['BASE_IMAGE']})\n")
        remote = f".cache/nanogpt/build/src-{digest[:12]}"
        q = shlex.quote(remote)
        if stream(conn, f"rm -rf {q} && mkdir -p {q} && tar -xf - -C {q}", out=out, stdin_chunks=_chunks(tmp)) != 0:
            raise UserError(f"could not unpack the build context on {conn.host} (disk full?): check `df -h ~` there")
    status = stream(conn, f"{build_command(docker, tag, args, q, name)} 2>&1; rc=$?; rm -rf {q}; exit $rc", out=out)
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


def pull_ref(image: str, flavour: Flavour) -> str:
    """--image with `{flavour}` in it names one tag per flavour: ghcr.io/you/nanogpt-train:{flavour} -> ...:cu128."""
    return image.replace("{flavour}", flavour.name)


def ship_ref(image: str | None, flavour: Flavour) -> str:
    return pull_ref(image, flavour) if image else f"{contract.IMAGE_NAME}:{flavour.name}"


def ensure_image(conn, docker: str, *, flavour: Flavour = DEFAULT, image: str | None = None, ship: bool = False,
                 build_args: dict[str, str] | None = None, wheels: str | None = None, out=sys.stdout) -> str:
    """Make the image available on the box and return the reference to run."""
    if ship:
        return ship_to_box(conn, docker, ship_ref(image, flavour), out=out)
    if image:
        return pull_on_box(conn, docker, pull_ref(image, flavour), out=out)
    return build_on_box(conn, docker, flavour=flavour, build_args=build_args, wheels=wheels, out=out)


def plan_image(conn, docker: str, *, flavour: Flavour = DEFAULT, image: str | None = None, ship: bool = False,
               build_args: dict[str, str] | None = None, wheels: str | None = None) -> tuple[str, list[str]]:
    """(the image reference, what ensure_image would do to have it), found by looking only (`docker image inspect`)."""
    head = f"image: CUDA flavour {flavour.name} (CUDA {flavour.cuda_text})"
    if ship:
        ref = ship_ref(image, flavour)
        there = "already on the box, nothing to send" if image_id(conn, docker, ref) else "docker save here | docker load there"
        return ref, [f"{head}: ship {ref} from this machine ({there})"]
    if image:
        ref = pull_ref(image, flavour)
        return ref, [f"{head}: docker pull {ref} on the box" + ("" if "{flavour}" in image else
                " (a tag of another flavour fails at docker run: --image NAME:{flavour} picks the tag per flavour)")]
    args = build_args_for(flavour, build_args)
    sink = _Discard()
    tag = source_tag(write_context(context_files(extra_wheels=wheels), sink), args, flavour)
    if image_id(conn, docker, tag):
        return tag, [f"{head}: {tag} is already on the box (same source and build args): no build"]
    return tag, [f"{head}: build {tag} on the box from this source ({sink.size / 2**20:.1f} MiB sent), base {args['BASE_IMAGE']}",
            "  " + build_command(docker, tag, args, "CONTEXT")]
