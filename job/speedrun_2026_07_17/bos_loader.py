"""The training data of modded-nanogpt's record of 2026-07-17: sequences that start at a document's first token,
cut as its eight ranks cut them, on any number of ranks.

A step of B tokens is eight sequences of B/8 (+1 for the last target), one per rank of the record. Each is filled
from the shard's next documents in order (a document starts at <|endoftext|>): a document longer than the step's
sequence length gives only its first `seq_len` tokens, and the one that overflows the sequence is cut where the
sequence ends; either way the rest of it is skipped, and the next sequence starts at the next document. When the
shard has not enough documents left for all eight, the step is taken from the start of the next shard instead (after
the last shard, the first: the record stops there).

On fewer ranks the trainer accumulates gradients over micro-steps, and micro-step a of rank r gets the record's
sequence a * world + r: the step is planned for eight whatever the number of ranks (the record plans one
micro-step's sequences at a time, so with fewer ranks its steps at a shard's end differ from its eight-rank run's).

Each sequence comes with the record's document boundaries (`cum_seqlens`, padded with its length to a fixed size, so
the attention's compiled graph sees one shape) and its bigram hashes (`bigram_hash`), the input of the bigram
embedding. Validation reads unaligned windows (the record's), through job.data's loader.

Where the record reads a whole shard into memory and finds its documents in a background thread, this loader maps
the shard and finds them when it opens it (one pass over the file). The position (shard, next document) is the whole
state: a resumed run reads the same sequences on any number of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from job.data import ShardLoader, check_token_ids, list_shards, load_shard
from job.errors import UserError
from job.speedrun_2026_07_17.schedule import RECORD_RANKS
from job.tokenizer import EOT

BIGRAM_VOCAB = 50304 * 15  # the bigram embedding's rows; the last one is every sequence's first position
BIGRAM_MULTIPLIERS = (36313, 27191)  # the hash's, for this token and the one before it
# The record's room for documents in one sequence, by its length: a sequence of L tokens holds at most this many - 1.
MAX_DOCS = {16384: 64, 32768: 96, 49152: 128}


def max_docs(tokens: int) -> int:
    if tokens in MAX_DOCS:
        return MAX_DOCS[tokens]
    return max(128, -(-(tokens // 300) // 128) * 128)  # the record's rule; at least 128 where it would give none


def grad_accum(world: int) -> int:
    if world < 1 or RECORD_RANKS % world:
        raise UserError(f"{world} ranks: the record's step is {RECORD_RANKS} sequences, so run on 1, 2, 4 or 8 ranks")
    return RECORD_RANKS // world


def bigram_hash(inputs: Tensor, vocab: int = BIGRAM_VOCAB) -> Tensor:
    """Each position's bigram (the token before it and its own) hashed into vocab - 1 rows; position 0 is row
    vocab - 1. int32 arithmetic, overflow wrapping as in the record: position 1 hashes the reserved row's number,
    not a token, and that product overflows. A document's first token hashes with the previous document's last."""
    mod = vocab - 1
    out = inputs.to(torch.int32).clone()
    out[0] = mod
    out[1:] = torch.bitwise_xor(BIGRAM_MULTIPLIERS[0] * out[1:], BIGRAM_MULTIPLIERS[1] * out[:-1]) % mod
    return out


@dataclass
class DocBatch:
    """One rank's micro-batch: a sequence of T tokens, its targets and its documents."""

    inputs: Tensor  # (T,) int32
    targets: Tensor  # (T,) int64: the next tokens
    cum_seqlens: Tensor  # (max_docs,) int32: 0, the documents' ends, then T repeated
    bigram: Tensor  # (T,) int32: bigram_hash(inputs)


def doc_batch(pieces: list[np.ndarray], tokens: int) -> DocBatch:
    """A sequence from its documents' pieces, which hold tokens + 1 together (the last target)."""
    buf = torch.from_numpy(np.concatenate(pieces).astype(np.int64))
    lengths = torch.tensor([len(p) for p in pieces])
    lengths[-1] -= 1  # the extra token is only a target
    room = max_docs(tokens)
    if len(pieces) >= room:
        raise UserError(
            f"a sequence of {tokens} tokens holds {len(pieces)} documents, more than the {room - 1} the "
            "attention's document table has room for: the shards' documents are too short for this batch"
        )
    cum = torch.full((room,), tokens, dtype=torch.int32)
    cum[0] = 0
    cum[1 : len(pieces) + 1] = lengths.cumsum(0)
    inputs = buf[:-1].to(torch.int32)
    return DocBatch(inputs, buf[1:], cum, bigram_hash(inputs))


def one_document(inputs: Tensor) -> tuple[Tensor, Tensor]:
    """(cum_seqlens, bigram hashes) of a sequence that is one whole document, laid out as the loaders lay out theirs
    (the table padded to max_docs, on the sequence's device)."""
    T = inputs.numel()
    cum = torch.full((max_docs(T),), T, dtype=torch.int32, device=inputs.device)
    cum[0] = 0
    return cum, bigram_hash(inputs)


class _Shard:
    def __init__(self, path):
        self.tokens = load_shard(path)
        check_token_ids(path, self.tokens)
        self.starts = np.flatnonzero(self.tokens == EOT)  # every document's first token

    def plan(self, doc: int, tokens: int, seq_len: int) -> tuple[list[list[tuple[int, int]]], int] | None:
        """The record's eight sequences from document `doc` on: (start, end) pieces of each, and the next document;
        None when the shard runs out of documents first."""
        n, size = len(self.starts), len(self.tokens)
        sequences = []
        for _ in range(RECORD_RANKS):
            pieces, filled = [], 0
            while filled <= tokens:  # tokens + 1: the last input's target too
                if doc >= n:
                    return None
                start = int(self.starts[doc])
                doc += 1
                end = min(int(self.starts[doc]) if doc < n else size, start + seq_len, start + tokens - filled + 1)
                pieces.append((start, end))
                filled += end - start
            sequences.append(pieces)
        return sequences, doc


class DocLoader:
    """This rank's share of each training step, as the record's eight ranks read it."""

    def __init__(self, data_dir, split: str = "train", rank: int = 0, world: int = 1):
        self.rank, self.world, self.grad_accum = rank, world, grad_accum(world)
        self.paths = list_shards(data_dir, split)
        if not self.paths:
            raise UserError(f"no {split} shards in {data_dir}: prepare data first (python -m job.prepare)")
        self.split = split
        self.reset()

    def reset(self) -> None:
        self.shard, self.doc, self._open = 0, 0, None

    def _current(self) -> _Shard:
        if self._open is None or self._open[0] != self.shard:
            self._open = (self.shard, _Shard(self.paths[self.shard]))
        return self._open[1]

    def plan_step(self, batch_tokens: int, seq_len: int) -> list[list[np.ndarray]]:
        """The step's eight sequences, as lists of document pieces, and the position moved past them."""
        if batch_tokens % RECORD_RANKS:
            raise ValueError(f"a step of {batch_tokens} tokens does not cut into {RECORD_RANKS} sequences")
        tokens = batch_tokens // RECORD_RANKS
        for _ in range(len(self.paths) + 1):  # every shard once, then the first again: a shard may be too short
            shard = self._current()
            planned = shard.plan(self.doc, tokens, seq_len)
            if planned is not None:
                sequences, self.doc = planned
                return [[shard.tokens[s:e] for s, e in pieces] for pieces in sequences]
            self.shard, self.doc = (self.shard + 1) % len(self.paths), 0  # the rest of the shard is skipped
        docs = max(len(_Shard(p).starts) for p in self.paths)
        raise UserError(f"no {self.split} shard holds {RECORD_RANKS} sequences of {tokens} tokens of whole documents (the most "
                        f"in one shard: {docs} documents, each starting with <|endoftext|>): use a smaller batch, or shards "
                        "of more documents (`python -m job.prepare text FILE --paragraphs` makes each paragraph one)")

    def next_step(self, batch_tokens: int, seq_len: int) -> list[DocBatch]:
        """This rank's micro-batches of the next step: the record's sequences rank, rank + world, ..."""
        sequences = self.plan_step(batch_tokens, seq_len)
        tokens = batch_tokens // RECORD_RANKS
        return [doc_batch(sequences[a * self.world + self.rank], tokens) for a in range(self.grad_accum)]

    def state_dict(self) -> dict:
        return {"split": self.split, "shard": self.shard, "doc": self.doc, "shard_name": self.paths[self.shard].name}

    def load_state_dict(self, state: dict) -> None:
        shard, name = int(state["shard"]), state.get("shard_name")
        if shard >= len(self.paths) or (name and self.paths[shard].name != name):
            raise UserError(
                f"the checkpoint's data position ({name or shard}) is not in the data dir's {self.split} "
                "shards: resume with the same data dir, or start fresh with --resume never"
            )
        self.shard, self.doc, self._open = shard, int(state["doc"]), None


class ValLoader:
    """Validation as the record reads it: unaligned windows of batch_tokens / 8 from the start of the first shard,
    window a * world + r to micro-step a of rank r, documents marked where they start."""

    def __init__(self, data_dir, batch_tokens: int, rank: int = 0, world: int = 1, split: str = "val"):
        self.grad_accum = grad_accum(world)
        self.tokens = batch_tokens // RECORD_RANKS
        self.windows = ShardLoader(data_dir, split, 1, self.tokens, rank, world, step_tokens=batch_tokens)

    def next_step(self) -> list[DocBatch]:
        return [self._batch(*self.windows.next_batch()) for _ in range(self.grad_accum)]

    def _batch(self, x: Tensor, y: Tensor) -> DocBatch:
        inputs = x.view(-1).to(torch.int32)
        starts = torch.nonzero(inputs == EOT)[:, 0]
        room = max_docs(self.tokens)
        if len(starts) >= room:
            raise UserError(
                f"a validation window of {self.tokens} tokens holds {len(starts)} documents, more than the "
                f"{room - 1} the attention's document table has room for: the documents are too short"
            )
        cum = torch.full((room,), self.tokens, dtype=torch.int32)
        cum[0] = 0
        cum[1 : len(starts) + 1] = starts
        return DocBatch(inputs, y.view(-1), cum, bigram_hash(inputs))
