"""sha256 of a file, shared by fetch-weights (laptop) and the S3 sync sidecar (box): no SSH imports here,
so the sidecar in the image needs neither fabric nor paramiko."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()
