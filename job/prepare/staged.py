"""The token stream as far as it is known before the val split is decided: the staged shards on disk, then the tokens
still in memory. The final shards are cut from it at any position (job/prepare/split.py says where).

A cut needs the document range of each shard, as (document, token offset in it). The tokens say it: every document
starts with <|endoftext|> and no text encodes to it, so counting EOTs from a known point locates any position.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from job.tokenizer import EOT

BLOCK = 1 << 16  # tokens scanned at a time: the scans' temporaries stay small beside a shard


class Staged:
    """The stream from the first staged shard's position to `end`, readable and locatable at any position in it.

    pending: the manifest's staged shards (in order, without gaps); head: the tokens that follow them, from `at` on,
    `start` being where in the documents `at` lies; resume: where in the documents `end` lies (the stream goes on from
    there: the next batch's first document, or the middle of one on a resume).
    """

    def __init__(self, out: Path, pending: list[dict], head: np.ndarray, at: int, start: tuple[int, int], resume: tuple[int, int]):
        self.parts = [(e["at"], out / e["name"], tuple(e["start"])) for e in pending]
        if len(head):
            self.parts.append((at, head, start))
        self.lengths = [e["tokens"] for e in pending] + ([len(head)] if len(head) else [])
        self.end, self.resume = at + len(head), resume

    def _tokens(self, i: int) -> np.ndarray:
        part = self.parts[i][1]
        return np.load(part, mmap_mode="r") if isinstance(part, Path) else part  # a staged shard is read from the page cache

    def read(self, lo: int, into: np.ndarray) -> None:
        """Fill `into` with the tokens from position `lo` on."""
        hi, n = lo + len(into), 0
        for i, (at, _, _) in enumerate(self.parts):
            a, b = max(lo, at), min(hi, at + self.lengths[i])
            if a < b:
                into[a - lo : b - lo] = self._tokens(i)[a - at : b - at]
                n += b - a
        if n != len(into):
            raise AssertionError(f"tokens {lo:,}..{hi:,} are not all staged")

    def locate(self, pos: int) -> tuple[int, int]:
        """(document, token offset in it) of the token at stream position `pos` (`end`: where the stream goes on)."""
        if pos == self.end:
            return self.resume
        for i, (at, _, (doc, off)) in enumerate(self.parts):
            if at <= pos < at + self.lengths[i]:
                tokens = self._tokens(i)[: pos - at + 1]
                last = _last_eot(tokens)
                if last < 0:
                    return doc, off + pos - at  # still in the document the part starts in
                # a part that starts at a document (offset 0) starts with that document's EOT
                starts = sum(int(np.count_nonzero(tokens[k : min(k + BLOCK, last + 1)] == EOT)) for k in range(0, last + 1, BLOCK))
                return doc + starts - (off == 0), pos - at - last
        raise AssertionError(f"position {pos:,} is not staged")


def _last_eot(tokens: np.ndarray) -> int:
    """Index of the last EOT in tokens, or -1."""
    hi = len(tokens)
    while hi > 0:
        lo = max(0, hi - BLOCK)
        hits = np.flatnonzero(tokens[lo:hi] == EOT)
        if len(hits):
            return lo + int(hits[-1])
        hi = lo
    return -1
