"""The 2026-07-17 record's data (job/speedrun_2026_07_17/bos_loader.py): every step's eight sequences as the
record's eight ranks cut them, on 1, 2, 4 or 8 ranks, across batch changes and shard switches; sequences that start
at documents; the bigram hash; resuming."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from job.data import write_shard
from job.errors import UserError
from job.speedrun_2026_07_17.bos_loader import BIGRAM_VOCAB, DocLoader, ValLoader, bigram_hash, grad_accum
from job.tokenizer import EOT

STEPS = [(8 * 256, 64)] * 4 + [(8 * 512, 128)] * 6  # (tokens a step, longest document piece): a stage change
SHARD_DOCS = (100, 150, 110, 400)  # documents per train shard: the steps cross three switches, ending in the last shard


def make_shard(gen: np.random.Generator, docs: int) -> tuple[np.ndarray, list[int]]:
    """Documents of 1 to 150 tokens, one in six of 150 to 400 (longer than a sequence's piece), each starting with
    <|endoftext|> and otherwise never holding it; and where each starts."""
    pieces, starts, at = [], [], 0
    for _ in range(docs):
        n = int(gen.integers(150, 400) if gen.random() < 1 / 6 else gen.integers(1, 150))
        doc = gen.integers(0, EOT, n)
        doc[0] = EOT
        pieces.append(doc)
        starts.append(at)
        at += n
    return np.concatenate(pieces).astype(np.uint16), starts


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("docs")
    gen = np.random.default_rng(0)
    train = []
    for i, docs in enumerate(SHARD_DOCS):
        tokens, starts = make_shard(gen, docs)
        write_shard(d / f"fineweb_train_{i:06d}.npy", tokens)
        train.append((tokens, starts))
    write_shard(d / "fineweb_val_000000.npy", make_shard(gen, 200)[0])
    return d, train


def record_steps(train) -> list[list[np.ndarray]]:
    """The record's eight sequences of every step, by its rule: each from the next documents in turn, a document giving
    at most `seq_len` tokens and no more than the sequence still needs (with the last target), the rest of it skipped;
    a step that does not fit in the shard's remaining documents is taken from the next shard's first."""
    shard, doc, steps = 0, 0, []
    for tokens_per_step, seq_len in STEPS:
        need = tokens_per_step // 8 + 1
        while True:
            tokens, starts = train[shard]
            bounds = [*starts, len(tokens)]
            sequences, d = [], doc
            for _ in range(8):
                seq = []
                while sum(map(len, seq)) < need and d < len(starts):
                    take = min(bounds[d + 1] - bounds[d], seq_len, need - sum(map(len, seq)))
                    seq.append(tokens[bounds[d] : bounds[d] + take])
                    d += 1
                if sum(map(len, seq)) < need:
                    break
                sequences.append(seq)
            if len(sequences) == 8:
                break
            shard, doc = shard + 1, 0
        doc = d
        steps.append(sequences)
    assert shard == len(train) - 1  # the steps crossed every shard switch
    return steps


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_every_step_reads_the_records_eight_sequences_on_any_number_of_ranks(shards, world):
    d, train = shards
    want = record_steps(train)
    loaders = [DocLoader(d, "train", r, world) for r in range(world)]
    assert {ld.grad_accum for ld in loaders} == {8 // world}
    for step, (tokens, seq_len) in enumerate(STEPS):
        batches = [ld.next_step(tokens, seq_len) for ld in loaders]
        for r, micro in enumerate(batches):
            for a, b in enumerate(micro):
                seq = want[step][a * world + r]  # micro-step a of rank r: the record's rank a * world + r
                flat = np.concatenate(seq)
                assert np.array_equal(b.inputs.numpy(), flat[:-1]) and np.array_equal(b.targets.numpy(), flat[1:]), (step, r, a)
                ends = np.cumsum([len(p) for p in seq])
                ends[-1] -= 1  # the last token is only a target
                assert b.cum_seqlens[: len(seq) + 1].tolist() == [0, *ends.tolist()]
    assert {ld.shard for ld in loaders} == {len(SHARD_DOCS) - 1}


def test_sequences_are_documents_from_their_first_token(shards):
    d, _ = shards
    loader = DocLoader(d, "train", 0, 1)
    for tokens, seq_len in STEPS:
        for b in loader.next_step(tokens, seq_len):
            T = tokens // 8
            assert b.inputs.dtype == torch.int32 and b.targets.dtype == torch.int64 and b.cum_seqlens.dtype == torch.int32
            assert b.inputs.shape == b.targets.shape == b.bigram.shape == (T,)
            assert torch.equal(b.targets[:-1], b.inputs[1:].long())
            cum = b.cum_seqlens.tolist()
            n = cum.index(T) if cum[-1] == T else len(cum)  # the documents, then T repeated to the table's size
            assert cum[0] == 0 and all(x == T for x in cum[n:]) and len(cum) == 128
            starts, lengths = cum[:n], np.diff(cum[: n + 1])
            assert all(b.inputs[s] == EOT for s in starts)  # every piece starts at a document's first token...
            assert (lengths <= seq_len).all() and (lengths > 0).all()  # ...and is no longer than the step allows
            inside = np.ones(T, dtype=bool)
            inside[starts] = False
            assert not (b.inputs.numpy()[inside] == EOT).any()  # no document starts inside a piece


def test_the_bigram_hash_of_each_position_and_the_one_before():
    x = torch.tensor([EOT, 17, 50000, 3, EOT, 0], dtype=torch.int32)
    mod = BIGRAM_VOCAB - 1

    def wrap32(v: int) -> int:  # int32 arithmetic, as the record's
        return (v + 2**31) % 2**32 - 2**31

    prev = [mod, *x.tolist()[1:-1]]  # position 1 hashes with the reserved row's number, as the record's does
    want = [mod] + [wrap32(wrap32(36313 * c) ^ wrap32(27191 * p)) % mod for c, p in zip(x.tolist()[1:], prev, strict=True)]
    got = bigram_hash(x)
    assert got.dtype == torch.int32 and got.tolist() == want
    assert all(0 <= v < BIGRAM_VOCAB for v in want) and want[1] != (36313 * 17 ^ 27191 * EOT) % mod


def test_a_resumed_loader_reads_the_same_steps_on_another_number_of_ranks(shards):
    d, _ = shards
    first = [DocLoader(d, "train", r, 2) for r in range(2)]
    for tokens, seq_len in STEPS[:5]:
        for ld in first:
            ld.next_step(tokens, seq_len)
    state = first[0].state_dict()
    assert state == first[1].state_dict()
    resumed = [DocLoader(d, "train", r, 4) for r in range(4)]
    for ld in resumed:
        ld.load_state_dict(state)
    for tokens, seq_len in STEPS[5:]:
        two = [b.inputs for ld in first for b in ld.next_step(tokens, seq_len)]
        four = [b.inputs for ld in resumed for b in ld.next_step(tokens, seq_len)]
        # rank r's micro-step a is sequence a * world + r: the same eight sequences in another order
        order2 = [a * 2 + r for r in range(2) for a in range(4)]
        order4 = [a * 4 + r for r in range(4) for a in range(2)]
        assert all(torch.equal(two[order2.index(k)], four[order4.index(k)]) for k in range(8))


def test_a_position_from_other_shards_is_refused(shards, tmp_path):
    d, _ = shards
    state = DocLoader(d, "train", 0, 1).state_dict()
    with pytest.raises(UserError, match="same data dir"):
        DocLoader(d, "train", 0, 1).load_state_dict({**state, "shard_name": "other_000000.npy"})


def test_documents_too_short_for_the_attention_table_are_one_user_error(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.npy", np.tile(np.array([EOT, 1], dtype=np.uint16), 4000))
    with pytest.raises(UserError, match="documents are too short"):
        DocLoader(tmp_path, "train", 0, 1).next_step(8 * 512, 128)  # 256 two-token documents a sequence; room for 127


def test_a_world_that_does_not_divide_eight_is_one_user_error():
    with pytest.raises(UserError, match="1, 2, 4 or 8"):
        grad_accum(3)


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_validation_reads_the_records_unaligned_windows(shards, world):
    d, _ = shards
    val = np.load(d / "fineweb_val_000000.npy")
    batch = 8 * 256
    loaders = [ValLoader(d, batch, r, world) for r in range(world)]
    for step in range(2):
        for r, ld in enumerate(loaders):
            for a, b in enumerate(ld.next_step()):
                k = a * world + r  # the record's rank k reads window k of the step
                start = step * batch + k * 256
                assert np.array_equal(b.inputs.numpy(), val[start : start + 256]) and np.array_equal(b.targets.numpy(), val[start + 1 : start + 257])
                docs = np.flatnonzero(val[start : start + 256] == EOT)
                assert b.cum_seqlens[1 : len(docs) + 1].tolist() == docs.tolist() and b.cum_seqlens[0] == 0
                assert (b.cum_seqlens[len(docs) + 1 :] == 256).all()
