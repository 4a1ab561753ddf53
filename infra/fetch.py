"""fetch-weights: bring checkpoints and logs (TensorBoard's event files too) from the box's weights dir to local disk, incrementally,
at link speed.

The files come as one byte stream (`tail` on the box) through OpenSSH's own client, asking for AES-GCM first, faster
than scp (docs/BENCHMARKS.md), with the host key checked against the same known_hosts as every other connection
(infra/ssh.openssh_command); without an `ssh` program, over a paramiko channel with a wide window and large packets.
The stream's session and a shell beside it for the small commands (Session) log in before the listing, as soon as
the host key is verified (connect_and_fetch): their logins cost no time of their own.

Verified: the bytes are hashed here as they arrive and compared with the box's sha256 of the file. That digest
is one already recorded on the box when there is a trustworthy one (the S3 sidecar's `.synced-NAME`, or an
earlier fetch's `.fetched-NAME`, either no older than the checkpoint), else OpenSSL (or `sha256sum`) hashes the file on
the box *while* the bytes travel, so hashing costs no extra time.

Resumable: a file arrives as NAME.part and is renamed into place once verified and on the disk (fsync): never a partial
or unverified file under its final name. An interrupted transfer leaves the .part and the next run appends to it.
Incremental: a file already complete locally (same size and sha256) is skipped, so a second run transfers nothing.
Each checkpoint now safe here gets its `.fetched-NAME` on the box, written by the stream's own session at its end.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import posixpath
import secrets
import shlex
import subprocess
import tempfile
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
PIPE = 1 << 20  # ssh's stdout pipe: what any user may ask of Linux (/proc/sys/fs/pipe-max-size), 16x the default
READ = PIPE  # one read takes at most what the pipe holds
# The box's sha256, one line per file in the order given: the digest, or "-" where the file could not be read. OpenSSL's
# uses the CPU's SHA instructions and hashes several times faster than coreutils' sha256sum (docs/BENCHMARKS.md), which
# stands in where there is no openssl.
HASH_SCRIPT = ("if command -v openssl >/dev/null 2>&1; then h() {{ openssl dgst -sha256 -r; }}; else h() {{ sha256sum; }}; fi; "
               'for f in {files}; do d=$(h < "$f") || d=-; echo "${{d%% *}}"; done 2>/dev/null')


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
    marked: str | None = None  # the digest in its .fetched-NAME, when it can be trusted


def remote_files(conn, remote_dir: str, latest_only: bool = False, shell: Shell | None = None) -> dict[str, RemoteFile]:
    """The checkpoints and logs in the box's weights dir (temp files of a running save excluded), with any digests
    the box already recorded for them. shell: where to run the commands (a Shell already logged in), else each on a
    channel of its own."""
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
    for marker, text in read_markers(conn, remote_dir, sorted(markers), shell).items():
        name, digest = markers[marker], recorded_digest(text, found[markers[marker]].size)
        found[name].sha256 = found[name].sha256 or digest
        if marker == contract.FETCHED_MARKER.format(name=name):
            found[name].marked = digest
    return found


def read_markers(conn, remote_dir: str, names: list[str], shell: Shell | None = None) -> dict[str, str]:
    """{marker: its text}, all in one command."""
    if not names:
        return {}
    cmd = f"cd {shlex.quote(remote_dir)} && for f in {' '.join(shlex.quote(n) for n in names)}; do printf '%s\\t' \"$f\"; " \
          "head -c 4096 \"$f\" | tr -d '\\n'; echo; done"
    out = shell.run(cmd) if shell else run(conn, cmd, warn=True).stdout
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


def hash_command(paths: list[str]) -> str:
    return HASH_SCRIPT.format(files=" ".join(shlex.quote(p) for p in paths))


def digest_in(line: str) -> str | None:
    """The sha256 in one line of HASH_SCRIPT's output; None where the box could not read the file."""
    digest = line.strip()
    return digest if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest) else None


def unreadable(conn, remote: str) -> UserError:
    return UserError(f"could not read {remote} on {conn.host} to hash it (removed meanwhile, or not readable): check that it "
                     "is there and readable, then run fetch-weights again")


def remote_hashes(conn, remote_dir: str, names: list[str], shell: Shell | None = None) -> dict[str, str]:
    if not names:
        return {}
    paths = [posixpath.join(remote_dir, n) for n in names]
    cmd = hash_command(paths)
    lines = ((shell.run(cmd) if shell else run(conn, cmd, warn=True).stdout).splitlines() + [""] * len(names))[: len(names)]
    hashes = {}
    for name, path, line in zip(names, paths, lines, strict=True):
        if (digest := digest_in(line)) is None:
            raise unreadable(conn, path)
        hashes[name] = digest
    return hashes


def plan_fetch(conn, remote_dir: str, local: Path, files: dict[str, RemoteFile], report: FetchReport,
               shell: Shell | None = None) -> tuple[list[str], dict[str, str]]:
    """(the names still to copy, {name: sha256} of those complete here, which go to report.skipped). Only a file that
    may be complete here (same size) needs the box's digest now, and only when none is recorded there."""
    same_size = [n for n, f in files.items() if (local / n).exists() and (local / n).stat().st_size == f.size]
    hashes = remote_hashes(conn, remote_dir, [n for n in same_size if not files[n].sha256], shell)
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


def connect_and_fetch(connect, remote_dir: str, local_dir, latest_only: bool = False, progress: bool = True) -> FetchReport:
    """`fab fetch-weights`: connect(opened=...) (infra.ssh.connect with the host and options given), then fetch_weights.
    The OpenSSH session that carries the files starts as soon as the box's host key is verified: its login overlaps
    the rest of connecting and the listing instead of following them."""
    early: list[Session] = []
    try:
        with connect(opened=lambda conn: early.append(Session(conn))) as conn:
            return fetch_weights(conn, remote_dir, local_dir, latest_only, progress, session=early[0] if early else None)
    finally:
        for session in early:
            session.close()


def fetch_weights(conn, remote_dir: str, local_dir, latest_only: bool = False, progress: bool = True,
                  session: Session | None = None) -> FetchReport:
    """session: the transfer's, already logging in (connect_and_fetch); else it starts here, before the listing."""
    local = Path(local_dir).expanduser()
    local.mkdir(parents=True, exist_ok=True)
    session = session or Session(conn)
    try:
        files = remote_files(conn, remote_dir, latest_only, session.shell)
        if not any(n.endswith(".pt") for n in files):
            print(f"no checkpoints in {conn.host}:{remote_dir} yet")
        report = FetchReport()
        todo, complete = plan_fetch(conn, remote_dir, local, files, report, session.shell)
        total = sum(files[n].size - _part_size(local / n) for n in todo)
        free = free_bytes(local)
        if total > free:  # refuse before the first byte, not gigabytes in
            raise UserError(f"{local} has {human_bytes(free)} free and this fetch needs {human_bytes(total)} ({len(todo)} files): "
                            "make room there, fetch --latest-only, or fetch --to a disk with room")
        # Checkpoints complete here whose .fetched-NAME does not say so yet (a fetch that stopped, an older marker).
        unmarked = {posixpath.join(remote_dir, n): d for n, d in complete.items() if n.endswith(".pt") and files[n].marked != d}
        with tqdm(total=total, unit="B", unit_scale=True, desc="fetch", disable=not progress or None) as bar:
            transfer(conn, [Part(local / n, posixpath.join(remote_dir, n), files[n]) for n in todo], bar, report, unmarked, session)
        return report
    finally:
        session.close()


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


def fetched_marker(remote: str) -> str:
    return posixpath.join(posixpath.dirname(remote), contract.FETCHED_MARKER.format(name=posixpath.basename(remote)))


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
        """Exactly the bytes still missing, as listed, whatever became of the file: the files after it in the one
        stream keep their place.

        A log that grew since is cut where it was listed, and one cut short pads with zeros. A checkpoint never
        changes once written (the trainer renames a finished save into place), so when the file opened has the size
        listed, `tail` alone sends the rest of it: no second process copying every byte through one more pipe. One
        that is gone, or of another size (another run's of the same name), sends zeros instead, which the sha256
        refuses; where `stat` cannot tell the size it is cut and padded as a log is."""
        n, skip, src = self.size - self.start, f"+{self.start + 1}", shlex.quote(self.remote)
        if not self.verify:
            return f"{{ tail -c {skip} {src}; cat /dev/zero; }} 2>/dev/null | head -c {n}"
        zeros = f"head -c {n} /dev/zero"
        return (f'o=; {{ o=1; s=$(stat -L -c %s /dev/fd/3); if [ "$s" = {self.size} ]; then tail -c {skip} <&3; '
                f'elif [ -z "$s" ]; then {{ tail -c {skip} <&3; cat /dev/zero; }} | head -c {n}; else {zeros}; fi; }} '
                f'2>/dev/null 3< {src} || [ -n "$o" ] || {zeros}')


def stream_command(parts: list[Part], marks: list[str]) -> str:
    """The box's side of a transfer: the parts' bytes, one after the other; then, for each of `marks` (remote paths of
    checkpoints), a line on stdin: the sha256 to leave in its `.fetched-NAME` once the file is safe here (the box's cost
    guard, job/sidecar/guard.py, may terminate the instance only once the final checkpoint is safe somewhere), or `-`.
    A read-only weights dir only means the guard keeps waiting: the fetch itself succeeded."""
    steps = [p.command() for p in parts]
    if marks:
        targets = " ".join(shlex.quote(fetched_marker(m)) for m in marks)
        steps.append(f'for m in {targets}; do read -r d || break; [ "$d" = - ] || printf %s "$d" > "$m"; done 2>/dev/null')
    return "; ".join(steps) or ":"


def transfer(conn, parts: list[Part], bar, report: FetchReport, marks: dict[str, str] | None = None,
             session: Session | None = None) -> dict[str, str]:
    """All the parts in one stream (one SSH session: no per-file handshake), each verified as soon as its last byte is
    here, then flushed to disk and renamed into place by a second thread while the next file arrives; the box hashes
    what has no recorded digest on a second channel meanwhile. Once every file is in place the same session leaves
    `.fetched-NAME` beside each checkpoint verified, and beside those of `marks` ({remote path: sha256} of checkpoints
    already complete here). Returns {name: sha256} of the checkpoints verified."""
    marks = dict(marks or {})
    checked = [p for p in parts if p.verify]
    session = session or Session(conn)
    stream, shell = session.stream, session.shell
    if not parts and not marks:
        session.close()
        return {}
    shell.hash([p.remote for p in parts if p.verify and not p.known])
    stream.start(stream_command(parts, [*marks, *(p.remote for p in checked)]))
    verified, settled = {}, []
    try:
        with ThreadPoolExecutor(max_workers=1) as settler:  # on the way out it waits for what it was given
            write_back = (lambda *a: settler.submit(_write_back, *a)) if WRITE_BACK is not None else None
            for p in parts:
                _receive(p, stream, bar, write_back)
                if p.verify:  # a .part that failed is no start for the next run
                    box = p.known or shell.next_digest()
                    if box is None:
                        p.part.unlink()
                        raise unreadable(conn, p.remote)
                    if p.hash.hexdigest() != box:
                        p.part.unlink()
                        raise UserError(f"{p.dest.name}: the downloaded bytes do not match the box's sha256 (file changed during "
                                        "the copy?): run fetch-weights again")
                    verified[p.dest.name] = box
                settled.append((p, settler.submit(_settle, p)))
        safe = {p.dest.name for p, done in settled if done.exception() is None}
        stream.finish([*marks.values(), *(verified[p.dest.name] if p.dest.name in safe else "-" for p in checked)])
    finally:
        session.close()
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


def _sync_file_range():
    """sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE) where the C library has it (Linux), else None."""
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError, TypeError):
        return None
    call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return lambda fd, offset, length: call(fd, offset, length, 2)  # SYNC_FILE_RANGE_WRITE


WRITE_BACK = _sync_file_range()
WRITE_BACK_EVERY = 64 << 20


def _write_back(path: Path, offset: int, length: int) -> None:
    """Start writing these pages of the file to the disk now, so that the fsync before the rename has little left to
    wait for, instead of the whole file after its last byte came (0.6 s for 1.4 GB on the Xeon VM of
    docs/BENCHMARKS.md). It runs on the settling thread: the call waits whenever the disk's queue is full (another
    program's writes are enough), and the copy must not wait with it."""
    with contextlib.suppress(OSError):  # the .part gone (refused): nothing to write
        fd = os.open(path, os.O_RDONLY)
        try:
            WRITE_BACK(fd, offset, length)
        finally:
            os.close(fd)


def _receive(p: Part, stream: Stream, bar, write_back=None) -> None:
    """Append p's missing bytes from the stream to its .part, and hand every WRITE_BACK_EVERY bytes written to
    write_back(path, offset, length). A full disk keeps the .part for the next run to go on from."""
    need, flushed = p.size - p.start, p.start
    try:
        with open(p.part, "ab") as out:
            while need:
                piece = stream.read(min(need, READ))
                if not piece:
                    raise ConnectionLost(f"the copy of {p.remote} stopped after {human_bytes(p.size - need)} of "
                                         f"{human_bytes(p.size)}: run fetch-weights again; it goes on from {p.part.name}")
                out.write(piece)
                p.hash.update(piece)
                need -= len(piece)
                bar.update(len(piece))
                if write_back is not None and p.size - need - flushed >= WRITE_BACK_EVERY:
                    write_back(p.part, flushed, p.size - need - flushed)
                    flushed = p.size - need
    except OSError as e:
        if e.errno not in NO_SPACE:
            raise
        have = p.part.stat().st_size
        resume = f"; it goes on from the {human_bytes(have)} in {p.part.name}" if p.verify else ""
        raise UserError(f"no space left on the device for {p.dest} ({human_bytes(free_bytes(p.part))} free, "
                        f"{human_bytes(p.size - have)} still to copy): make room there and run fetch-weights again{resume}") from None


def _open(conn, cmd: str):
    transport = conn.client.get_transport()
    # paramiko starting a re-key itself races with the window adjustments of a fast download (it then fails with
    # "Key-exchange timed out", a known paramiko race); sshd re-keys on its own schedule (RekeyLimit, 1-4 GB by default),
    # which paramiko handles, so leave the re-keying to the box.
    transport.packetizer.REKEY_BYTES = transport.packetizer.REKEY_PACKETS = 2**62
    chan = transport.open_session(window_size=WINDOW, max_packet_size=PACKET)
    chan.exec_command(cmd)
    return chan


# What a login shell runs until the command is known: the command itself, as one line on stdin.
WAIT = 'IFS= read -r s && eval "$s"'


class Session:
    """What a fetch runs on the box: the stream of the files' bytes (Stream) and, beside it, a shell for the rest (Shell:
    the markers, the box's sha256). Both log in at once, before the files are known, and wait for their commands: the
    logins overlap the listing instead of following it."""

    def __init__(self, conn):
        self.stream, self.shell = Stream(conn), Shell(conn)

    def close(self) -> None:
        self.stream.close()
        self.shell.close()


class Shell:
    """A login shell on the box over a paramiko channel, kept open: it runs the fetch's small commands one after the
    other, each sent as one line, with no login of its own; the last, HASH_SCRIPT for the files sent, runs beside the
    stream. A few lines come back: paramiko's pace is no matter."""

    LOOP = 'while IFS= read -r s; do eval "$s"; done'

    def __init__(self, conn):
        self.conn, self.end = conn, secrets.token_hex(16)  # the line that ends each command's output
        self.chan = _open(conn, self.LOOP)
        self.lines = self.chan.makefile("rb")

    def run(self, cmd: str) -> str:
        """cmd's output (stderr left out), in a subshell: a `cd` stays in there."""
        if "\n" in cmd:  # a path with a newline in it: one line cannot carry the command
            return run(self.conn, cmd, warn=True).stdout
        self.chan.sendall(f"( {cmd} ) 2>/dev/null; printf '\\n%s\\n' {self.end}\n".encode())
        out = []
        while (line := self.lines.readline().decode(errors="replace")) != f"{self.end}\n":
            if not line:
                raise ConnectionLost(f"lost the SSH connection to {self.conn.host}: run fetch-weights again")
            out.append(line)
        return "".join(out)[:-1]  # less the newline printed before the end

    def hash(self, remotes: list[str]) -> None:
        """Start hashing these files; next_digest() gives their digests in turn."""
        if not remotes:
            return
        cmd = hash_command(remotes)
        if "\n" in cmd:
            self.close()
            self.chan = _open(self.conn, cmd)
            self.lines = self.chan.makefile("rb")
        else:
            self.chan.sendall(cmd.encode() + b"\n")

    def next_digest(self) -> str | None:
        """The box's sha256 of the next file; None where it could not read it."""
        return digest_in(self.lines.readline().decode(errors="replace"))

    def close(self) -> None:
        self.chan.close()


class Stream:
    """The output of a command on the box, and its stdin: through OpenSSH's client where there is one, else (or where
    it cannot log in as paramiko did: another key, an ssh_config of its own) over a paramiko channel.

    The ssh starts logging in at once, before the command is known: the box's shell waits for it on stdin (start).
    OpenSSH's output is read into one buffer that every read reuses, so the copy's loop allocates nothing."""

    def __init__(self, conn):
        self.conn, self.cmd, self.got = conn, ":", 0
        self.proc, self.chan = None, None
        self.buf = memoryview(bytearray(READ))
        self._launch(WAIT)

    def _launch(self, cmd: str) -> None:
        argv = openssh_command(self.conn, cmd)
        if argv is None:
            return
        # ssh's messages go to a file: a pipe nobody reads during the copy would stop ssh once it filled (a chatty login
        # shell on the box is enough).
        self.err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, bufsize=0)
        with contextlib.suppress(ImportError, AttributeError, OSError):  # Linux: a deeper pipe lets ssh decrypt on while this side hashes
            import fcntl

            fcntl.fcntl(self.proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, PIPE)

    def start(self, cmd: str) -> None:
        """Run cmd (one line for the waiting shell: a path with a newline in it needs a session of its own)."""
        self.cmd = cmd
        if self.proc is not None and "\n" in cmd:
            self.close()
            self._launch(cmd)
        elif self.proc is not None:
            with contextlib.suppress(OSError):  # ssh already gone: read() finds out why
                self.proc.stdin.write(cmd.encode() + b"\n")
        if self.proc is None:
            self.chan = _open(self.conn, cmd)

    def read(self, n: int):
        """Up to n bytes (valid until the next read); empty at the end of the output."""
        if self.chan is not None:
            return self.chan.recv(n)
        got = self.proc.stdout.readinto(self.buf[:n])
        if got:
            self.got += got
            return self.buf[:got]
        if self.proc.wait() != 255:  # 255: ssh's own failure, not the command's
            return b""
        self.err.seek(0)
        err = self.err.read(4096).decode(errors="replace")
        if self.got:
            raise ConnectionLost(f"ssh to {self.conn.host} failed during the copy ({' '.join(err.split())[:200]}): run "
                                 "fetch-weights again; it goes on from where it stopped")
        self.close()
        self.chan = _open(self.conn, self.cmd)
        return self.read(n)

    def finish(self, lines: list[str]) -> None:
        """Give the command the rest of its stdin, and wait for it to end (what it still prints is not wanted)."""
        data = "".join(f"{line}\n" for line in lines).encode()
        if self.chan is not None:
            with contextlib.suppress(OSError, EOFError):
                self.chan.sendall(data)
                self.chan.shutdown_write()
                while self.chan.recv(READ):
                    pass
            return
        with contextlib.suppress(OSError):  # ssh gone: the marks wait for the next fetch
            self.proc.stdin.write(data)
            self.proc.stdin.close()
        while self.proc.stdout.readinto(self.buf):
            pass
        self.proc.wait()

    def close(self) -> None:
        if self.chan is not None:
            self.chan.close()
        if self.proc is None:
            return
        if self.proc.poll() is None:  # stopped early (a full disk, a mismatch, nothing to do): the rest is not wanted
            self.proc.terminate()
        for f in (self.proc.stdin, self.proc.stdout, self.err):
            f.close()
        self.proc.wait()
        self.proc = None
