"""llm.c's .bin token shard: a header of 256 little-endian int32 (magic 20240520, version 1, the token count, the
rest zero), then the tokens as little-endian uint16. modded-nanogpt publishes FineWeb tokenized with GPT-2's tokenizer
in this format on the Hugging Face hub. Torch-free and numpy-free: job.data memory-maps these files, job.prepare
downloads and verifies them.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

MAGIC, VERSION = 20240520, 1
HEADER_INTS = 256
HEADER_BYTES = 4 * HEADER_INTS  # 1,024


def header(ntok: int) -> bytes:
    return struct.pack(f"<{HEADER_INTS}i", MAGIC, VERSION, ntok, *([0] * (HEADER_INTS - 3)))


def tokens_in(head: bytes, size: int) -> tuple[int | None, str | None]:
    """(token count, None) for a sound header given the file's size, else (None, what is wrong) in a few words."""
    if len(head) < 12:
        return None, f"not a .bin shard ({size:,} bytes, shorter than its {HEADER_BYTES:,}-byte header)"
    magic, version, ntok = struct.unpack("<3i", head[:12])
    if magic != MAGIC or version != VERSION:
        return None, f"not a .bin shard (magic {magic}, version {version}; llm.c's are {MAGIC}, {VERSION})"
    need = HEADER_BYTES + 2 * ntok
    if ntok < 0 or size != need:
        return None, (f"truncated ({size:,} bytes on disk, its header describes {need:,})" if size < need
                      else f"{size:,} bytes on disk, its header describes {need:,}")
    return ntok, None


def read_header(path: str | os.PathLike) -> tuple[int | None, str | None]:
    """tokens_in() for a file on disk; an unreadable file is a problem too."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
    except OSError as e:
        return None, e.strerror or str(e)
    return tokens_in(head, size)


def write(path: str | os.PathLike, tokens) -> None:
    """Write a .bin shard atomically (temp name, fsync, rename); tokens: a uint16 numpy array or anything with tobytes()."""
    path = Path(path)
    data = tokens.astype("<u2").tobytes() if hasattr(tokens, "astype") else bytes(tokens)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(header(len(data) // 2))
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
