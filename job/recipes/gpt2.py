"""build-nanogpt's GPT-2 recipe: the GPT of job/model.py, AdamW with GPT-2's weight-decay split (fused on CUDA),
and linear warm-up then cosine decay of the learning rate."""

from __future__ import annotations

import torch

from job.model import GPT, GPTConfig
from job.optim import Optimizers, configure_optimizer, get_lr
from job.recipes import Recipe


def residual_dtype(cfg, compute_dtype: torch.dtype | None, device_type: str) -> torch.dtype | None:
    """The residual stream's dtype for GPT.residual_dtype (None: whatever autocast leaves it, fp32).

    auto is bf16 under bf16 autocast on CUDA: half the bytes through every residual add and layer norm, the
    memory-bound part of the step (docs/BENCHMARKS.md), as llm.c keeps its activations. Elsewhere auto stays fp32
    (on the CPU the extra casts cost more than they save); float32 is build-nanogpt's stream exactly."""
    if cfg.residual_dtype == "bfloat16":
        return torch.bfloat16
    if cfg.residual_dtype == "auto" and compute_dtype == torch.bfloat16 and device_type == "cuda":
        return torch.bfloat16
    return None


class GPT2(Recipe):
    name = "gpt2"

    def build_model(self, cfg, device, compute_dtype):
        model = GPT(cfg.model_config()).to(device)
        if cfg.init_from:  # a Hugging Face GPT-2 directory's weights; a checkpoint to resume from still wins
            from job.hf import init_from_hf

            init_from_hf(model, cfg.init_from)
        # Training choices rather than architecture: none of them is in the checkpoint's model config.
        model.ce_chunk_tokens = cfg.ce_chunk_tokens
        model.set_sdpa_backend(cfg.sdpa_backend)  # on the model's device: the order depends on it
        model.residual_dtype = residual_dtype(cfg, compute_dtype, torch.device(device).type)
        return model

    def build_optimizers(self, model, cfg, device_type):
        return [configure_optimizer(model, cfg.weight_decay, cfg.max_lr, (cfg.beta1, cfg.beta2), cfg.eps, device_type)]

    def schedule(self, optimizers: Optimizers, step, cfg):
        lr = get_lr(step, cfg.max_lr, cfg.max_lr * cfg.min_lr_ratio, cfg.warmup_steps, cfg.max_steps)
        for group in optimizers.param_groups:
            group["lr"] = lr
        return {"lr": lr}

    def model_from_config(self, config):
        return GPT(GPTConfig(**{k: v for k, v in config.items() if k in GPTConfig.__dataclass_fields__}))

    def describe(self, model, cfg):
        return ((f" | attention: {cfg.sdpa_backend} first" if cfg.sdpa_backend != "auto" else "")
                + (" | residual stream bfloat16" if model.residual_dtype == torch.bfloat16 else "")
                + (f" | loss in chunks of {cfg.ce_chunk_tokens} tokens" if cfg.ce_chunk_tokens else ""))


RECIPE = GPT2()
