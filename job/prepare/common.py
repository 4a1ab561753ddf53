"""Names, sizes and small helpers shared by the modules of job.prepare."""

from __future__ import annotations

import os
import re

from job import contract

SHARD_SIZE = 100_000_000  # build-nanogpt's: 100M tokens, 200 MB per shard
# documents per tokenizer task (a few hundred KB of FineWeb text): the hand-off cost is amortized, and a task fits
# the widened pipe (encode._widen_pipes) twice; docs/BENCHMARKS.md has the throughput measured with it
BATCH_DOCS = 128
MANIFEST = contract.PREPARE_MANIFEST  # the launcher reads the same name to tell finished data from a partial run
MANIFEST_VERSION = 1
# edufineweb_train_000001.npy, as build-nanogpt names them
PREFIXES = {"text": "data", "fineweb-edu": "edufineweb", "fineweb": "fineweb"}
SHARD_NAME = re.compile(r"^(?P<prefix>.+)_(?P<split>val|train)_(?P<index>\d{6})\.(npy|bin)$")
# data_pending_000003.npy: a shard's worth of tokens staged on disk until the val split is decided (split.py); neither
# `train` nor `val` is in the name, so the trainer never reads one
PENDING_NAME = re.compile(r"^(?P<prefix>.+)_pending_(?P<index>\d{6})\.npy$")


def shard_name(prefix: str, index: int) -> str:
    """The file name of shard `index`: the first shard is val, the rest are train (build-nanogpt's naming)."""
    return f"{prefix}_{'val' if index == 0 else 'train'}_{index:06d}.npy"


def pending_name(prefix: str, index: int) -> str:
    """The file name of the `index`-th staged shard (shard_size tokens from index * shard_size on)."""
    return f"{prefix}_pending_{index:06d}.npy"


def reason(e: BaseException) -> str:
    # datasets/pyarrow errors can be pages long; the first line says what went wrong
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300]}" if lines else type(e).__name__


def default_workers() -> int:
    # the CPUs this process may use (a container's cpuset), not every core of the host
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
