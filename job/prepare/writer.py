"""Committing shards: each one written to a temp name, fsynced, renamed, then recorded in the manifest.

The same for the staged shards (pending, until the val split is decided: job/prepare/split.py), and for a staged
shard that turns out to be a final one as it is: it is hard-linked to its final name, so its bytes are not written twice.
"""

from __future__ import annotations

import errno
import hashlib
import os
import queue
import shutil
import threading
import time
from pathlib import Path

import numpy as np

from job.errors import UserError
from job.fsutil import fsync_dir, retry_advice, write_failure
from job.prepare.common import pending_name, shard_name
from job.prepare.manifest import npy_header, write_manifest

# Fault injection for the interruption test: seconds to hold a half-written temp shard open before finishing it.
DELAY_ENV = "NANOGPT_TEST_PREPARE_DELAY"


# A file system that cannot hard-link (some network and FUSE mounts) gets a staged shard copied to its final name instead.
NO_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV, errno.ENOSYS)


class ShardWriter:
    """Commits shards from a background thread, in order: temp file, fsync, rename, then the manifest.

    With many workers a 100M-token shard fills quickly; hashing and fsyncing its 200 MB in the main loop would
    stall the pool, so that happens here while the next shard fills. One shard at a time: a shard is handed over once
    the one before it is committed, so the memory held is the shard being written and the one being filled.
    """

    def __init__(self, out: Path, manifest: dict, prefix: str):
        self.out, self.manifest, self.prefix = out, manifest, prefix
        self.index = len(manifest["shards"])
        self.staged = len(manifest["pending"])  # staging only happens before the first shard: no staged shard is gone yet
        self.error: BaseException | None = None
        self.why = ""  # the error in a few words, worked out where it happened
        self.q: queue.Queue = queue.Queue()
        self.delay = float(os.environ.get(DELAY_ENV, "0") or 0)
        self.thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self.thread.start()

    def _put(self, item) -> None:
        self.wait()
        self.q.put(item)

    def submit(self, tokens: np.ndarray, start: tuple[int, int], end: tuple[int, int], units: list[int],
               final: dict | None = None) -> None:
        """Commit the next shard."""
        name = shard_name(self.prefix, self.index)
        self.index += 1
        self._put(("shard", name, tokens, start, end, units, final))

    def stage(self, tokens: np.ndarray, at: int, start: tuple[int, int], end: tuple[int, int], units: list[int]) -> None:
        """Commit the next staged shard, which holds the stream's tokens from position `at` on."""
        name = pending_name(self.prefix, self.staged)
        self.staged += 1
        self._put(("stage", name, tokens, start, end, units, None, at))

    def adopt(self, staged: dict, units: list[int]) -> None:
        """Commit the staged shard `staged` (a manifest entry) as the next shard: it holds exactly that shard's tokens."""
        name = shard_name(self.prefix, self.index)
        self.index += 1
        self._put(("adopt", name, staged, staged["start"], staged["end"], units, None))

    def wait(self) -> None:
        """Return once everything handed over is committed (the manifest is then the writer's no longer)."""
        self.q.join()
        if self.error is not None:
            raise self._failure()

    def finish(self, final: dict) -> None:
        """Mark the manifest complete (after the last shard, if any, is committed) and wait for the thread."""
        self._put(("end", None, None, None, None, None, final))
        self.close()

    def close(self) -> None:
        """Let the shards already handed over finish, then stop; raise what went wrong in the thread."""
        if self.thread.is_alive():
            self.q.put(StopIteration)
            self.thread.join()
        if self.error is not None:
            raise self._failure()

    def _run(self) -> None:
        while (item := self.q.get()) is not StopIteration:
            if self.error is None:
                try:
                    self._commit(*item)
                except BaseException as e:
                    self.why = write_failure(e, self.out, item[2].nbytes if isinstance(item[2], np.ndarray) else 0)
                    self.error = e
            del item  # the shard's memory goes back now, not when the next one comes
            self.q.task_done()
        self.q.task_done()

    def _failure(self) -> UserError:
        advice = retry_advice(self.error, self.out, "--out", "run the same command to go on from them")
        err = UserError(f"cannot write shards to {self.out}: {self.why}; the shards already written stay: {advice}")
        err.__cause__ = self.error
        return err

    def _commit(self, kind, name, tokens, start, end, units, final, at=None) -> None:
        m, used = self.manifest, []
        if kind in ("shard", "stage"):
            ntok, sha256 = len(tokens), self._write(name, tokens)
        elif kind == "adopt":
            ntok, sha256 = tokens["tokens"], tokens["sha256"]
            self._link(tokens["name"], name)
        if kind == "stage":
            m["pending"].append({"name": name, "at": int(at), "tokens": int(ntok), "sha256": sha256,
                                 "start": [int(x) for x in start], "end": [int(x) for x in end]})
            m["units"] = units
        elif kind != "end":
            m["shards"].append({"name": name, "split": "val" if name.split("_")[-2] == "val" else "train",
                                "tokens": int(ntok), "sha256": sha256, "start": [int(x) for x in start], "end": [int(x) for x in end]})
            m["units"] = units
            # the staged shards whose every token is now in a shard: dropped from the manifest first, then from the disk
            done = sum(s["tokens"] for s in m["shards"])
            used = [e for e in m["pending"] if e["at"] + e["tokens"] <= done]
            m["pending"] = [e for e in m["pending"] if e["at"] + e["tokens"] > done]
        if final is not None:
            m.update(final, complete=True)
        write_manifest(self.out, m)
        fsync_dir(self.out)
        for e in used:
            (self.out / e["name"]).unlink(missing_ok=True)

    def _write(self, name: str, tokens: np.ndarray) -> str:
        """Write a shard under its name (temp file, fsync, rename); returns its sha256."""
        header = npy_header(len(tokens))
        digest = hashlib.sha256(header)
        tmp = self.out / f".{name}.tmp"
        try:
            self._write_shard(tmp, header, tokens, digest)
        except BaseException:
            tmp.unlink(missing_ok=True)  # give the space back: the error message reports what is free
            raise
        os.replace(tmp, self.out / name)
        return digest.hexdigest()

    def _link(self, staged: str, name: str) -> None:
        """Give the staged shard `staged` its final name too. The staged one stays until the manifest has let it go:
        a kill in between leaves both names, and the resume drops the one the manifest does not list."""
        tmp = self.out / f".{name}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(self.out / staged, tmp)
        except OSError as e:
            if e.errno not in NO_LINKS:
                raise
            try:
                with open(self.out / staged, "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 24)
                    dst.flush()
                    os.fsync(dst.fileno())
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        os.replace(tmp, self.out / name)

    def _write_shard(self, tmp: Path, header: bytes, tokens: np.ndarray, digest) -> None:
        with open(tmp, "wb") as f:
            f.write(header)
            data = memoryview(tokens).cast("B")
            if self.delay:
                half = len(data) // 4 * 2
                f.write(data[:half])
                f.flush()
                time.sleep(self.delay)
                data = data[half:]
                digest.update(memoryview(tokens).cast("B")[:half])
            f.write(data)
            digest.update(data)
            f.flush()
            os.fsync(f.fileno())
