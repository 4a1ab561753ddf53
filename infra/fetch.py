"""fetch-weights: bring checkpoints and logs (TensorBoard's event files too) from the box's weights dir to local disk, incrementally.

Resumable and verified: each file is downloaded to NAME.part (appending to a .part left by an interrupted
transfer), its sha256 compared with the one `sha256sum` computes on the box, then renamed into place. A
file already complete locally (same size and hash) is skipped, so a second run transfers nothing.
"""

from __future__ import annotations

import os
import posixpath
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from infra.ssh import run
from job import contract
from job.errors import UserError
from job.fsutil import NO_SPACE, free_bytes, human_bytes
from job.sidecar.digest import CHUNK, sha256_file

LOG_FILES = (contract.METRICS_FILE, contract.HUMAN_LOG_FILE, contract.NANOGPT_LOG_FILE)


@dataclass
class FetchReport:
    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_transferred: int = 0


def remote_files(conn, remote_dir: str, latest_only: bool = False) -> dict[str, int]:
    """{name: size} of the checkpoints and logs in the box's weights dir (temp files of a running save excluded)."""
    sftp = conn.sftp()
    try:
        entries = sftp.listdir_attr(remote_dir)
    except FileNotFoundError:
        raise UserError(f"{remote_dir} does not exist on {conn.host}: pass the box's weights dir with --weights-dir") from None
    prefix = contract.CHECKPOINT_GLOB.split("*")[0]
    ckpts = sorted(e.filename for e in entries if e.filename.startswith(prefix) and e.filename.endswith(".pt"))
    if latest_only:
        ckpts = ckpts[-1:]
    wanted = set(ckpts) | set(LOG_FILES)
    return {e.filename: e.st_size for e in entries if e.filename in wanted or is_log(e.filename)}


def is_log(name: str) -> bool:
    """Besides the fixed log files: TensorBoard's event files, which grow like them."""
    return name.startswith(contract.TENSORBOARD_EVENTS_PREFIX)


def remote_hashes(conn, remote_dir: str, names: list[str]) -> dict[str, str]:
    if not names:
        return {}
    paths = " ".join(shlex.quote(posixpath.join(remote_dir, n)) for n in names)
    out = run(conn, f"sha256sum {paths}").stdout
    return {posixpath.basename(line.split(None, 1)[1].strip()): line.split()[0] for line in out.splitlines() if line.strip()}


def fetch_weights(conn, remote_dir: str, local_dir, latest_only: bool = False, progress: bool = True) -> FetchReport:
    local = Path(local_dir).expanduser()
    local.mkdir(parents=True, exist_ok=True)
    sizes = remote_files(conn, remote_dir, latest_only)
    if not any(n.endswith(".pt") for n in sizes):
        print(f"no checkpoints in {conn.host}:{remote_dir} yet")
    report = FetchReport()
    # Hash on the box only what could be skipped or must be verified: files are hashed where they are.
    hashes = remote_hashes(conn, remote_dir, sorted(sizes))
    todo = []
    for name in sorted(sizes):
        dest = local / name
        if dest.exists() and dest.stat().st_size == sizes[name] and sha256_file(dest) == hashes[name]:
            report.skipped.append(name)
        elif dest.exists() and name.endswith(".pt"):
            # A checkpoint of the same name but other bytes is another run's: never overwrite it.
            raise UserError(f"{dest} exists and differs from {conn.host}:{remote_dir}/{name}: move it away or fetch --to another dir")
        else:
            todo.append(name)
    total = sum(sizes[n] - _part_size(local / n) for n in todo)
    free = free_bytes(local)
    if total > free:  # refuse before the first byte, not gigabytes in
        raise UserError(f"{local} has {human_bytes(free)} free and this fetch needs {human_bytes(total)} ({len(todo)} files): "
                        "make room there, fetch --latest-only, or fetch --to a disk with room")
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="fetch", disable=not progress or None)
    sftp = conn.sftp()
    try:
        for name in todo:
            # Logs grow while training runs: copy what is there now; checkpoints never change, so verify them.
            digest = hashes[name] if name.endswith(".pt") else None
            report.bytes_transferred += _download(sftp, posixpath.join(remote_dir, name), local / name, sizes[name], digest, bar)
            report.copied.append(name)
    finally:
        bar.close()
    mark_fetched(conn, remote_dir, {n: hashes[n] for n in report.copied + report.skipped if n.endswith(".pt")})
    return report


def mark_fetched(conn, remote_dir: str, verified: dict[str, str]) -> None:
    """Leave `.fetched-NAME` (the sha256 verified here) beside each checkpoint now safe on this disk: the box's cost
    guard (job/sidecar/guard.py) may terminate the instance only once the final checkpoint is safe somewhere."""
    if not verified:
        return
    cmd = " && ".join(f"printf %s {digest} > {shlex.quote(posixpath.join(remote_dir, contract.FETCHED_MARKER.format(name=name)))}"
                      for name, digest in verified.items())
    run(conn, cmd, warn=True)  # a read-only weights dir only means the guard keeps waiting; the fetch itself succeeded


def _part_size(dest: Path) -> int:
    part = dest.with_name(dest.name + ".part")
    return part.stat().st_size if part.exists() else 0


def _download(sftp, remote: str, dest: Path, size: int, digest: str | None, bar) -> int:
    part = dest.with_name(dest.name + ".part")
    start = part.stat().st_size if part.exists() and digest else 0
    if start > size or not digest:  # a stale .part from an older, bigger file, or a log: start over
        part.unlink(missing_ok=True)
        start = 0
    try:
        with sftp.open(remote, "rb") as src, open(part, "ab") as out:
            src.seek(start)
            src.prefetch(size)  # pipelined reads: many requests in flight instead of one round trip per chunk
            while chunk := src.read(CHUNK):
                out.write(chunk)
                bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
    except OSError as e:
        if e.errno not in NO_SPACE:
            raise
        # A checkpoint's .part stays: once there is room, the next fetch appends to it instead of starting over.
        have = part.stat().st_size
        resume = f"; it goes on from the {human_bytes(have)} in {part.name}" if digest else ""
        raise UserError(f"no space left on the device for {dest} ({human_bytes(free_bytes(part))} free, "
                        f"{human_bytes(size - have)} still to copy): make room there and run fetch-weights again{resume}") from None
    if digest and sha256_file(part) != digest:
        part.unlink()
        raise UserError(f"{dest.name}: the downloaded bytes do not match the box's sha256 (file changed during the copy?): run fetch-weights again")
    os.replace(part, dest)
    return size - start
