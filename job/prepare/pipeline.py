"""The pipeline: documents from a Source, tokenized by the worker pool in order, cut into shards for the writer.

The token stream is every document's tokens preceded by <|endoftext|>, in source order. It is cut into the val
shard (sized by the split rule) and then train shards of `shard_size` tokens; a document that overflows a shard
finishes it and its remainder starts the next, and the last, partial shard is written too. Each cut is recorded
as (document, token offset in it), which is where a resumed run starts reading again.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from job.errors import UserError, check_output_path
from job.prepare import encode, split
from job.prepare.common import BATCH_DOCS, SHARD_SIZE, default_workers
from job.prepare.manifest import open_out
from job.prepare.progress import Progress
from job.prepare.sources import MemorySource, Source
from job.prepare.writer import ShardWriter
from job.tokenizer import get_encoding


class Packer:
    """Fills shards from the tokenized batches and hands each full one to the writer with the documents it covers.

    A full shard is handed over only when the next token arrives, so the end of the stream always finds the last
    shard still here: finish() can refuse a corpus too small to train on before anything is committed.
    """

    def __init__(self, writer: ShardWriter, shard_size: int, val: int, g: int, start: tuple[int, int]):
        self.writer, self.shard_size, self.val = writer, shard_size, val
        self.g, self.start = g, start  # global token position of the shard being filled, and (document, offset) there
        self.pos, self.d0 = g - start[1], start[0]  # global position and index of the next batch's first document
        self.buf = np.empty(val if writer.index == 0 else shard_size, dtype=np.uint16)  # fineweb.py's all_tokens_np
        self.n = 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray, unit_rows: list[int]) -> int:
        """Take one batch (its tokens and each document's length); returns the tokens that were new to the shards."""
        ends = self.pos + np.cumsum(lengths)
        drop = self.g + self.n - self.pos  # the resumed document's tokens that the committed shards already hold
        t = tokens[drop:] if drop > 0 else tokens
        while len(t):  # a loop, not fineweb.py's single split, so one document may span several shards
            if self.n == len(self.buf):
                self._cut(ends, unit_rows)
            take = min(len(self.buf) - self.n, len(t))
            self.buf[self.n : self.n + take] = t[:take]
            self.n, t = self.n + take, t[take:]
        self.pos, self.d0 = int(ends[-1]), self.d0 + len(lengths)
        return len(tokens) - max(drop, 0)

    def _cut(self, ends: np.ndarray, unit_rows: list[int]) -> None:
        self.g += self.n
        k = int(np.searchsorted(ends, self.g, side="right"))  # the document the next shard starts in
        end = (self.d0 + k, self.g - int(ends[k - 1] if k else self.pos)) if k < len(ends) else (self.d0 + len(ends), 0)
        self.writer.submit(self.buf, self.start, end, list(unit_rows))
        self.buf, self.n, self.start = np.empty(self.shard_size, dtype=np.uint16), 0, end

    def finish(self, label: str, unit_rows: list[int]) -> dict:
        """Commit the last shard and mark the run complete; returns the totals recorded in the manifest."""
        docs, total = self.d0, self.g + self.n
        if docs == 0:
            raise UserError(f"{label} has no documents: nothing to tokenize")
        if total == docs:
            raise UserError(f"{label} has only empty documents ({docs:,}): nothing to tokenize")
        if self.writer.index == 0:  # nothing cut yet: every token is in the val shard, none would train
            raise split.too_small(label, total, self.val)
        final = {"documents": docs, "tokens": total, "units": list(unit_rows)}
        if self.n:
            self.writer.submit(self.buf[: self.n], self.start, (docs, 0), list(unit_rows), final)
        self.writer.finish(final)
        return final


def _hold(results: Iterator, need: int, progress: Progress) -> tuple[deque, int]:
    """The first results, until `need` tokens have come or the stream ended, and the tokens they hold."""
    held, seen = deque(), 0
    while seen < need:
        try:
            tokens, lengths = next(results)
        except StopIteration:
            break
        held.append((tokens, lengths))
        seen += len(tokens)
        progress.update(len(lengths), len(tokens))
    return held, seen


def _pack(results: Iterator, writer: ShardWriter, progress: Progress, shard_size: int, start: tuple[int, int],
          unit_rows: list[int], label: str, large: bool = False) -> dict:
    """Cut the tokenized stream into shards; returns the run's totals."""
    g = sum(s["tokens"] for s in writer.manifest["shards"])
    held, val = deque(), shard_size  # resumed past the val shard: the split was made when it was committed
    if writer.index == 0:
        need = 0 if large else split.decided_after(shard_size)
        held, seen = _hold(results, need, progress)
        val = split.val_size(seen, shard_size) if need else min(shard_size, split.VAL_MAX)
        if large or (need and seen >= need):
            print(split.describe(val, None), flush=True)
    packer = Packer(writer, shard_size, val, g, start)
    while held:  # popped one by one: each batch's memory goes back once it is in a shard
        packer.add(*held.popleft(), unit_rows)
    for tokens, lengths in results:
        progress.update(len(lengths), packer.add(tokens, lengths, unit_rows))
    return packer.finish(label, unit_rows)


def _tokenize(source: Source, out: Path, manifest: dict, shard_size: int, prefix: str, workers: int, batch_docs: int,
              progress_every: float) -> tuple[dict, Progress]:
    """Run the pool over the source from where the manifest ends; returns the totals and the progress counters."""
    shards = manifest["shards"]
    g = sum(s["tokens"] for s in shards)  # tokens in the committed shards = global position of the next shard
    doc, off = shards[-1]["end"] if shards else (0, 0)  # where that shard starts: document `doc`, token `off` of it
    if shards:
        print(f"resuming {out}: {len(shards)} shards ({g:,} tokens) already complete, restarting at document {doc:,}")
    unit_rows = list(manifest["units"])
    pool = encode.pool(workers) if workers > 1 else None  # first: before this function starts any thread of its own
    progress = Progress(doc, g, progress_every)
    counting = threading.Thread(target=lambda: progress.set_total(source.total_docs()), daemon=True)
    counting.start()
    writer = ShardWriter(out, manifest, prefix)
    batches = source.batches(doc, unit_rows, batch_docs)
    ok = refused = False
    try:
        # imap keeps document order; each task is a whole batch, so the hand-off cost is paid per --batch-docs documents
        results = pool.imap(encode.encode_batch, batches) if pool else map(encode.encode_batch, batches)
        final = _pack(iter(results), writer, progress, shard_size, (doc, off), unit_rows, source.label, source.large)
        ok = True
    except UserError:
        refused = True  # its error line is the last line
        raise
    except KeyboardInterrupt:
        if pool:
            pool.terminate()
            pool = None
        writer.close()  # the shards handed over are complete: commit them, they save work on the resume
        print(f"interrupted: {len(manifest['shards'])} complete shards kept in {out}; run the same command to resume",
              file=sys.stderr)
        raise
    finally:
        counting.join(timeout=5)  # the last progress line shows the total when counting was nearly done (short runs)
        progress.close(last_line=not refused)
        if pool:
            pool.terminate()
        if not ok and writer.thread.is_alive():
            try:
                writer.close()
            except UserError:
                pass  # the error being raised already says what went wrong first
        batches.close()  # stop the readers (the pool's feeder thread is gone, so nobody runs the generator now)
    return final, progress


def _check_settings(shard_size: int, prefix: str, workers: int | None, batch_docs: int) -> int:
    """Refuse bad settings before touching anything; returns the number of workers."""
    if shard_size < 1:
        raise UserError(f"--shard-size must be at least 1 token, got {shard_size}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", prefix) or "train" in prefix or "val" in prefix:
        # the trainer tells splits apart by `train`/`val` anywhere in the file name (data.list_shards)
        raise UserError(f"--prefix {prefix!r} must be letters, digits, '._-' and not contain 'train' or 'val'")
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if batch_docs < 1:
        raise UserError(f"--batch-docs must be at least 1, got {batch_docs}")
    return workers


def prepare(source: Source, out_dir, shard_size: int = SHARD_SIZE, prefix: str = "data", workers: int | None = None,
            overwrite: bool = False, batch_docs: int = BATCH_DOCS, progress_every: float = 30.0) -> list[Path]:
    """Tokenize `source` into shards `{prefix}_{val|train}_{index:06d}.npy` in out_dir; returns their paths, val first.

    Resumes the run recorded in out_dir's manifest if it is the same source and settings.
    """
    workers = _check_settings(shard_size, prefix, workers, batch_docs)
    out = Path(out_dir)
    check_output_path(out, "--out", directory=True)  # a read-only place refused now, not after the first shard
    identity = {**source.identity, "max_docs": source.max_docs, "shard_size": shard_size, "prefix": prefix, "tokenizer": "gpt2"}
    manifest = open_out(out, identity, prefix, overwrite)
    shards = manifest["shards"]
    if manifest["complete"]:
        print(f"{out} is already complete: {len(shards)} shards, {manifest['tokens']:,} tokens from {manifest['documents']:,} "
              f"documents (pass --overwrite to redo it; `python -m job.prepare verify {out}` checks it)")
        return [out / s["name"] for s in shards]
    out.mkdir(parents=True, exist_ok=True)
    get_encoding()  # verify the tokenizer files here, once, before the workers load them
    resumed, t0 = len(shards), time.time()
    final, progress = _tokenize(source, out, manifest, shard_size, prefix, workers, batch_docs, progress_every)
    shards, total = manifest["shards"], final["tokens"]
    kept = f" ({resumed} of them kept from the interrupted run)" if resumed else ""
    print(split.describe(shards[0]["tokens"], total))
    print(
        f"wrote {len(shards)} shards to {out} (1 val, {len(shards) - 1} train): {total:,} tokens from {final['documents']:,} "
        f"documents in {time.time() - t0:.1f}s ({progress.rate() / 1e6:.2f}M tok/s this run){kept}"
    )
    return [out / s["name"] for s in shards]


def prepare_documents(docs: Iterable[str], out_dir, shard_size: int = SHARD_SIZE, prefix: str = "data", workers: int | None = None,
                      overwrite: bool = False, batch_docs: int = BATCH_DOCS) -> list[Path]:
    """prepare() for documents held in memory as strings."""
    return prepare(MemorySource(docs), out_dir, shard_size, prefix, workers, overwrite, batch_docs)
