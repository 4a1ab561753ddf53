"""File-system helpers shared by the checkpoint writer and the shard writer (no torch import: job.prepare's
tokenizer workers stay light)."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

# The errors a full disk (or a full quota) gives a write.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable: after a crash the new name is there, not just the data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def free_bytes(path) -> int:
    """Free space for an unprivileged writer on the file system that holds `path` (or would, once created)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def human_bytes(n: float) -> str:
    if n < 2**20:
        return f"{n / 2**10:.0f} KiB"
    return f"{n / 2**20:.0f} MiB" if n < 2**30 else f"{n / 2**30:.1f} GiB"


def out_of_space(e: BaseException, free: int, need: int) -> bool:
    errno_ = getattr(e, "errno", None)
    return errno_ in NO_SPACE or (errno_ is None and free < need)


def write_failure(e: BaseException, directory, need: int) -> str:
    """Why writing `need` bytes into `directory` failed, in a few words. Some writers (torch's zip writer,
    safetensors) hide the errno of a full disk, so for them the free space left after removing the partial file
    decides."""
    free = free_bytes(directory)
    if out_of_space(e, free, need):
        return f"no space left on the device ({human_bytes(free)} free; this needs about {human_bytes(need)})"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


# The errors of a place this user may not write in (a read-only mount, an owner or mode): no room to make helps.
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def retry_advice(e: BaseException, directory, flag: str, again: str) -> str:
    """What to do about a write into `directory` that failed, before `again` (what the same command then does): make
    room, or, where the place is read-only or not this user's, make it writable or choose another `flag`."""
    if getattr(e, "errno", None) == errno.EROFS:
        return f"{directory} is on a read-only file system: remount it read-write or choose another {flag}, then {again}"
    if getattr(e, "errno", None) in NOT_WRITABLE:
        return f"this user (uid {os.getuid()}) may not write in {directory}: fix its owner or mode or choose another {flag}, then {again}"
    return f"make room, then {again}"
