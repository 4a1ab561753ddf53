"""Image references and `make push-image`: the trainer image pushed to a registry, for `fab launch --image` to pull.

A reference is docker's `[HOST[:PORT]/]PATH[:TAG][@sha256:DIGEST]`. The digest names one image's content for good; a
tag is a name the registry may move. `make build-image` tags the image NAME:<git sha>-<flavour> and NAME:<flavour>;
push-image pushes both to REGISTRY/NAME and prints the digest, which `fab launch --image REGISTRY/NAME@sha256:...`
pins. `--image REGISTRY/NAME[:<git sha>]` names a tag without the flavour: the launcher adds the flavour the box's
driver takes.

    python -m infra.registry push --registry HOST:PORT/team --name nanogpt-train --tag <git sha> --flavour cu130

Credentials are Docker's own (`docker login` on each machine keeps them in its credential store): nothing here
reads, passes or prints them.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass

from job.errors import UserError

DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# docker's reference grammar, closely enough to refuse a typo before anything runs: a lowercase path of components
# separated by / (the first may be a registry host with a port), a tag of at most 128 word characters, dots and dashes.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_HOST = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
NAME = re.compile(rf"(?:{_HOST}/)?{_COMPONENT}(?:/{_COMPONENT})*")
TAG = re.compile(r"[\w][\w.-]{0,127}")
PUSHED = re.compile(r"digest: (sha256:[0-9a-f]{64}) size: \d+")


@dataclass(frozen=True)
class Ref:
    name: str  # registry and repository: 127.0.0.1:5000/team/nanogpt-train
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        return self.name + (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")

    @property
    def pinned(self) -> str:
        """The reference by digest alone: what runs, and what the other nodes pull."""
        return f"{self.name}@{self.digest}"


def parse_ref(text: str, what: str = "--image") -> Ref:
    """A reference, or one line naming what is wrong with it."""
    rest, at, digest = text.partition("@")
    name, tag = rest, None
    if ":" in rest.rsplit("/", 1)[-1]:
        name, tag = rest.rsplit(":", 1)
    if at and not DIGEST.fullmatch(digest):
        raise UserError(f"{what} {text!r}: the digest after @ must be sha256: and 64 hex digits (make push-image prints it)")
    if not NAME.fullmatch(name) or (tag is not None and not TAG.fullmatch(tag)):
        raise UserError(f"{what} {text!r} is not an image reference: give REGISTRY/NAME, REGISTRY/NAME:TAG or REGISTRY/NAME@sha256:DIGEST "
                        "(lowercase name, no scheme)")
    return Ref(name, tag, digest or None)


def check_image_flag(text: str) -> None:
    """--image as `fab launch` takes it: a reference, where `{flavour}` may stand for the flavour's name."""
    parse_ref(text.replace("{flavour}", "cu130"))


def repo_key(name: str) -> str:
    """A repository as docker lists it in RepoDigests: Docker Hub's docker.io/ and library/ left out."""
    for prefix in ("docker.io/", "index.docker.io/", "library/"):
        name = name.removeprefix(prefix)
    return name


# ---- make push-image -----------------------------------------------------------------------------------------
def docker_line(stderr: str) -> str:
    """Docker's own reason, on one line: its last non-empty line, without the daemon's prefix."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    reason = lines[-1] if lines else "no reason given"
    return " ".join(reason.removeprefix("Error response from daemon:").split())[:300]


def push_hint(reason: str, host: str) -> str:
    if any(w in reason for w in ("unauthorized", "authentication required", "denied", "no basic auth credentials")):
        return f"run `docker login {host}` here (it asks for the password; never pass it with -p) and push again"
    return f"check that the registry {host} runs and is reachable from here, and push again"


def push_one(cmd: list[str], ref: str, host: str, out) -> str:
    """docker push of one reference, its progress passed on; the digest the registry stored, or one line."""
    proc = subprocess.Popen([*cmd, "push", ref], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pushed = None
    for line in proc.stdout:  # docker's progress, one line per layer
        out.write(line)
        out.flush()
        if m := PUSHED.search(line):
            pushed = m.group(1)
    err = proc.stderr.read()
    if proc.wait() != 0 or pushed is None:
        reason = docker_line(err)
        raise UserError(f"docker push {ref} failed ({reason}): {push_hint(reason, host)}")
    return pushed


def push(docker: str, registry: str, name: str, tag: str, flavour: str, out=sys.stdout) -> str:
    """Push NAME:TAG-FLAVOUR as REGISTRY/NAME:TAG-FLAVOUR and REGISTRY/NAME:FLAVOUR, and its data image
    NAME:TAG-FLAVOUR-data (make build-image's) under the same tags with -data: what `fab launch --image` pulls first, to
    prepare the data in while the trainer image is pulled. Return the trainer's digest the registry stored. A failed
    push leaves no tag behind that it made here. `docker` may be a command line (sudo docker)."""
    cmd = shlex.split(docker)
    if not registry:
        raise UserError("REGISTRY is not set: make push-image REGISTRY=registry.example.com/team")
    registry = registry.rstrip("/")
    if "://" in registry or not NAME.fullmatch(registry):
        raise UserError(f"REGISTRY={registry!r} is not a registry path: give HOST[:PORT]/PATH without a scheme, "
                        "e.g. REGISTRY=ghcr.io/you or REGISTRY=127.0.0.1:5000/team")
    local = f"{name}:{tag}-{flavour}"
    if subprocess.run([*cmd, "image", "inspect", local], capture_output=True).returncode != 0:
        raise UserError(f"no image {local} here to push: build it first with `make build-image CUDA={flavour}`"
                        + (f" NAME={name}" if name != "nanogpt-train" else ""))
    has_data = subprocess.run([*cmd, "image", "inspect", f"{local}-data"], capture_output=True).returncode == 0
    images = {local: [f"{registry}/{name}:{tag}-{flavour}", f"{registry}/{name}:{flavour}"]}
    if has_data:
        images[f"{local}-data"] = [f"{r}-data" for r in images[local]]
    made = [r for refs in images.values() for r in refs if subprocess.run([*cmd, "image", "inspect", r], capture_output=True).returncode != 0]
    host = registry.split("/", 1)[0]
    digests = {}
    try:
        for source, refs in images.items():
            for r in refs:
                subprocess.run([*cmd, "tag", source, r], check=True, capture_output=True)
            for r in refs:
                pushed = push_one(cmd, r, host, out)
                if digests.setdefault(source, pushed) != pushed:
                    raise UserError(f"the registry {host} stored {r} as {pushed} but {refs[0]} as {digests[source]}: push again")
    except BaseException:
        for r in made:
            subprocess.run([*cmd, "rmi", "--no-prune", r], capture_output=True)
        raise
    report_push(out, f"{registry}/{name}", tag, flavour, digests[local], digests.get(f"{local}-data"), local)
    return digests[local]


def report_push(out, ref: str, tag: str, flavour: str, digest: str, data_digest: str | None, local: str) -> None:
    out.write(f"pushed {ref}:{tag}-{flavour} and :{flavour}: digest {digest}\n")
    if data_digest:
        out.write(f"pushed its data image as {ref}:{tag}-{flavour}-data and :{flavour}-data: digest {data_digest}\n")
    else:
        out.write(f"note: no data image {local}-data here (make build-image builds it): a launch from this push prepares the data "
                  "only once the trainer image is pulled\n")
    out.write(f"launch it with: fab launch --image {ref}:{tag} (the box's flavour, its data image pulled first) or --image {ref}@{digest}\n")


def main(argv: list[str]) -> None:
    from job.errors import ArgumentParser

    p = ArgumentParser(prog="python -m infra.registry", description="push the trainer image (make push-image)")
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("push", help="push NAME:TAG-FLAVOUR to REGISTRY/NAME and print its digest")
    q.add_argument("--registry", default="", help="HOST[:PORT]/PATH, e.g. ghcr.io/you")
    q.add_argument("--name", required=True, help="the local image's name (make build-image's NAME)")
    q.add_argument("--tag", required=True, help="the git sha its tag starts with")
    q.add_argument("--flavour", required=True, help="the CUDA flavour its tag ends with (infra/flavour.py)")
    q.add_argument("--docker", default="docker", help="the docker command")
    args = p.parse_args(argv)
    from infra.flavour import by_name

    push(args.docker, args.registry, args.name, args.tag, by_name(args.flavour).name)


if __name__ == "__main__":
    from job.errors import cli_main

    cli_main(main)(sys.argv[1:])
