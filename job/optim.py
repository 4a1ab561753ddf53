"""AdamW with GPT-2's weight-decay split and build-nanogpt's warmup + cosine learning-rate schedule."""

from __future__ import annotations

import inspect
import math

import torch


def get_lr(step: int, max_lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    # Linear warmup from max_lr/warmup (never 0: step 0 must already learn), then cosine down to min_lr.
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    decay_ratio = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (max_lr - min_lr)


def configure_optimizer(model: torch.nn.Module, weight_decay: float, lr: float, betas, eps: float, device_type: str,
                        fused: bool | None = None):
    params = [p for p in model.parameters() if p.requires_grad]  # tied weight appears once
    # Decay only the 2-D tensors (matmul weights, embeddings); biases and LayerNorm gains stay free.
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # The fused CUDA kernel updates all parameters in one launch instead of one per tensor (fused=None: use it
    # where available; False: torch's default implementation, the benchmark's plain baseline).
    if fused is None:
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)
