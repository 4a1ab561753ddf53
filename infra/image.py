"""Get the trainer image onto the box, the cheapest way that fits.

- default: send the image's source (a few hundred KB: what .dockerignore lets into the build) and `docker build`
  there, where the cloud network pulls the CUDA base and PyTorch fast; nothing big leaves the laptop.
- `--image REGISTRY/NAME[:TAG]` or `REGISTRY/NAME@sha256:DIGEST`: `docker pull` on the box, by digest (infra/registry.py,
  `make push-image`). A pull that fails (registry unreachable, no such tag or digest, another digest than the one
  asked) is one line, and the box builds from source as by default.
- `--ship`: `docker save` here streamed into `docker load` there, for an image built locally or an offline box.

Each path is skipped when the box already has the same image: the source build is tagged with the hash of
the exact build context and build args, a shipped image is compared by image id, and an image asked by digest is
not pulled again (a digest names its content for good; a tag is asked of the registry each time).

Every path is for one CUDA flavour of the pinned torch (infra/flavour.py), the newest the box's driver runs: the
build gets the flavour's base image and wheel index and has the flavour in its tag (nanogpt-train:src-HASH-cu128);
`--image REGISTRY/NAME:TAG` pulls the tag TAG-<flavour> (REGISTRY/NAME alone: the tag <flavour>), as push-image
tags them, and `{flavour}` in --image stands for the flavour's name; `--ship` sends NAME:<flavour> as
`make build-image CUDA=...` tags it. Whatever the path, NAME:latest on the box is the image the launch runs, and only
that: a pull tags it only once the image is the digest asked.
"""

from __future__ import annotations

import hashlib
import io
import json
import shlex
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from infra.flavour import DEFAULT, FLAVOURS, Flavour
from infra.registry import DIGEST, Ref, parse_ref, repo_key
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


def context_digest(wheels: str | None = None) -> tuple[str, int]:
    """(the build context's digest, its size in bytes) for this source and these wheels, sending nothing."""
    sink = _Discard()
    return write_context(context_files(extra_wheels=wheels), sink), sink.size


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


def build_command(docker: str, tag: str, args: dict[str, str], context: str, name: str = contract.IMAGE_NAME, target: str | None = None) -> str:
    # --force-rm: a failed step's container goes too (the classic builder keeps it, exited, on the box).
    flags = " ".join(["--force-rm", *(f"--build-arg {shlex.quote(f'{k}={v}')}" for k, v in args.items())])
    if target:  # a stage of the Dockerfile (the data image): its own tag, never NAME:latest
        return f"{docker} build -f {context}/docker/Dockerfile {flags} --target {target} -t {shlex.quote(tag)} {context}"
    return f"{docker} build -f {context}/docker/Dockerfile {flags} -t {shlex.quote(tag)} -t {shlex.quote(name)}:latest {context}"


@dataclass(frozen=True)
class Image:
    ref: str  # what the containers run: a source tag, a pulled image by digest, a shipped image's name
    how: str  # how it came to the box this time: "built", "pulled", "shipped", or "found" there already


def build_on_box(conn, docker: str, *, flavour: Flavour = DEFAULT, name: str = contract.IMAGE_NAME,
                 build_args: dict[str, str] | None = None, wheels: str | None = None, out=sys.stdout, target: str | None = None) -> Image:
    """The trainer image (or, with target="data", the data image) built on the box from this source, unless the box
    has the same build already."""
    files = context_files(extra_wheels=wheels)
    args = build_args_for(flavour, build_args)
    what = "image" if target is None else f"{target} image"
    with tempfile.TemporaryFile() as tmp:
        digest = write_context(files, tmp)
        tag = source_tag(digest, args, flavour, name) if target is None else data_tag(digest, args, flavour)
        # The data image's build leaves the context on the box for the trainer image's, which follows (.complete: the
        # whole archive arrived); the trainer's build removes it, or, when the trainer image is there already, this.
        q = shlex.quote(f".cache/nanogpt/build/src-{digest[:12]}")
        if image_id(conn, docker, tag):
            out.write(f"{what} {tag} is already on {conn.host} (same source): not rebuilding\n")
            if target is None:
                tag_as_trainer(conn, docker, tag, name)
                run(conn, f"rm -rf {q}", warn=True)
            return Image(tag, "found")
        if run(conn, f"test -e {q}/.complete", warn=True).failed:
            size = tmp.tell()
            tmp.seek(0)
            out.write(f"sending the image source to {conn.host} ({size / 2**20:.1f} MiB)\n")
            if stream(conn, f"rm -rf {q} && mkdir -p {q} && tar -xf - -C {q} && touch {q}/.complete", out=out, stdin_chunks=_chunks(tmp)) != 0:
                raise UserError(f"could not unpack the build context on {conn.host} (disk full?): check `df -h ~` there")
    out.write(f"building {tag} there " + (f"(CUDA {flavour.cuda_text}, {args['BASE_IMAGE']})\n" if target is None else f"first: {DATA_WHY}\n"))
    done = "" if target else f"rm -rf {q}; "
    status = stream(conn, f"{build_command(docker, tag, args, q, name, target)} 2>&1; rc=$?; {done}exit $rc", out=out)
    if status != 0:
        raise UserError(f"docker build failed on {conn.host} (exit {status}): the build log is above")
    return Image(tag, "built")


# The data image: docker/Dockerfile's data stage, job.prepare without torch.
DATA_TARGET = "data"
DATA_WHY = "the data image, job.prepare without torch: the shards are made in it while the trainer image builds"


def data_tag(context_digest: str, args: dict[str, str], flavour: Flavour) -> str:
    """The data image's tag: the trainer's source tag with -data (the same source, args and flavour, another stage)."""
    return source_tag(context_digest, {**args, "--target": DATA_TARGET}, flavour) + "-data"


def build_data_on_box(conn, docker: str, *, flavour: Flavour = DEFAULT, build_args: dict[str, str] | None = None,
                      wheels: str | None = None, out=sys.stdout) -> Image:
    return build_on_box(conn, docker, flavour=flavour, build_args=build_args, wheels=wheels, out=out, target=DATA_TARGET)


def built_tags(flavour: Flavour, build_args: dict[str, str] | None = None, wheels: str | None = None) -> tuple[str, str]:
    """(the trainer image's source tag, the data image's) for this source and these build args, without building."""
    args = build_args_for(flavour, build_args)
    digest, _ = context_digest(wheels)
    return source_tag(digest, args, flavour), data_tag(digest, args, flavour)


def tag_as_trainer(conn, docker: str, ref: str, name: str = contract.IMAGE_NAME) -> None:
    """NAME:latest is the image this launch runs (what `docker run nanogpt-train` by hand on the box gets)."""
    run(conn, f"{docker} tag {shlex.quote(ref)} {shlex.quote(name)}:latest", warn=True)


class PullFailed(Exception):
    """A pull that did not leave the image asked on the box; its reason goes in the one line that says so."""


class _PullOutput(io.TextIOBase):
    """docker pull's output, passed on line by line, except its error: the daemon's (Error response from daemon: ...)
    or, from a pull that failed mid-way, its last line (held back one line for that), kept for the one line that says
    why. Its Digest: line is kept too: the digest the registry served for the reference."""

    def __init__(self, out):
        self.out, self.error, self.digest, self.held = out, None, None, None

    def write(self, text: str) -> int:
        for line in text.splitlines(keepends=True):
            body = line.strip()
            if body.startswith("Digest: ") and DIGEST.fullmatch(body.removeprefix("Digest: ")):
                self.digest = body.removeprefix("Digest: ")
            if body.startswith(("Error", "error")):
                self.error = body
            elif body:
                if self.held is not None:
                    self.out.write(self.held)
                self.held = line
        return len(text)

    def flush(self) -> None:
        self.out.flush()

    def reason(self, failed: bool) -> str | None:
        """After the pull: docker's reason on one line where it failed (the held line is it), else None."""
        last, self.held = self.held, None
        if not failed:
            if last is not None:
                self.out.write(last)
            return None
        reason = self.error or (last.strip() if last else "")
        return " ".join(reason.removeprefix("Error response from daemon:").split())[:300] or None


def repo_digests(conn, docker: str, ref: str) -> list[str]:
    res = run(conn, f"{docker} image inspect --format '{{{{json .RepoDigests}}}}' {shlex.quote(ref)}", warn=True)
    try:
        return list(json.loads(res.stdout)) if res.ok else []
    except (ValueError, TypeError):
        return []


def has_digest(conn, docker: str, pulled: str, name: str, digest: str) -> bool:
    """The image the reference `pulled` names on the box is the registry's `digest` of repository `name`: docker
    records, per repository, the digest it pulled or pushed an image as (RepoDigests)."""
    for entry in repo_digests(conn, docker, pulled):
        repo, _, got = entry.rpartition("@")
        if repo_key(repo) == repo_key(name) and got == digest:
            return True
    return False


def pull_on_box(conn, docker: str, ref: Ref, out=sys.stdout) -> Image:
    """`docker pull` of `ref` on the box, pinned to a digest: the one asked, or for a tag the one the registry serves
    now (the other nodes then pull that digest). Raises PullFailed, having tagged nothing as the trainer image, when
    the pull fails or the image it left is not that digest."""
    if ref.digest and image_id(conn, docker, ref.pinned):  # docker finds NAME@DIGEST only by the digest it recorded
        out.write(f"image {ref.pinned} is already on {conn.host}: not pulling\n")
        tag_as_trainer(conn, docker, ref.pinned)
        return Image(ref.pinned, "found")
    target = ref.pinned if ref.digest else str(ref)
    out.write(f"pulling {target} on {conn.host}\n")
    seen = _PullOutput(out)
    status = stream(conn, f"{docker} pull {shlex.quote(target)} 2>&1", out=seen)
    if (why := seen.reason(failed=status != 0)) is not None or status != 0:
        raise PullFailed(why or f"docker pull exited with {status}")
    digest = ref.digest or seen.digest
    if digest is None:
        raise PullFailed("docker pull named no digest for it")
    if seen.digest and seen.digest != digest:
        raise PullFailed(f"the registry served {seen.digest}, not the digest asked")
    if not has_digest(conn, docker, target, ref.name, digest):
        raise PullFailed(f"the image pulled is not {digest}")
    pinned = Ref(ref.name, digest=digest).pinned
    tag_as_trainer(conn, docker, pinned)
    out.write(f"pulled {pinned} on {conn.host}\n")
    return Image(pinned, "pulled")


def pull_images(nodes, image: str, flavour: Flavour, out=sys.stdout) -> list[Image] | None:
    """--image on every node (conn, docker): node 0 pulls the reference, the others the digest node 0 got, so all
    run the same image. None after one line, when a node's pull failed: then the image is built on the boxes."""
    ref = parse_ref(pull_ref(image, flavour))
    asked, pulled = ref, []
    for conn, docker in nodes:
        try:
            got = pull_on_box(conn, docker, ref, out=out)
        except PullFailed as e:
            where = f" on {conn.host}" if len(nodes) > 1 else ""
            login = any(w in str(e) for w in ("unauthorized", "denied", "authentication required", "no basic auth"))
            why = f"{e}; a private image needs `docker login {ref.name.split('/')[0]}` on the box" if login else str(e)
            out.write(f"note: pull of {asked} failed{where} ({why}): building on the box{'es' if len(nodes) > 1 else ''}\n")
            return None
        pulled.append(got)
        ref = parse_ref(got.ref)
    return pulled


def data_pull_ref(image: str, flavour: Flavour) -> str | None:
    """--image's data image, as `make push-image` pushes it beside the trainer image: the flavour's tag with -data.
    None for a digest, which names one image and no other."""
    ref = parse_ref(pull_ref(image, flavour))
    return None if ref.digest else f"{ref.name}:{ref.tag}-data"


def pull_data_image(conn, docker: str, image: str, flavour: Flavour, out=sys.stdout) -> str | None:
    """The data image of --image pulled on the box, to prepare the data in while the trainer image is pulled: its
    reference by digest, or None after one line (no data image there: the data waits for the trainer image)."""
    later = "the data is prepared once the trainer image is there"
    ref = data_pull_ref(image, flavour)
    if ref is None:
        out.write(f"note: --image {image} is a digest, which names no data image: {later} (--image by tag pulls its data image first)\n")
        return None
    out.write(f"pulling the data image {ref} on {conn.host}\n")
    seen = _PullOutput(io.StringIO())  # its progress unsaid: the trainer image's pull is the one to watch
    status = stream(conn, f"{docker} pull {shlex.quote(ref)} 2>&1", out=seen)
    why = seen.reason(failed=status != 0)
    if status != 0 or seen.digest is None:
        out.write(f"note: no data image {ref} to pull ({why or f'docker pull exited with {status}'}): {later}\n")
        return None
    return Ref(parse_ref(ref).name, digest=seen.digest).pinned


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


def tag_flavour(tag: str) -> str | None:
    """The flavour a tag names (cu128, or <sha>-cu128, as make build-image tags them), if any."""
    return next((f.name for f in FLAVOURS if tag == f.name or tag.endswith(f"-{f.name}")), None)


def pull_ref(image: str, flavour: Flavour) -> str:
    """--image for this flavour: `{flavour}` replaced by its name; REGISTRY/NAME -> :<flavour>; :TAG -> :TAG-<flavour>;
    a digest, or a tag that names this flavour, as it is. A tag that names another flavour is one line: its image would
    fail at docker run on this driver (or, older, give up the newer CUDA the driver runs)."""
    if "{flavour}" in image:
        return image.replace("{flavour}", flavour.name)
    ref = parse_ref(image)
    if ref.digest:
        return image
    if ref.tag is None:
        return f"{ref.name}:{flavour.name}"
    named = tag_flavour(ref.tag)
    if named is None:
        return f"{ref.name}:{ref.tag}-{flavour.name}"
    if named != flavour.name:
        raise UserError(f"--image {image} is a {named} image but this run's flavour is {flavour.name} (the newest the box's driver runs, "
                        f"or --cuda): give the tag without its flavour (the launcher adds -{flavour.name}), or pass --cuda {named} if the "
                        "driver runs it")
    return image


def ship_ref(image: str | None, flavour: Flavour) -> str:
    return pull_ref(image, flavour) if image else f"{contract.IMAGE_NAME}:{flavour.name}"


def ensure_image(conn, docker: str, *, flavour: Flavour = DEFAULT, image: str | None = None, ship: bool = False,
                 build_args: dict[str, str] | None = None, wheels: str | None = None, out=sys.stdout) -> Image:
    """Make the image available on the box and return it: shipped, or built from source (a pull is pull_images')."""
    if ship:
        ref = ship_ref(image, flavour)
        found = image_id(conn, docker, ref)
        ship_to_box(conn, docker, ref, out=out)
        tag_as_trainer(conn, docker, ref)
        return Image(ref, "shipped" if image_id(conn, docker, ref) != found else "found")
    return build_on_box(conn, docker, flavour=flavour, build_args=build_args, wheels=wheels, out=out)


def plan_pull(conn, docker: str, *, flavour: Flavour, image: str, rank: int = 0) -> tuple[str, list[str]]:
    """(the reference, what pull_images would do on this node), found by looking only (`docker image inspect`)."""
    ref = parse_ref(pull_ref(image, flavour))
    head = f"image: CUDA flavour {flavour.name} (CUDA {flavour.cuda_text})"
    if ref.digest and image_id(conn, docker, ref.pinned):
        return ref.pinned, [f"{head}: {ref.pinned} is already on the box: no pull"]
    how = ("pinned to the digest node 0 pulls" if rank else "then run by the digest the registry serves for the tag") \
        if not ref.digest else "by digest"
    return str(ref), [f"{head}: docker pull {ref.pinned if ref.digest else ref} on the box, {how}; a failed pull is one line, "
                      "and the image is built on the box instead:"]


def plan_image(conn, docker: str, *, flavour: Flavour = DEFAULT, image: str | None = None, ship: bool = False,
               build_args: dict[str, str] | None = None, wheels: str | None = None, fallback: bool = False) -> tuple[str, list[str]]:
    """(the image reference, what ensure_image would do to have it), found by looking only (`docker image inspect`).
    fallback: the build that follows a failed pull, shown under the pull's line."""
    head = "  if the pull fails" if fallback else f"image: CUDA flavour {flavour.name} (CUDA {flavour.cuda_text})"
    if ship:
        ref = ship_ref(image, flavour)
        there = "already on the box, nothing to send" if image_id(conn, docker, ref) else "docker save here | docker load there"
        return ref, [f"{head}: ship {ref} from this machine ({there})"]
    args = build_args_for(flavour, build_args)
    digest, size = context_digest(wheels)
    tag = source_tag(digest, args, flavour)
    if image_id(conn, docker, tag):
        return tag, [f"{head}: {tag} is already on the box (same source and build args): no build"]
    return tag, [f"{head}: build {tag} on the box from this source ({size / 2**20:.1f} MiB sent), base {args['BASE_IMAGE']}",
            "  " + build_command(docker, tag, args, "CONTEXT")]
