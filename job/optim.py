"""Optimizers: GPT-2's AdamW with its weight-decay split, build-nanogpt's learning-rate schedule, and `Optimizers`,
which steps several optimizers (e.g. Muon for the matrices, Adam for the rest) as one."""

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


class Optimizers:
    """A recipe's optimizers, stepped, zeroed and checkpointed together.

    state_dict() of a single optimizer is that optimizer's own state dict, so checkpoints with one optimizer keep
    the layout they always had (and tools that read ckpt["optimizer"]["state"] still work); several are stored
    as {"optimizers": [each one's state dict, in order]}."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        if not optimizers:
            raise ValueError("a recipe must build at least one optimizer")
        self.optimizers = list(optimizers)

    def __iter__(self):
        return iter(self.optimizers)

    def __len__(self) -> int:
        return len(self.optimizers)

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def state_dict(self) -> dict:
        if len(self.optimizers) == 1:
            return self.optimizers[0].state_dict()
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        states = state["optimizers"] if "optimizers" in state else [state]
        if len(states) != len(self.optimizers):
            raise ValueError(f"the checkpoint holds {len(states)} optimizer states and this recipe builds "
                             f"{len(self.optimizers)} optimizers")
        for opt, s in zip(self.optimizers, states, strict=True):
            opt.load_state_dict(s)
