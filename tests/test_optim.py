import math

import pytest

from job.model import GPT, GPTConfig
from job.optim import configure_optimizer, get_lr


def test_lr_schedule_follows_its_formula():
    max_lr, min_lr, warmup, total = 6e-4, 6e-5, 715, 19073
    assert get_lr(0, max_lr, min_lr, warmup, total) == pytest.approx(max_lr / warmup)
    assert get_lr(714, max_lr, min_lr, warmup, total) == pytest.approx(max_lr)
    for step in (715, 1000, 9894, 15000, 19072):
        ratio = (step - warmup) / (total - warmup)
        expected = min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (max_lr - min_lr)
        assert get_lr(step, max_lr, min_lr, warmup, total) == pytest.approx(expected)
    assert get_lr(total, max_lr, min_lr, warmup, total) == pytest.approx(min_lr)
    lrs = [get_lr(s, max_lr, min_lr, warmup, total) for s in range(warmup, total)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))  # monotone decay after warmup


def test_weight_decay_only_on_matrices():
    m = GPT(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32))
    opt = configure_optimizer(m, 0.1, 6e-4, (0.9, 0.95), 1e-8, "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8
