"""File-system helpers shared by the checkpoint writer and the shard writer (no torch import: job.prepare's
tokenizer workers stay light)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable: after a crash the new name is there, not just the data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
