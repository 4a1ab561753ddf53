"""fetch-weights: bring checkpoints and logs (TensorBoard's event files too) from the box's weights dir to local disk, incrementally,
at link speed.

Each file comes as one byte stream (`tail -c +N FILE` on the box) through OpenSSH's own client, as fast as scp
(docs/BENCHMARKS.md), with the host key checked against the same known_hosts as every other connection
(infra/ssh.openssh_command); without an `ssh` program, over a paramiko channel with a wide window and large packets.

Verified: the bytes are hashed here as they arrive and compared with the box's sha256 of the file. That digest
is one already recorded on the box when there is a trustworthy one (the S3 sidecar's `.synced-NAME`, or an
earlier fetch's `.fetched-NAME`, either no older than the checkpoint), else `sha256sum` runs on the box on a
second channel *while* the bytes travel, so hashing costs no extra time.

Resumable: a file arrives as NAME.part and is renamed into place once verified; an interrupted transfer leaves
the .part and the next run appends to it. Incremental: a file already complete locally (same size and sha256)
is skipped, so a second run transfers nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import shlex
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from infra.ssh import ConnectionLost, openssh_command, run
from job import contract
from job.errors import UserError
from job.fsutil import NO_SPACE, free_bytes, human_bytes
from job.sidecar.digest import CHUNK, sha256_file

LOG_FILES = (contract.METRICS_FILE, contract.HUMAN_LOG_FILE, contract.NANOGPT_LOG_FILE)
# Bytes the box may send before this side acknowledges them. paramiko's default (2 MiB) caps a link with
# latency at 2 MiB per round trip; 64 MiB keeps a 50 ms link full at over 1 GB/s. Large packets keep the
# per-packet Python work of paramiko small.
WINDOW = 64 << 20
PACKET = 256 << 10
READ = 4 << 20
PIPE = 1 << 20  # ssh's stdout pipe: what any user may ask of Linux (/proc/sys/fs/pipe-max-size), 16x the default


@dataclass
class FetchReport:
    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_transferred: int = 0


@dataclass
class RemoteFile:
    size: int
    mtime: int
    sha256: str | None = None  # recorded on the box (a sidecar or fetch marker), when it can be trusted


def remote_files(conn, remote_dir: str, latest_only: bool = False) -> dict[str, RemoteFile]:
    """The checkpoints and logs in the box's weights dir (temp files of a running save excluded), with any digests
    the box already recorded for them."""
    sftp = conn.sftp()
    try:
        entries = {e.filename: e for e in sftp.listdir_attr(remote_dir)}
    except FileNotFoundError:
        raise UserError(f"{remote_dir} does not exist on {conn.host}: pass the box's weights dir with --weights-dir") from None
    prefix = contract.CHECKPOINT_GLOB.split("*")[0]
    ckpts = sorted(n for n in entries if n.startswith(prefix) and n.endswith(".pt"))
    if latest_only:
        ckpts = ckpts[-1:]
    found = {n: RemoteFile(entries[n].st_size, entries[n].st_mtime) for n in [*ckpts, *LOG_FILES, *filter(is_log, entries)]
             if n in entries}
    markers = {m: n for n in ckpts for m in (contract.SYNCED_MARKER.format(name=n), contract.FETCHED_MARKER.format(name=n))
               if m in entries and entries[m].st_mtime >= entries[n].st_mtime}  # older than the file: another run's
    for marker, text in read_markers(conn, remote_dir, sorted(markers)).items():
        name = markers[marker]
        found[name].sha256 = found[name].sha256 or recorded_digest(text, found[name].size)
    return found


def read_markers(conn, remote_dir: str, names: list[str]) -> dict[str, str]:
    """{marker: its text}, all in one command."""
    if not names:
        return {}
    cmd = f"cd {shlex.quote(remote_dir)} && for f in {' '.join(shlex.quote(n) for n in names)}; do printf '%s\\t' \"$f\"; " \
          "head -c 4096 \"$f\" | tr -d '\\n'; echo; done"
    out = run(conn, cmd, warn=True).stdout
    return dict(line.split("\t", 1) for line in out.splitlines() if "\t" in line)


def recorded_digest(text: str, size: int) -> str | None:
    """A marker's sha256: `.fetched-NAME` holds the bare digest, `.synced-NAME` JSON with the size too."""
    text = text.strip()
    if text.startswith("{"):
        try:
            rec = json.loads(text)
        except ValueError:
            return None
        return rec.get("sha256") if isinstance(rec, dict) and rec.get("size") == size else None
    return text if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else None


def is_log(name: str) -> bool:
    """Besides the fixed log files: TensorBoard's event files, which grow like them."""
    return name.startswith(contract.TENSORBOARD_EVENTS_PREFIX)


def remote_hashes(conn, remote_dir: str, names: list[str]) -> dict[str, str]:
    if not names:
        return {}
    paths = " ".join(shlex.quote(posixpath.join(remote_dir, n)) for n in names)
    out = run(conn, f"sha256sum {paths}").stdout
    return {posixpath.basename(line.split(None, 1)[1].strip()): line.split()[0] for line in out.splitlines() if line.strip()}


def plan_fetch(conn, remote_dir: str, local: Path, files: dict[str, RemoteFile], report: FetchReport) -> tuple[list[str], dict[str, str]]:
    """(the names still to copy, {name: sha256} of those complete here, which go to report.skipped). Only a file that
    may be complete here (same size) needs the box's digest now, and only when none is recorded there."""
    same_size = [n for n, f in files.items() if (local / n).exists() and (local / n).stat().st_size == f.size]
    hashes = remote_hashes(conn, remote_dir, [n for n in same_size if not files[n].sha256])
    todo, complete = [], {}
    for name in sorted(files):
        dest = local / name
        digest = sha256_file(dest) if name in same_size else None
        if digest and digest == (files[name].sha256 or hashes[name]):
            report.skipped.append(name)
            complete[name] = digest
        elif dest.exists() and name.endswith(".pt"):
            # A checkpoint of the same name but other bytes is another run's: never overwrite it.
            raise UserError(f"{dest} exists and differs from {conn.host}:{remote_dir}/{name}: move it away or fetch --to another dir")
        else:
            todo.append(name)
    return todo, complete


def fetch_weights(conn, remote_dir: str, local_dir, latest_only: bool = False, progress: bool = True) -> FetchReport:
    local = Path(local_dir).expanduser()
    local.mkdir(parents=True, exist_ok=True)
    files = remote_files(conn, remote_dir, latest_only)
    if not any(n.endswith(".pt") for n in files):
        print(f"no checkpoints in {conn.host}:{remote_dir} yet")
    report = FetchReport()
    todo, complete = plan_fetch(conn, remote_dir, local, files, report)
    total = sum(files[n].size - _part_size(local / n) for n in todo)
    free = free_bytes(local)
    if total > free:  # refuse before the first byte, not gigabytes in
        raise UserError(f"{local} has {human_bytes(free)} free and this fetch needs {human_bytes(total)} ({len(todo)} files): "
                        "make room there, fetch --latest-only, or fetch --to a disk with room")
    verified = {n: d for n, d in complete.items() if n.endswith(".pt")}
    with tqdm(total=total, unit="B", unit_scale=True, desc="fetch", disable=not progress or None) as bar:
        verified.update(transfer(conn, [Part(local / n, posixpath.join(remote_dir, n), files[n]) for n in todo], bar, report))
    mark_fetched(conn, remote_dir, verified)
    return report


def fetch_metrics(conn, remote_dir: str, names: list[str], local_dir) -> list[Path]:
    """The metrics.jsonl of each run named (remote_dir/NAME/, as `--runs` lays them out) to local_dir/NAME/, whole, over
    SFTP: a log is small, and the next fetch replaces it. A run without one (not started) is left out. Returns the
    local run dirs."""
    sftp = conn.sftp()
    found = []
    for name in names:
        dest = Path(local_dir).expanduser() / name
        dest.mkdir(parents=True, exist_ok=True)
        part = dest / (contract.METRICS_FILE + ".part")
        try:
            sftp.get(posixpath.join(remote_dir, name, contract.METRICS_FILE), str(part))
        except FileNotFoundError:
            part.unlink(missing_ok=True)
            continue
        part.replace(dest / contract.METRICS_FILE)
        found.append(dest)
    return found


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


class Part:
    """One file to bring: its bytes arrive in dest's .part, after what an interrupted transfer left there (checkpoints
    only: a log grows, so it always starts over), hashed as they come."""

    def __init__(self, dest: Path, remote: str, info: RemoteFile):
        self.dest, self.remote, self.size, self.known = dest, remote, info.size, info.sha256
        self.verify = dest.name.endswith(".pt")  # checkpoints never change once written; logs grow while training runs
        self.part = dest.with_name(dest.name + ".part")
        self.start = _part_size(dest) if self.verify else 0
        if self.start > self.size or not self.verify:  # a stale .part from an older, bigger file, or a log
            self.part.unlink(missing_ok=True)
            self.start = 0
        self.hash = hashlib.sha256()
        if self.start:
            with open(self.part, "rb") as f:
                while chunk := f.read(CHUNK):
                    self.hash.update(chunk)

    def command(self) -> str:
        """Exactly the bytes still missing, as listed: a log that grew since is cut there, and a file cut short pads
        with zeros (caught by the sha256) so that the files after it in the one stream keep their place."""
        return f"{{ tail -c +{self.start + 1} {shlex.quote(self.remote)} 2>/dev/null; cat /dev/zero; }} | head -c {self.size - self.start}"


def transfer(conn, parts: list[Part], bar, report: FetchReport) -> dict[str, str]:
    """All the parts in one stream (one SSH session: no per-file handshake), each verified as soon as its last byte is
    here, then flushed to disk and renamed into place by a second thread while the next file arrives; the box hashes
    what has no recorded digest on a second channel meanwhile. Returns {name: sha256} of the checkpoints verified."""
    if not parts:
        return {}
    hashed = [p for p in parts if p.verify and not p.known]
    hasher = _open(conn, "sha256sum " + " ".join(shlex.quote(p.remote) for p in hashed)) if hashed else None
    digests = hasher.makefile("rb") if hasher else None
    chunks = _stream(conn, "; ".join(p.command() for p in parts))
    verified, rest, settled = {}, b"", []
    try:
        with ThreadPoolExecutor(max_workers=1) as settler:  # on the way out it waits for what it was given
            for p in parts:
                rest = _receive(p, chunks, rest, bar)
                if p.verify:
                    box = p.known or _box_digest(conn, digests, p.remote)
                    if p.hash.hexdigest() != box:
                        p.part.unlink()
                        raise UserError(f"{p.dest.name}: the downloaded bytes do not match the box's sha256 (file changed during "
                                        "the copy?): run fetch-weights again")
                    verified[p.dest.name] = box
                settled.append((p, settler.submit(_settle, p)))
    finally:
        chunks.close()
        if hasher:
            hasher.close()
        for p, done in settled:  # what is in place counts, even when a later file failed
            if done.done() and done.exception() is None:
                report.copied.append(p.dest.name)
                report.bytes_transferred += p.size - p.start
    for _, done in settled:
        done.result()
    return verified


def _settle(p: Part) -> None:
    """fsync, then rename: a file under its final name is complete on the disk, not only in the page cache."""
    try:
        fd = os.open(p.part, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        if e.errno not in NO_SPACE:
            raise
        raise UserError(f"no space left on the device for {p.dest} ({human_bytes(free_bytes(p.part))} free): make room there "
                        f"and run fetch-weights again; it goes on from {p.part.name}") from None
    os.replace(p.part, p.dest)


def _receive(p: Part, chunks, rest: bytes, bar) -> bytes:
    """Append p's missing bytes (`rest` first, then from `chunks`) to its .part; return what belongs to the next file.
    A full disk keeps the .part for the next run to go on from."""
    need = p.size - p.start
    try:
        with open(p.part, "ab") as out:
            while need:
                if not rest:
                    rest = next(chunks, b"")
                    if not rest:
                        raise ConnectionLost(f"the copy of {p.remote} stopped after {human_bytes(p.size - need)} of "
                                             f"{human_bytes(p.size)}: run fetch-weights again; it goes on from {p.part.name}")
                piece, rest = rest[:need], rest[need:]
                out.write(piece)
                p.hash.update(piece)
                need -= len(piece)
                bar.update(len(piece))
    except OSError as e:
        if e.errno not in NO_SPACE:
            raise
        have = p.part.stat().st_size
        resume = f"; it goes on from the {human_bytes(have)} in {p.part.name}" if p.verify else ""
        raise UserError(f"no space left on the device for {p.dest} ({human_bytes(free_bytes(p.part))} free, "
                        f"{human_bytes(p.size - have)} still to copy): make room there and run fetch-weights again{resume}") from None
    return rest


def _open(conn, cmd: str):
    transport = conn.client.get_transport()
    # paramiko starting a re-key itself races with the window adjustments of a fast download (it then fails with
    # "Key-exchange timed out", a known paramiko race); sshd re-keys on its own schedule (RekeyLimit, 1-4 GB by default),
    # which paramiko handles, so leave the re-keying to the box.
    transport.packetizer.REKEY_BYTES = transport.packetizer.REKEY_PACKETS = 2**62
    chan = transport.open_session(window_size=WINDOW, max_packet_size=PACKET)
    chan.exec_command(cmd)
    return chan


def _stream(conn, cmd: str):
    """The output of `cmd` on the box, in chunks: through OpenSSH's client where there is one, else (or where it cannot
    log in as paramiko did: another key, an ssh_config of its own) over a paramiko channel."""
    argv = openssh_command(conn, cmd)
    if argv is not None:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
        with contextlib.suppress(ImportError, AttributeError, OSError):  # Linux: a deeper pipe lets ssh decrypt on while this side hashes
            import fcntl

            fcntl.fcntl(proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, PIPE)
        got = 0
        try:
            while chunk := proc.stdout.read(READ):
                got += len(chunk)
                yield chunk
        finally:
            proc.stdout.close()
            if proc.poll() is None:  # stopped early (a full disk, a mismatch): the rest is not wanted
                proc.terminate()
            err = proc.stderr.read().decode(errors="replace")
            proc.stderr.close()
            proc.wait()
        if proc.returncode != 255:  # 255: ssh's own failure, not the command's
            return
        if got:
            raise ConnectionLost(f"ssh to {conn.host} failed during the copy ({' '.join(err.split())[:200]}): run fetch-weights again; "
                                 "it goes on from where it stopped")
    chan = _open(conn, cmd)
    try:
        while chunk := chan.recv(READ):
            yield chunk
    finally:
        chan.close()


def _box_digest(conn, digests, remote: str) -> str:
    """The next line of the box's `sha256sum` (it hashes in the order the files are sent)."""
    line = digests.readline().decode(errors="replace").split()
    if len(line) < 2 or line[1] != remote:
        raise UserError(f"could not hash {remote} on {conn.host} (sha256sum failed): check that it is readable there")
    return line[0]
