"""The 2026-07-17 record's model on token ids, as HellaSwag and sampling call it: each row is evaluation's forward of
one whole document, and generate() samples GPT-2 tokens within the model's block size. (A checkpoint's model, with
its step's windows and rotary tables, is tests/test_speedrun_2026_07_17_recipe.py's.)"""

import pytest
import torch
import torch.nn.functional as F

from job.config import parse_args
from job.recipes import get
from job.speedrun_2026_07_17.bos_loader import doc_batch
from job.speedrun_2026_07_17.wiring import pack, unpack

GPT2_VOCAB = 50257
ARGS = (
    "--recipe speedrun --preset tiny --n-embd 32 --batch-divisor 256 --scheduled-steps 9 --extension-steps 3 --max-steps 12 "
    "--seq-len 192 --total-batch-tokens 1536 --device cpu"
).split()


def record_model(step: int, *extra: str):
    """The recipe's model with moved weights (the initial ones leave most of the model out: zero MLP outputs, bigram
    rows, gates), set for `step` as the trainer sets it."""
    cfg = parse_args([*ARGS, *extra], files=False)
    recipe = get("speedrun")
    torch.manual_seed(0)
    model = recipe.build_model(cfg, "cpu", None)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_((torch.randn(p.shape, generator=g) * 0.05).to(p.dtype))
    recipe.model_schedule(model, step, cfg)
    return model.eval()


def test_each_rows_logits_are_evaluations_of_that_row_as_one_document():
    """Step 7: the third stage's windows and the rotary tables scaled twice. Row r's logits are those the trainer's
    validation computes for a sequence that is the row's one document (the loaders' layout), bit for bit, less the
    padded vocabulary; validation's loss of that sequence is their cross-entropy with the padded columns in."""
    model = record_model(7)
    T = 96
    tokens = torch.randint(0, GPT2_VOCAB, (3, T + 1), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, loss = model(tokens[:, :-1])
        assert loss is None and logits.shape == (3, T, GPT2_VOCAB)
        for r in range(3):
            x, y = pack(doc_batch([tokens[r].numpy()], T))  # one document of T + 1 tokens, as the training loader cuts it
            inputs, seqlens, bigram = unpack(x, y)
            full = model.gpt.logits(model.gpt.trunk(inputs, seqlens, bigram, model.forward_schedule)).float()[0]
            assert torch.equal(logits[r].float(), full[:, :GPT2_VOCAB])
            assert torch.equal(model(x, y)[1], F.cross_entropy(full, y, reduction="none").mean())
        # A row's logits do not depend on the rows beside it.
        assert torch.equal(model(tokens[1:2, :-1])[0], logits[1:2])


def test_token_ids_are_evaluations_only():
    model = record_model(0).train()
    with pytest.raises(RuntimeError, match="model.eval"):
        model(torch.zeros(1, 8, dtype=torch.long))


def test_generate_samples_gpt2_tokens_reproducibly_from_the_last_block_size_tokens():
    """The padded vocabulary's rows, made the largest logits of all, are never drawn; greedy sampling (top-k 1) picks
    each token from the logits of the block_size tokens before it."""
    model = record_model(10, *"--batch-divisor 1024 --seq-len 48 --total-batch-tokens 384 --block-size 64 --val-seq-len 64".split())
    assert model.config.block_size == 64
    with torch.no_grad():
        model.gpt.lm_head.weight[:, GPT2_VOCAB:] = 1.0
    prompt = torch.randint(0, GPT2_VOCAB, (2, 60), generator=torch.Generator().manual_seed(3))
    out = model.generate(prompt, 6, top_k=1)  # the last two from contexts cut to 64 tokens
    assert out.shape == (2, 66) and torch.equal(out[:, :60], prompt)
    with torch.no_grad():
        for t in range(60, 66):
            assert torch.equal(out[:, t], model(out[:, max(0, t - 64) : t])[0][:, -1].float().argmax(-1))
    samples = [model.generate(prompt, 3, top_k=50, generator=torch.Generator().manual_seed(s)) for s in (4, 4, 5)]
    assert torch.equal(samples[0], samples[1]) and not torch.equal(samples[0], samples[2])
    assert all(int(s[:, 60:].max()) < GPT2_VOCAB for s in samples)
