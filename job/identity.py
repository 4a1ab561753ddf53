"""What a run ran: the code (its commit, and a hash of job/'s content), the image, torch, CUDA, the driver and the
GPU. The trainer writes it into its start event and every checkpoint, so a figure can be traced to what made it.

Torch-free to import: the launcher may read the code's identity too. Everything is found once per process.

- commit: `git rev-parse HEAD` of the checkout that holds job/; in the image, which has no .git, the commit it was
  built from (NANOGPT_COMMIT, set by docker/Dockerfile's GIT_COMMIT build arg); else null.
- code_sha256: a hash of job/'s .py files and contract.env, by path and content. It is there even without a commit
  and tells a checkout with local changes from its commit.
- image, image_id: the reference the launcher ran and the image's id (`docker image inspect`'s .Id), passed into the
  container as NANOGPT_IMAGE and NANOGPT_IMAGE_ID; null outside a container.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
COMMIT_ENV, IMAGE_ENV, IMAGE_ID_ENV = "NANOGPT_COMMIT", "NANOGPT_IMAGE", "NANOGPT_IMAGE_ID"


def code_files(package: Path = PACKAGE) -> list[Path]:
    """What the code is: the package's Python files and the container contract, never caches or data."""
    return sorted((p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                   and (p.suffix == ".py" or p.name == "contract.env")), key=lambda p: p.relative_to(package).as_posix())


def code_hash(package: Path = PACKAGE) -> str:
    """sha256 over each code file's path (relative to the package) and bytes: the same code gives the same hash in a
    checkout, a copy and the image."""
    h = hashlib.sha256()
    for p in code_files(package):
        data = p.read_bytes()
        h.update(f"{p.relative_to(package).as_posix()}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def _git(root: Path, *args: str) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_commit(package: Path = PACKAGE) -> tuple[str | None, bool | None]:
    """(HEAD, whether the package differs from it) where the package sits at the top of a git checkout, else
    (None, None): no git, not a checkout, or a copy of job/ inside some other repository."""
    root = package.parent
    top = _git(root, "rev-parse", "--show-toplevel")
    if not top or Path(top).resolve() != root.resolve():
        return None, None
    head = _git(root, "rev-parse", "HEAD")
    changes = _git(root, "status", "--porcelain", "--", package.name)
    return head, None if changes is None else bool(changes)


def driver_version() -> str | None:
    """The NVIDIA driver's version from nvidia-smi; None where there is none or it fails (never an error)."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = proc.stdout.split() if proc.returncode == 0 else []
    return lines[0] if lines else None


@functools.cache
def code_identity(package: Path = PACKAGE) -> dict:
    commit, dirty = git_commit(package)
    if commit is None:
        commit = os.environ.get(COMMIT_ENV) or None
    return {"commit": commit, "dirty": dirty, "code_sha256": code_hash(package)}


@functools.cache
def run_identity(device: str | None = None) -> dict:
    """Everything above for a run on `device` (a torch device string; the GPU's name for a CUDA one, else null). Plain
    types only (torch.__version__ is a str subclass that torch.load(weights_only=True) refuses)."""
    import torch

    gpu = None
    if device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(torch.device(device))
    return {**code_identity(), "image": os.environ.get(IMAGE_ENV) or None, "image_id": os.environ.get(IMAGE_ID_ENV) or None,
            "torch": str(torch.__version__), "cuda": torch.version.cuda, "driver": driver_version(), "gpu": gpu,
            "python": platform.python_version()}
