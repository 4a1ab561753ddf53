"""Tokenizing, in a pool of worker processes: each task is one packed batch of documents, and the pool hands the
results back in the order the batches went in, so the shards do not depend on the number of workers."""

from __future__ import annotations

import ctypes
import fcntl
import multiprocessing as mp
import os
import signal
import sys
import threading
from pathlib import Path

import numpy as np

from job.tokenizer import EOT, get_encoding


def encode_batch(batch: tuple[np.ndarray, bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of a batch of documents, each preceded by EOT as in build-nanogpt, and each document's length."""
    offsets, data = batch
    enc = get_encoding()
    # encode_to_numpy with no special tokens is encode_ordinary (a literal "<|endoftext|>" in a document stays text),
    # but hands back a numpy buffer instead of a list of Python ints
    parts = [enc.encode_to_numpy(data[a:b].decode("utf-8"), disallowed_special=()) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    lengths = np.fromiter((len(p) + 1 for p in parts), dtype=np.int64, count=len(parts))
    ends = np.cumsum(lengths)
    tokens = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.uint16)  # GPT-2 ids < 50257 fit uint16
    tokens[ends - lengths] = EOT
    for start, part in zip(ends - lengths + 1, parts, strict=True):
        tokens[start : start + len(part)] = part
    return tokens, lengths


def _worker_init(parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle: it stops the pool
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked worker inherits main()'s handler; Pool.terminate needs the default
    if sys.platform.startswith("linux"):
        # Die with the main process: a pool worker whose parent was SIGKILLed would otherwise wait forever.
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
    get_encoding()


def pool(workers: int):
    """A pool of `workers` tokenizer processes, ready for imap(encode_batch, ...)."""
    # fork: workers start at once with the tokenizer already built (spawn makes each one import the modules and parse
    # the BPE files again, which is most of a small run). But a fork copies locks held by other threads, so it is used
    # only while this process runs no other thread; otherwise spawn.
    method = "fork" if "fork" in mp.get_all_start_methods() and threading.active_count() == 1 else "spawn"
    p = mp.get_context(method).Pool(workers, _worker_init, (os.getpid(),))
    _widen_pipes(p)
    return p


def _widen_pipes(pool) -> None:
    """Give the pool's task and result pipes 1 MiB instead of 64 KiB (Linux).

    A task (a few hundred KB of text) through a 64 KiB pipe needs the main process on a CPU for as long as the worker
    reads it, so on a busy machine idle workers wait for it to be scheduled. With room for several tasks in the pipe
    the main process fills it ahead and the workers read at their own pace.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        size = min(int(Path("/proc/sys/fs/pipe-max-size").read_text()), 1 << 20)
        for q in (pool._inqueue, pool._outqueue):  # multiprocessing's SimpleQueues: a pipe each, the size is the pipe's
            fcntl.fcntl(q._writer.fileno(), 1031, size)  # F_SETPIPE_SZ
    except (OSError, ValueError, AttributeError):
        pass  # an optimization only: the default pipes work, just with less slack
