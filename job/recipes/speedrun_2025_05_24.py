"""The NanoGPT speedrun's recipe: a port of modded-nanogpt's record of 2025-05-24 (records/track_1_short/
2025-05-24_StableTorch), which reaches GPT-2 (124M)'s 3.28 FineWeb validation loss in 1770 steps of 8 x 48K tokens
(0.7B tokens, a fourteenth of build-nanogpt's 10B). The model, Muon and the schedules are in job/speedrun_2025_05_24/.

Its hyperparameters are the record's and live here (Hparams: --muon-lr, the Adam rates, the momentum warm-up and the
cooldown; the defaults are the record's), not in TrainConfig: they are what makes this recipe this record. What is a
run's choice (steps, batch layout, evaluation, checkpoints) stays in TrainConfig, with this
recipe's presets as defaults: `gpt2` is the record's size and layout, `tiny` the same model 128 wide for a CPU.

The batch is the record's: per rank one sequence of 48K tokens (documents packed, each attending only to itself),
8 of them a step; on fewer ranks the trainer accumulates gradients over the 8 sequences instead. Validation is the
record's too: the first 10,485,760 validation tokens, in sequences of 256K.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from job import contract
from job.errors import UserError
from job.recipes import Published, Recipe, hparam
from job.speedrun_2025_05_24 import BLOCK, GPT2_VOCAB, LAYERS, next_multiple

# The record's optimizers: Adam for the output layer, the embeddings and the scalars; Muon for the blocks' matrices.
ADAM_LR = {"head": 0.22, "embed": 0.6, "scalar": 0.04}
ADAM_BETAS, ADAM_EPS = (0.8, 0.95), 1e-10  # the small epsilon keeps Adam's steps independent of the world size
MUON_LR = 0.05
MUON_MOMENTUM = (0.85, 0.95, 300)  # warmed up linearly from 0.85 to 0.95 over the first 300 steps
COOLDOWN_FRAC = 0.4  # learning rate constant, then down linearly to 0.1x over the last 40% of the steps
FINAL_LR_FACTOR = 0.1
WINDOW_TOKENS = (128, 1728)  # the long window grows linearly over the run, in whole 128-token blocks: 128 -> 1792
# The record's run: 1770 steps of 8 x 48K tokens, validation on the first 10,485,760 tokens in sequences of 256K.
TRAIN_SEQ, VAL_SEQ, VAL_TOKENS, RECORD_STEPS, RECORD_RANKS = 48 * 1024, 4 * 64 * 1024, 10_485_760, 1770, 8
RECORD_SECONDS = 181  # 180.8 s on 8xH100, as published


@dataclass
class Hparams:
    muon_lr: float = hparam(MUON_LR, "Muon's learning rate, for the blocks' matrices")
    adam_lr_head: float = hparam(ADAM_LR["head"], "Adam's learning rate for the output layer")
    adam_lr_embed: float = hparam(ADAM_LR["embed"], "Adam's learning rate for the token and value embeddings")
    adam_lr_scalar: float = hparam(ADAM_LR["scalar"], "Adam's learning rate for the scalars (lambdas, skip weights)")
    muon_momentum_start: float = hparam(MUON_MOMENTUM[0], "Muon's momentum at step 0...")
    muon_momentum_end: float = hparam(MUON_MOMENTUM[1], "...warmed up linearly to this...")
    muon_momentum_warmup: int = hparam(MUON_MOMENTUM[2], "...over this many steps")
    cooldown_frac: float = hparam(COOLDOWN_FRAC, "the last fraction of the steps over which the learning rates fall linearly...")
    final_lr_factor: float = hparam(FINAL_LR_FACTOR, "...to this fraction of their value")


PRESETS = {
    "gpt2": dict(
        n_layer=LAYERS, n_head=6, n_embd=768, block_size=VAL_SEQ, vocab_size=GPT2_VOCAB,
        micro_batch=1, seq_len=TRAIN_SEQ, total_batch_tokens=RECORD_RANKS * TRAIN_SEQ, max_steps=RECORD_STEPS,
        val_seq_len=VAL_SEQ, val_tokens=VAL_TOKENS, eval_every=125, hellaswag_every=RECORD_STEPS, sample_every=0,
        checkpoint_every=500, keep_every=0,
        data_dir=os.path.join(contract.PERSISTENT, contract.HUB_SHARDS["fineweb-gpt2"].subdir),
    ),
    "tiny": dict(
        n_layer=LAYERS, n_head=2, n_embd=128, block_size=1024, vocab_size=GPT2_VOCAB,
        micro_batch=1, seq_len=1024, total_batch_tokens=1024, max_steps=300,
        val_seq_len=1024, val_tokens=8192, eval_every=50, hellaswag_every=0, sample_every=0, sample_tokens=48,
        checkpoint_every=100, keep_every=0, data_dir="data/tinyshakespeare",
    ),
}


def lr_factor(step: int, max_steps: int, cooldown_frac: float = COOLDOWN_FRAC, final: float = FINAL_LR_FACTOR) -> float:
    x = step / max_steps
    if x < 1 - cooldown_frac:
        return 1.0
    w = (1 - x) / cooldown_frac
    return w * 1.0 + (1 - w) * final


def window_blocks(step: int, max_steps: int) -> int:
    x = min(step / max_steps, 1.0)
    return next_multiple(WINDOW_TOKENS[1] * x, WINDOW_TOKENS[0]) // WINDOW_TOKENS[0]


def muon_momentum(step: int, low: float = MUON_MOMENTUM[0], high: float = MUON_MOMENTUM[1], steps: int = MUON_MOMENTUM[2]) -> float:
    frac = min(step / steps, 1) if steps else 1
    return (1 - frac) * low + frac * high


def param_groups(model, lr: dict[str, float] = ADAM_LR) -> tuple[list[dict], list[list]]:
    """(Adam's groups, Muon's matrices grouped by size: each round of its all-gather moves equal-sized updates)."""
    hidden = [p for n, p in model.blocks.named_parameters() if p.ndim >= 2 and "embed" not in n]
    embed = [p for n, p in model.named_parameters() if "embed" in n]
    scalars = [p for p in model.parameters() if p.ndim < 2]
    adam = [dict(params=[model.lm_head.weight], lr=lr["head"]), dict(params=embed, lr=lr["embed"]),
            dict(params=scalars, lr=lr["scalar"])]
    sizes = list(dict.fromkeys(p.numel() for p in hidden))
    return adam, [[p for p in hidden if p.numel() == size] for size in sizes]


class Speedrun20250524(Recipe):
    name = "speedrun-2025-05-24"
    summary = ("modded-nanogpt's speedrun record of 2025-05-24: GPT-2's 3.28 FineWeb val loss in 1770 steps of 8 x 48K tokens "
               "(Muon, FlexAttention, FP8 head)")
    Hparams = Hparams
    presets = PRESETS
    data = "fineweb-gpt2"
    bundled_presets = ("tiny",)
    published = Published(RECORD_SECONDS / RECORD_STEPS, "gpu_8x_h100_sxm5",
                          f"modded-nanogpt's published record ({RECORD_SECONDS} s for {RECORD_STEPS} steps on 8xH100)")
    autocast = False  # the model keeps the record's precision itself (embeddings and activations in compute_dtype)

    def check(self, cfg, world_size):
        if cfg.n_layer != LAYERS:
            raise UserError(f"--n-layer {cfg.n_layer}: the speedrun recipe's layer layout (value embeddings, skips, "
                            f"windows) is the record's {LAYERS} layers: leave --n-layer out")
        head = cfg.n_embd // cfg.n_head
        if head % 4:  # the rotary embedding turns the first half of a head's dimensions, as pairs of quarters
            fits = [h for h in range(1, cfg.n_embd + 1) if cfg.n_embd % h == 0 and (cfg.n_embd // h) % 4 == 0]
            hint = f"e.g. --n-head {min(fits, key=lambda h: abs(h - cfg.n_head))}" if fits else "make --n-embd a multiple of 4"
            raise UserError(f"--n-embd {cfg.n_embd} / --n-head {cfg.n_head} gives heads of {head} dimensions, not a multiple of 4 as "
                            f"the speedrun's rotary embedding needs: {hint}")
        for name in ("seq_len", "val_seq_len"):
            value = getattr(cfg, name) or cfg.seq_len
            if value % BLOCK:
                raise UserError(f"--{name.replace('_', '-')} {value} is not a multiple of {BLOCK}, the attention mask's block: "
                                f"use {next_multiple(value, BLOCK)}")
        if cfg.micro_batch != 1:
            raise UserError(f"--micro-batch {cfg.micro_batch}: the speedrun recipe packs documents into one sequence per "
                            "micro-batch: use --micro-batch 1 and set the length with --seq-len")
        hp = cfg.hp
        for name in ("muon_lr", "adam_lr_head", "adam_lr_embed", "adam_lr_scalar"):
            if not 0 < getattr(hp, name) < 10:
                raise UserError(f"--{name.replace('_', '-')} must be in (0, 10), got {getattr(hp, name)}")
        for name in ("muon_momentum_start", "muon_momentum_end", "cooldown_frac", "final_lr_factor"):
            if not 0 <= getattr(hp, name) <= 1:
                raise UserError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(hp, name)}")
        if hp.muon_momentum_warmup < 0:
            raise UserError(f"--muon-momentum-warmup must be >= 0, got {hp.muon_momentum_warmup}")

    def divergence_advice(self, cfg):
        lr = (cfg.hp.muon_lr if cfg is not None else MUON_LR) / 2
        return f"lower learning rates, e.g. --muon-lr {lr:.3g} (and --adam-lr-head, --adam-lr-embed, --adam-lr-scalar)"

    def build_model(self, cfg, device, compute_dtype):
        import torch

        from job.speedrun_2025_05_24.fp8 import fp8_supported
        from job.speedrun_2025_05_24.gpt import SpeedrunConfig, SpeedrunGPT

        model = SpeedrunGPT(SpeedrunConfig(vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                                           n_embd=cfg.n_embd, block_size=cfg.block_size)).to(device)
        if compute_dtype is not None:  # the record stores its embeddings in bf16: every activation follows them
            for m in model.modules():
                if isinstance(m, torch.nn.Embedding):
                    m.to(compute_dtype)
        model.lm_head.use_fp8 = compute_dtype == torch.bfloat16 and fp8_supported(device)
        self.model_schedule(model, 0, cfg)
        return model

    def model_from_config(self, config):
        from job.speedrun_2025_05_24.gpt import SpeedrunConfig, SpeedrunGPT

        return SpeedrunGPT(SpeedrunConfig(**{k: v for k, v in config.items() if k in SpeedrunConfig.__dataclass_fields__}))

    def build_optimizers(self, model, cfg, device_type):
        import torch

        from job.speedrun_2025_05_24.muon import Muon, newton_schulz

        hp = cfg.hp
        adam_groups, matrices = param_groups(model, {"head": hp.adam_lr_head, "embed": hp.adam_lr_embed, "scalar": hp.adam_lr_scalar})
        adam = torch.optim.Adam(adam_groups, betas=ADAM_BETAS, eps=ADAM_EPS, fused=True)
        orthogonalize = torch.compile(newton_schulz) if device_type == "cuda" else newton_schulz
        # Newton-Schulz in the run's precision: the record's bf16, or fp32 for an fp32 run (a CPU's bf16 is slow).
        muon = Muon([dict(params=ps) for ps in matrices], lr=hp.muon_lr, momentum=hp.muon_momentum_end,
                    orthogonalize=orthogonalize, ns_dtype=model.compute_dtype())
        for opt in (adam, muon):
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]
        return [adam, muon]

    def schedule(self, optimizers, step, cfg):
        from job.speedrun_2025_05_24.muon import Muon

        hp = cfg.hp
        factor = lr_factor(step, cfg.max_steps, hp.cooldown_frac, hp.final_lr_factor)
        for group in optimizers.param_groups:
            group["lr"] = group["initial_lr"] * factor
        momentum = muon_momentum(step, hp.muon_momentum_start, hp.muon_momentum_end, hp.muon_momentum_warmup)
        for opt in optimizers:
            if isinstance(opt, Muon):
                for group in opt.param_groups:
                    group["momentum"] = momentum
        return {"lr": hp.muon_lr * factor, "lr_factor": factor, "muon_momentum": momentum}

    def loader(self, data_dir, split, micro_batch, seq_len, rank, world, pin_memory=False, step_tokens=None):
        from job.data import ShardLoader

        # The record's loader: each step one span of the shard (the next shard when the span does not fit), rank k
        # of eight reading its k-th sequence; on fewer ranks the accumulated micro-steps read the same sequences.
        return ShardLoader(data_dir, split, micro_batch, seq_len, rank, world, pin_memory=pin_memory, step_tokens=step_tokens)

    def model_schedule(self, model, step, cfg):
        model.window_blocks.fill_(window_blocks(step, cfg.max_steps))

    def backward_scale(self, cfg, layout):
        return float(layout.micro_batch * layout.seq_len)  # the record's loss is the sum over the tokens, not the mean

    def describe(self, model, cfg):
        head = "FP8" if model.lm_head.use_fp8 else str(model.compute_dtype()).removeprefix("torch.")
        attention = "FlexAttention" if next(model.parameters()).is_cuda else "SDPA with the same mask"
        return f" | output layer {head} | attention {attention} | precision {str(model.compute_dtype()).removeprefix('torch.')}"


RECIPE = Speedrun20250524()
