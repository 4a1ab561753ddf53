"""Committing shards: each one written to a temp name, fsynced, renamed, then recorded in the manifest."""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from pathlib import Path

import numpy as np

from job.errors import UserError
from job.fsutil import fsync_dir, retry_advice, write_failure
from job.prepare.common import shard_name
from job.prepare.manifest import npy_header, write_manifest

# Fault injection for the interruption test: seconds to hold a half-written temp shard open before finishing it.
DELAY_ENV = "NANOGPT_TEST_PREPARE_DELAY"


class ShardWriter:
    """Commits shards from a background thread, in order: temp file, fsync, rename, then the manifest.

    With many workers a 100M-token shard fills quickly; hashing and fsyncing its 200 MB in the main loop would
    stall the pool, so that happens here while the next shard fills.
    """

    def __init__(self, out: Path, manifest: dict, prefix: str):
        self.out, self.manifest, self.prefix = out, manifest, prefix
        self.index = len(manifest["shards"])
        self.error: BaseException | None = None
        self.why = ""  # the error in a few words, worked out where it happened
        self.q: queue.Queue = queue.Queue(maxsize=1)
        self.delay = float(os.environ.get(DELAY_ENV, "0") or 0)
        self.thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self.thread.start()

    def _put(self, item) -> None:
        while True:
            if self.error is not None:
                raise self._failure()
            try:
                self.q.put(item, timeout=0.5)
                return
            except queue.Full:
                pass

    def submit(self, tokens: np.ndarray, start: tuple[int, int], end: tuple[int, int], units: list[int],
               final: dict | None = None) -> None:
        name = shard_name(self.prefix, self.index)
        self.index += 1
        self._put((name, tokens, start, end, units, final))

    def finish(self, final: dict) -> None:
        """Mark the manifest complete (after the last shard, if any, is committed) and wait for the thread."""
        self._put((None, None, None, None, None, final))
        self.close()

    def close(self) -> None:
        """Let the shards already handed over finish, then stop; raise what went wrong in the thread."""
        if self.thread.is_alive():
            self._put(StopIteration)
            self.thread.join()
        if self.error is not None:
            raise self._failure()

    def _run(self) -> None:
        while (item := self.q.get()) is not StopIteration:
            if self.error is None:
                try:
                    self._commit(*item)
                except BaseException as e:
                    self.why = write_failure(e, self.out, 0 if item[1] is None else item[1].nbytes)
                    self.error = e

    def _failure(self) -> UserError:
        advice = retry_advice(self.error, self.out, "--out", "run the same command to go on from them")
        err = UserError(f"cannot write shards to {self.out}: {self.why}; the shards already written stay: {advice}")
        err.__cause__ = self.error
        return err

    def _commit(self, name, tokens, start, end, units, final) -> None:
        if name is not None:
            header = npy_header(len(tokens))
            digest = hashlib.sha256(header)
            tmp = self.out / f".{name}.tmp"
            try:
                self._write_shard(tmp, header, tokens, digest)
            except BaseException:
                tmp.unlink(missing_ok=True)  # give the space back: the error message reports what is free
                raise
            os.replace(tmp, self.out / name)
            self.manifest["shards"].append({"name": name, "split": "val" if name.split("_")[-2] == "val" else "train",
                                            "tokens": int(len(tokens)), "sha256": digest.hexdigest(),
                                            "start": [int(x) for x in start], "end": [int(x) for x in end]})
            self.manifest["units"] = units
        if final is not None:
            self.manifest.update(final, complete=True)
        write_manifest(self.out, self.manifest)
        fsync_dir(self.out)

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
