"""The pipeline: documents from a Source, tokenized by the worker pool in order, cut into shards for the writer.

The token stream is every document's tokens preceded by <|endoftext|>, in source order. It is cut into the val
shard (sized by the split rule) and then train shards of `shard_size` tokens; a document that overflows a shard
finishes it and its remainder starts the next, and the last, partial shard is written too. Each cut is recorded
as (document, token offset in it), which is where a resumed run starts reading again.

While the split rule still depends on the corpus's size, the stream is committed as it comes, as staged shards of
`shard_size` tokens; once the rule is decided the final shards are cut from them (a staged shard that is a final one
as it is keeps its bytes under the final name), and the stream goes on into final shards. Nothing is held back in
memory but the shard being filled.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from job.errors import UserError, check_output_path
from job.prepare import encode, split
from job.prepare.common import BATCH_DOCS, SHARD_SIZE, default_workers
from job.prepare.manifest import open_out
from job.prepare.progress import Progress
from job.prepare.sources import MemorySource, Source
from job.prepare.staged import Staged
from job.prepare.writer import ShardWriter
from job.tokenizer import get_encoding


class Packer:
    """Fills shards from the tokenized batches and hands each full one to the writer with the documents it covers.

    A full shard is handed over only when the next token arrives, so the end of the stream always finds the last
    shard still here: finish() can refuse a corpus too small to train on before anything is committed.

    `size` is the shard being filled's (the val shard's, if it is the first). It starts at stream position `g`,
    `start` in the documents, with the tokens from `g` to the end of `staged` if given. stage=True fills staged shards.
    """

    def __init__(self, writer: ShardWriter, shard_size: int, size: int, g: int, start: tuple[int, int],
                 staged: Staged | None = None, stage: bool = False):
        self.writer, self.shard_size, self.val, self.stage = writer, shard_size, size, stage
        self.g, self.start = g, start  # global token position of the shard being filled, and (document, offset) there
        self.buf = np.empty(size, dtype=np.uint16)  # fineweb.py's all_tokens_np
        self.n = 0 if staged is None else staged.end - g
        if staged is not None:
            staged.read(g, self.buf[: self.n])
        doc, off = start if staged is None else staged.resume  # where the stream goes on: the next batch starts there
        self.pos, self.d0 = g + self.n - off, doc  # global position and index of the next batch's first document

    def resume(self) -> tuple[int, int]:
        """Where in the documents the stream goes on after the tokens taken so far."""
        return self.d0, self.g + self.n - self.pos

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
        at, self.g = self.g, self.g + self.n
        k = int(np.searchsorted(ends, self.g, side="right"))  # the document the next shard starts in
        end = (self.d0 + k, self.g - int(ends[k - 1] if k else self.pos)) if k < len(ends) else (self.d0 + len(ends), 0)
        if self.stage:
            self.writer.stage(self.buf, at, self.start, end, list(unit_rows))
        else:
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


def _unstage(writer: ShardWriter, shard_size: int, val: int, staged: Staged, unit_rows: list[int]) -> Packer:
    """Commit the shards that the staged tokens fill, now that the split is known, and return the Packer that goes on
    from there with the rest of them. A staged shard that is a final one as it is (val is a full shard) is adopted
    under its final name instead of being written again. The writer has committed all it was handed."""
    shards, pending = writer.manifest["shards"], list(writer.manifest["pending"])
    lo, size = sum(s["tokens"] for s in shards), val if not shards else shard_size
    while lo + size < staged.end:  # the last shard stays in the Packer until the next token comes (Packer's docstring)
        same = next((e for e in pending if e["at"] == lo and e["tokens"] == size), None)
        if same is not None:
            writer.adopt(same, list(unit_rows))
        else:
            writer.wait()  # one shard's copy at a time: memory stays at the staged head and one shard
            tokens = np.empty(size, dtype=np.uint16)
            staged.read(lo, tokens)
            writer.submit(tokens, staged.locate(lo), staged.locate(lo + size), list(unit_rows))
            del tokens  # the writer's now: its memory goes back once written
        lo, size = lo + size, shard_size
    writer.wait()
    return Packer(writer, shard_size, size, lo, staged.locate(lo), staged)


def _pack(results: Iterator, writer: ShardWriter, progress: Progress, shard_size: int, resume: tuple[int, int],
          unit_rows: list[int], label: str, large: bool = False) -> dict:
    """Cut the tokenized stream into shards; returns the run's totals."""
    m = writer.manifest
    g = m["pending"][-1]["at"] + m["pending"][-1]["tokens"] if m["pending"] else sum(s["tokens"] for s in m["shards"])
    head, at, start = np.empty(0, dtype=np.uint16), g, resume
    need = 0 if large or m["shards"] else split.decided_after(shard_size)
    if m["shards"]:
        val = m["shards"][0]["tokens"]  # the split was made when the val shard was committed
    elif not need:
        val = min(shard_size, split.VAL_MAX)
    else:
        # The split waits for `need` tokens or the end of the corpus: stage the stream until then.
        stager = Packer(writer, shard_size, shard_size, g, resume, stage=True)
        while stager.g + stager.n < need and (batch := next(results, None)) is not None:
            progress.update(len(batch[1]), stager.add(*batch, unit_rows))
        head, at, start, resume = stager.buf[: stager.n], stager.g, stager.start, stager.resume()
        del stager
        val = split.val_size(at + len(head), shard_size)
    if large or (need and at + len(head) >= need):
        print(split.describe(val, None), flush=True)
    writer.wait()  # every staged shard handed over is on disk and in the manifest
    packer = _unstage(writer, shard_size, val, Staged(writer.out, m["pending"], head, at, start, resume), unit_rows)
    del head
    for tokens, lengths in results:
        progress.update(len(lengths), packer.add(tokens, lengths, unit_rows))
    return packer.finish(label, unit_rows)


def _tokenize(source: Source, out: Path, manifest: dict, shard_size: int, prefix: str, workers: int, batch_docs: int,
              progress_every: float) -> tuple[dict, Progress]:
    """Run the pool over the source from where the manifest ends; returns the totals and the progress counters."""
    shards, pending = manifest["shards"], manifest["pending"]
    done = sum(s["tokens"] for s in shards)
    # where the stream goes on: after the staged shards, if any, else after the committed ones
    last = pending[-1] if pending else shards[-1] if shards else None
    g = last["at"] + last["tokens"] if pending else done
    doc, off = last["end"] if last else (0, 0)  # document `doc`, token `off` of it
    if last:
        staged = f", {len(pending)} staged ({g - pending[0]['at']:,} tokens)" if pending else ""
        print(f"resuming {out}: {len(shards)} shards ({done:,} tokens) already complete{staged}, restarting at document {doc:,}")
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
        staged = f" and {len(manifest['pending'])} staged" if manifest["pending"] else ""
        print(f"interrupted: {len(manifest['shards'])} complete shards{staged} kept in {out}; run the same command to resume",
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
    t0 = time.time()
    resumed = len(shards), sum(e["tokens"] for e in manifest["pending"])
    final, progress = _tokenize(source, out, manifest, shard_size, prefix, workers, batch_docs, progress_every)
    shards, total = manifest["shards"], final["tokens"]
    kept = " and ".join(([f"{resumed[0]} of them"] if resumed[0] else []) + ([f"{resumed[1]:,} staged tokens"] if resumed[1] else []))
    kept = f" ({kept} kept from the interrupted run)" if kept else ""
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
