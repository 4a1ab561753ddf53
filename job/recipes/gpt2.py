"""build-nanogpt's GPT-2 recipe: the GPT of job/model.py, AdamW with GPT-2's weight-decay split (fused on CUDA),
and linear warm-up then cosine decay of the learning rate, on FineWeb-edu 10B: 0.5M-token batches, 19073 steps (one
epoch of 10B tokens), max LR 6e-4 with 715 warmup steps and cosine decay to 10%."""

from __future__ import annotations

from dataclasses import dataclass

from job.errors import UserError
from job.gpt_config import MODEL_PRESETS, SDPA_BACKEND_NAMES
from job.recipes import Recipe, hparam

RESIDUAL_DTYPES = ("auto", "float32", "bfloat16")
# Attention backends that exist only on CUDA: asking for them elsewhere is a mistake, not a silent fallback.
CUDA_ONLY_SDPA = ("cudnn", "efficient")


@dataclass
class Hparams:
    max_lr: float = hparam(6e-4, "peak learning rate, reached after --warmup-steps")
    min_lr_ratio: float = hparam(0.1, "final LR as a fraction of --max-lr")
    warmup_steps: int = hparam(715, "steps of linear warm-up of the learning rate")
    weight_decay: float = hparam(0.1, "AdamW's weight decay on the 2-D weights")
    beta1: float = hparam(0.9, "AdamW's beta1")
    beta2: float = hparam(0.95, "AdamW's beta2")
    eps: float = hparam(1e-8, "AdamW's epsilon")
    grad_clip: float = hparam(1.0, "clip the gradient's global norm to this (0: no clipping)")
    init_from: str | None = hparam(None, "hf:DIR: start from the weights of a Hugging Face GPT-2 model directory (e.g. written "
                                         "by job.export); a checkpoint to resume from wins")
    # The loss fused with lm_head in chunks of N rows (0: plain F.cross_entropy over the full logits). Chunked is the
    # default: one fused kernel writes each chunk's gradient, and the B x T x 50304 logits never exist at once, which
    # makes the step faster and smaller (figures in docs/BENCHMARKS.md).
    ce_chunk_tokens: int = hparam(8192, "compute the loss fused with the output layer, N tokens at a time, never holding the "
                                        "full logits (0: off)")
    residual_dtype: str = hparam("auto", "dtype of the residual stream between blocks: auto is bfloat16 under bf16 autocast on "
                                         "CUDA (half the memory traffic of the residual adds and layer norms), float32 keeps "
                                         "build-nanogpt's fp32 stream exactly", choices=RESIDUAL_DTYPES)
    sdpa_backend: str = hparam("auto", "attention kernel to try first (the others stay as fallbacks; math runs alone); auto: "
                                       "torch's own order (cuDNN first on H100/H200 with torch >= 2.11, else flash); cudnn and "
                                       "efficient need CUDA", choices=("auto", *SDPA_BACKEND_NAMES))


# The presets: GPT-2's sizes with the 124M run's schedule, and tiny, a laptop's CPU run on the bundled corpus.
PRESET_TRAINING = {
    "tiny": dict(
        micro_batch=8, seq_len=128, total_batch_tokens=1024, max_steps=300, warmup_steps=20, max_lr=3e-3,
        eval_every=50, val_steps=8, hellaswag_every=0, sample_every=0, sample_tokens=48, checkpoint_every=100,
        keep_every=0, data_dir="data/tinyshakespeare",
        # The loss fused with the output layer, one chunk per micro-batch of 8 x 128: on a laptop CPU the 128 -> 50304
        # output layer is most of this model's step, and the fused loss makes the step faster (docs/BENCHMARKS.md).
        ce_chunk_tokens=1024,
    ),
    # The larger models keep the 124M run's schedule and its 0.5M-token batch with smaller micro-batches (more
    # accumulation): at 64 they would not fit an 80 GB card. These keep one eager step within such a card with room
    # for the CUDA context and fragmentation (scripts/estimate_memory.py estimates it; docs/BENCHMARKS.md).
    "gpt2-medium": dict(micro_batch=32),
    "gpt2-large": dict(micro_batch=16),
    "gpt2-xl": dict(micro_batch=8),
}
PRESETS = {name: {**dims, **PRESET_TRAINING.get(name, {})} for name, dims in MODEL_PRESETS.items()}


def residual_dtype(cfg, compute_dtype, device_type: str):
    """The residual stream's dtype for GPT.residual_dtype (None: whatever autocast leaves it, fp32).

    auto is bf16 under bf16 autocast on CUDA: half the bytes through every residual add and layer norm, the
    memory-bound part of the step (docs/BENCHMARKS.md), as llm.c keeps its activations. Elsewhere auto stays fp32
    (on the CPU the extra casts cost more than they save); float32 is build-nanogpt's stream exactly."""
    import torch

    if cfg.hp.residual_dtype == "bfloat16":
        return torch.bfloat16
    if cfg.hp.residual_dtype == "auto" and compute_dtype == torch.bfloat16 and device_type == "cuda":
        return torch.bfloat16
    return None


class GPT2(Recipe):
    name = "gpt2"
    summary = "build-nanogpt's GPT-2 (124M) reproduction: AdamW, warm-up and cosine decay, on FineWeb-edu 10B"
    Hparams = Hparams
    presets = PRESETS
    data = "finewebedu-gpt2"
    bundled_presets = ("tiny",)

    def check(self, cfg, world_size):
        hp = cfg.hp

        def bad(name, msg):
            raise UserError(f"--{name.replace('_', '-')} {msg}")

        for name in ("warmup_steps", "weight_decay", "grad_clip", "ce_chunk_tokens"):
            if getattr(hp, name) < 0:
                bad(name, f"must be >= 0, got {getattr(hp, name)}")
        if not 0 < hp.max_lr < 1:
            bad("max_lr", f"must be in (0, 1), got {hp.max_lr}")
        if not 0 <= hp.min_lr_ratio <= 1:
            bad("min_lr_ratio", f"must be in [0, 1], got {hp.min_lr_ratio}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(hp, name) < 1:
                bad(name, f"must be in [0, 1), got {getattr(hp, name)}")
        if hp.eps <= 0:
            bad("eps", f"must be > 0, got {hp.eps}")
        if hp.init_from is not None and not hp.init_from.startswith("hf:"):
            bad("init_from", f"must be hf:DIR (a Hugging Face GPT-2 model directory, e.g. from `python -m job.export`), got {hp.init_from!r}")

    def check_files(self, cfg):
        if cfg.hp.init_from is not None:
            from job.hf import check_init_from  # reads the directory's config.json, so a mismatch fails before any work

            check_init_from(cfg.hp.init_from, cfg.model_config())

    def check_runtime(self, cfg, device_type, compute_dtype):
        if cfg.hp.sdpa_backend in CUDA_ONLY_SDPA and device_type != "cuda":
            raise UserError(f"--sdpa-backend {cfg.hp.sdpa_backend} needs a CUDA GPU and this run is on {device_type}: "
                            "use --sdpa-backend auto")
        if cfg.hp.residual_dtype == "bfloat16" and str(compute_dtype) != "torch.bfloat16":
            raise UserError("--residual-dtype bfloat16 needs bf16 autocast, and this run computes in float32: "
                            "add --dtype bfloat16 (the default on CUDA) or use --residual-dtype float32")

    def divergence_advice(self, cfg):
        lr = cfg.hp.max_lr / 2 if cfg is not None else Hparams.max_lr / 2
        clip = "" if cfg is not None and cfg.hp.grad_clip else " and --grad-clip 1.0"
        return f"a lower learning rate, e.g. --max-lr {lr:.2g}{clip}"

    def grad_clip(self, cfg):
        return cfg.hp.grad_clip

    def build_model(self, cfg, device, compute_dtype):
        import torch

        from job.model import GPT

        model = GPT(cfg.model_config()).to(device)
        # Training choices rather than architecture: none of them is in the checkpoint's model config.
        model.ce_chunk_tokens = cfg.hp.ce_chunk_tokens
        model.set_sdpa_backend(cfg.hp.sdpa_backend)  # on the model's device: the order depends on it
        model.residual_dtype = residual_dtype(cfg, compute_dtype, torch.device(device).type)
        return model

    def init_from(self, model, cfg):
        if not cfg.hp.init_from:
            return None
        from job.hf import init_from_hf

        init_from_hf(model, cfg.hp.init_from)
        return f"initialized the weights from {cfg.hp.init_from}"

    def build_optimizers(self, model, cfg, device_type):
        from job.optim import configure_optimizer

        hp = cfg.hp
        return [configure_optimizer(model, hp.weight_decay, hp.max_lr, (hp.beta1, hp.beta2), hp.eps, device_type)]

    def schedule(self, optimizers, step, cfg):
        from job.optim import get_lr

        hp = cfg.hp
        lr = get_lr(step, hp.max_lr, hp.max_lr * hp.min_lr_ratio, hp.warmup_steps, cfg.max_steps)
        for group in optimizers.param_groups:
            group["lr"] = lr
        return {"lr": lr}

    def model_from_config(self, config):
        from job.model import GPT, GPTConfig

        return GPT(GPTConfig(**{k: v for k, v in config.items() if k in GPTConfig.__dataclass_fields__}))

    def describe(self, model, cfg):
        import torch

        hp = cfg.hp
        return ((f" | attention: {hp.sdpa_backend} first" if hp.sdpa_backend != "auto" else "")
                + (" | residual stream bfloat16" if model.residual_dtype == torch.bfloat16 else "")
                + (f" | loss in chunks of {hp.ce_chunk_tokens} tokens" if hp.ce_chunk_tokens else ""))


RECIPE = GPT2()
