"""Every knob of a training run in one dataclass, with presets and command-line overrides.

Defaults are build-nanogpt's GPT-2 (124M) run on FineWeb-edu 10B: 0.5M-token batches, 19073 steps
(one epoch of 10B tokens), max LR 6e-4 with 715 warmup steps and cosine decay to 10%.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from dataclasses import dataclass, fields

from job import contract, recipes
from job.errors import ArgumentParser, UserError, float_arg, int_arg
from job.model import MODEL_PRESETS, PADDED_VOCAB, SDPA_BACKENDS, GPTConfig


@dataclass
class TrainConfig:
    preset: str = "gpt2"
    recipe: str = recipes.DEFAULT  # model, optimizers and schedules (job/recipes/)
    # model (None: from the preset)
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    block_size: int | None = None
    vocab_size: int = PADDED_VOCAB
    # batch
    micro_batch: int = 64  # B: sequences per forward pass per rank
    seq_len: int = 1024  # T
    total_batch_tokens: int = 524288  # 2**19 tokens per optimizer step, reached by grad accumulation
    # optimisation
    max_steps: int = contract.PRESET_MAX_STEPS["gpt2"]  # 19073: one epoch of FineWeb-edu 10B at 2**19 tokens a step
    warmup_steps: int = 715
    max_lr: float = 6e-4
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 1337
    # data and outputs
    data_dir: str = contract.DATA_DIR
    # Relative, as in build-nanogpt: "log" under the container's WORKDIR is the contract's LOG_DIR (/app/log).
    log_dir: str = os.path.relpath(contract.LOG_DIR, contract.WORKDIR)
    # evaluation
    eval_every: int = 250  # val loss every N steps (0: only at the end)
    val_steps: int = 20  # micro-batches of val data per evaluation
    val_seq_len: int = 0  # tokens per validation sequence (0: --seq-len)
    val_tokens: int = 0  # validation tokens per evaluation, over all ranks (0: --val-steps micro-batches per rank)
    hellaswag_every: int = 250  # 0 disables HellaSwag
    hellaswag_path: str | None = None  # local hellaswag_val.jsonl; default: downloaded into the cache dir
    hellaswag_url: str = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
    hellaswag_limit: int = 0  # evaluate only the first N examples (0: all 10042)
    sample_every: int = 250  # 0: only at the end
    sample_prompt: str = "Hello, I'm a language model,"
    sample_num: int = 4  # 0 disables sampling
    sample_tokens: int = 32
    sample_seed: int = 42
    log_every: int = 1
    # dashboards (job/dashboards.py), fed by the events of metrics.jsonl on the master rank
    tensorboard: str = "on"  # on | off: TensorBoard event files in the log dir
    wandb: str | None = None  # PROJECT or PROJECT/RUN: log to Weights & Biases too
    # checkpoints
    checkpoint_every: int = 1000  # steps (0: only at the end)
    checkpoint_minutes: float = 0.0  # also save when this many minutes passed since the last save (0: off)
    keep_last: int = 3  # retention: the newest N checkpoints...
    keep_every: int = 5000  # ...plus every checkpoint whose step is a multiple of this (0: none)
    resume: str = "auto"  # auto | never | PATH
    init_from: str | None = None  # hf:DIR: start from a Hugging Face GPT-2 directory's weights (a checkpoint to resume wins)
    # hardware
    device: str = "auto"  # auto | cuda | mps | cpu
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 elsewhere) | bfloat16 | float32
    compile: str = "auto"  # auto (on for CUDA) | on | off
    compile_mode: str = "default"  # default | tuned | autotune | max-autotune-no-cudagraphs (see COMPILE_OPTIONS, and CHOICES for why no CUDA graphs)
    residual_dtype: str = "auto"  # the residual stream: auto (bf16 under bf16 autocast on CUDA) | float32 (build-nanogpt) | bfloat16
    sdpa_backend: str = "auto"  # attention kernel tried first: auto (torch's order) | cudnn | flash | efficient | math
    # The loss fused with lm_head in chunks of N rows (0: plain F.cross_entropy over the full logits). Chunked is
    # the default: one fused kernel writes each chunk's gradient, and the B x T x 50304 logits never exist at once,
    # which makes the step faster and smaller (figures in docs/BENCHMARKS.md).
    ce_chunk_tokens: int = 8192
    prefetch: int = 1  # batches copied (pinned, non-blocking) to the device ahead of use; 0: copy when used
    ddp_bucket_mb: int = 25  # DDP gradient all-reduce bucket size (MiB)

    def model_config(self) -> GPTConfig:
        return GPTConfig(block_size=self.block_size, vocab_size=self.vocab_size, n_layer=self.n_layer,
                         n_head=self.n_head, n_embd=self.n_embd)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Training defaults that differ per preset (the gpt2-* presets use the 124M run's schedule unchanged).
PRESET_TRAINING = {
    "tiny": dict(
        micro_batch=8, seq_len=128, total_batch_tokens=1024, max_steps=contract.PRESET_MAX_STEPS["tiny"], warmup_steps=20, max_lr=3e-3,
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

# Compile modes with CUDA graphs (reduce-overhead, max-autotune) are left out on purpose: with gradient
# accumulation they hand a graph-owned buffer to .grad and the next micro-step overwrites it (pytorch#169545).
CHOICES = {"device": ("auto", "cuda", "mps", "cpu"), "dtype": ("auto", "bfloat16", "float32"), "compile": ("auto", "on", "off"),
           "compile_mode": ("default", "tuned", "autotune", "max-autotune-no-cudagraphs"), "sdpa_backend": ("auto", *SDPA_BACKENDS),
           "residual_dtype": ("auto", "float32", "bfloat16"), "tensorboard": ("on", "off")}
# Inductor settings per compile mode that is ours rather than torch's. "tuned" is max-autotune-no-cudagraphs without
# its GEMM autotuning: Inductor tries block sizes for its own fused kernels (norms, GELU, the loss, casts) by
# coordinate descent and keeps the fastest; the matmuls stay cuBLAS, since GEMM autotuning can crash the run (a
# Triton template's illegal memory access: docs/BENCHMARKS.md). "autotune" is max-autotune-no-cudagraphs with each
# GEMM candidate benchmarked in a child process: a Triton template that faults the GPU kills that child and drops
# out of the race instead of killing the run. Only with GEMM autotuning can Inductor fuse an epilogue (the GELU after
# the MLP's first matmul, casts) into a matmul of its own, saving a round trip of that tensor through memory.
COMPILE_OPTIONS = {"tuned": {"coordinate_descent_tuning": True},
                   "autotune": {"max_autotune": True, "coordinate_descent_tuning": True, "autotune_in_subproc": True}}
# Attention backends that exist only on CUDA: asking for them elsewhere is a mistake, not a silent fallback.
CUDA_ONLY_SDPA = ("cudnn", "efficient")


# W&B project and run names: no slash inside either, none of the characters W&B refuses in a project name.
WANDB_SPEC = re.compile(r"[^/\\#?%:\s]+(/[^/\\#?%:\s]+)?")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def preset_table(recipe: str) -> dict[str, dict]:
    """The --preset table of a recipe: its own, or the GPT-2 sizes above."""
    if recipe not in recipes.names():
        raise UserError(f"--recipe must be one of {', '.join(recipes.names())}, got {recipe!r}")
    return recipes.get(recipe).presets or PRESETS


def val_steps(cfg: TrainConfig, world_size: int) -> int:
    """Validation micro-batches per rank and evaluation: --val-tokens spread over the ranks, else --val-steps."""
    if not cfg.val_tokens:
        return cfg.val_steps
    return cfg.val_tokens // (world_size * cfg.micro_batch * (cfg.val_seq_len or cfg.seq_len))


def from_dict(values: dict) -> TrainConfig:
    """Build a config from a preset plus explicit overrides; unknown keys are an error, not ignored."""
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(f"unknown config key {unknown[0]!r}: see `python -m job.train --help` for the valid options")
    preset = values.get("preset", TrainConfig.preset)
    table = preset_table(values.get("recipe", TrainConfig.recipe))
    if preset not in table:
        raise UserError(f"unknown preset {preset!r}: choose one of {', '.join(table)}")
    merged = {**table[preset], **{k: v for k, v in values.items() if v is not None or k == "hellaswag_path"}}
    cfg = TrainConfig(**{k: v for k, v in merged.items() if k in names})
    for k in ("n_layer", "n_head", "n_embd", "block_size"):
        if getattr(cfg, k) is None:
            setattr(cfg, k, GPTConfig.__dataclass_fields__[k].default)
    return cfg


def parse_settings(items: list[str], where: str, extra: tuple[str, ...] = ()) -> dict:
    """KEY=VALUE strings (a script's --set) -> {TrainConfig field: value of the field's type}; `extra` names keys
    the caller takes besides the fields (ints)."""
    types = {f.name: f.type for f in fields(TrainConfig)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or (key not in types and key not in extra):
            raise UserError(f"{where}: {item!r} is not key=value with a TrainConfig field (see python -m job.train --help)"
                            + "".join(f" or {k}" for k in extra))
        kind = {"int": int, "float": float}.get(str(types.get(key, "int")).split(" ")[0], str)
        try:
            out[key] = kind(value)
        except ValueError:
            raise UserError(f"{where}: {key} expects {kind.__name__}, got {value!r}") from None
    return out


def validate(cfg: TrainConfig, world_size: int = 1) -> TrainConfig:
    def bad(name, msg):
        raise UserError(f"{flag(name)} {msg}")

    for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "micro_batch", "seq_len", "total_batch_tokens",
                 "max_steps", "val_steps", "log_every", "ddp_bucket_mb"):
        if getattr(cfg, name) <= 0:
            bad(name, f"must be a positive integer, got {getattr(cfg, name)}")
    for name in ("val_seq_len", "val_tokens",
                 "warmup_steps", "sample_num", "eval_every", "hellaswag_every", "hellaswag_limit", "sample_every", "sample_tokens",
                 "checkpoint_every", "keep_every", "keep_last", "checkpoint_minutes", "weight_decay", "grad_clip", "ce_chunk_tokens",
                 "prefetch"):
        if getattr(cfg, name) < 0:
            bad(name, f"must be >= 0, got {getattr(cfg, name)}")
    if cfg.n_embd % cfg.n_head:
        bad("n_embd", f"({cfg.n_embd}) must be divisible by --n-head ({cfg.n_head})")
    if cfg.seq_len > cfg.block_size:
        bad("seq_len", f"({cfg.seq_len}) exceeds the model's block size ({cfg.block_size}): lower it or raise --block-size")
    if cfg.vocab_size < 50257:
        bad("vocab_size", f"({cfg.vocab_size}) must be at least GPT-2's 50257 tokens")
    if not 0 < cfg.max_lr < 1:
        bad("max_lr", f"must be in (0, 1), got {cfg.max_lr}")
    if not 0 <= cfg.min_lr_ratio <= 1:
        bad("min_lr_ratio", f"must be in [0, 1], got {cfg.min_lr_ratio}")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(cfg, name) < 1:
            bad(name, f"must be in [0, 1), got {getattr(cfg, name)}")
    if cfg.eps <= 0:
        bad("eps", f"must be > 0, got {cfg.eps}")
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            bad(name, f"must be one of {', '.join(choices)}, got {getattr(cfg, name)!r}")
    per_step = cfg.micro_batch * cfg.seq_len * world_size
    if cfg.recipe not in recipes.names():
        bad("recipe", f"must be one of {', '.join(recipes.names())}, got {cfg.recipe!r}")
    recipes.get(cfg.recipe).check(cfg, world_size)  # before the batch arithmetic: its rules say what to change first
    if cfg.total_batch_tokens % per_step:
        raise UserError(
            f"--total-batch-tokens {cfg.total_batch_tokens} is not divisible by micro-batch x seq-len x world size "
            f"= {cfg.micro_batch} x {cfg.seq_len} x {world_size} = {per_step}: pick a multiple of {per_step}"
        )
    val_batch = world_size * cfg.micro_batch * (cfg.val_seq_len or cfg.seq_len)
    if cfg.val_tokens and cfg.val_tokens % val_batch:
        raise UserError(f"--val-tokens {cfg.val_tokens} is not a whole number of validation batches of micro-batch x "
                        f"val-seq-len x world size = {val_batch} tokens: pick a multiple of {val_batch}")
    if (cfg.val_seq_len or cfg.seq_len) > cfg.block_size:
        bad("val_seq_len", f"({cfg.val_seq_len}) exceeds the model's block size ({cfg.block_size}): lower it or raise --block-size")
    if cfg.resume not in ("auto", "never") and not os.path.isfile(cfg.resume):
        bad("resume", f"checkpoint {cfg.resume} does not exist: pass auto, never or the path of a model_*.pt file")
    if cfg.hellaswag_path and not os.path.isfile(cfg.hellaswag_path):
        bad("hellaswag_path", f"file {cfg.hellaswag_path} does not exist: pass a hellaswag_val.jsonl or --hellaswag-every 0")
    if cfg.wandb is not None and not WANDB_SPEC.fullmatch(cfg.wandb):
        bad("wandb", f"must be PROJECT or PROJECT/RUN (no spaces, and none of \\ # ? % : in the names), got {cfg.wandb!r}")
    if cfg.init_from is not None:
        if not cfg.init_from.startswith("hf:"):
            bad("init_from", f"must be hf:DIR (a Hugging Face GPT-2 model directory, e.g. from `python -m job.export`), got {cfg.init_from!r}")
        from job.hf import check_init_from  # reads the directory's config.json, so a mismatch fails before any work

        check_init_from(cfg.init_from, cfg.model_config())
    return cfg


HELP = {
    "preset": "model size and its training defaults",
    "recipe": "what is trained and how: model, optimizers, schedules (job/recipes/)",
    "micro_batch": "sequences per forward pass per process (B); lower it if the GPU runs out of memory",
    "seq_len": "tokens per sequence (T)",
    "total_batch_tokens": "tokens per optimizer step, reached by gradient accumulation",
    "min_lr_ratio": "final LR as a fraction of --max-lr",
    "data_dir": "directory of *train*/*val* .npy shards",
    "log_dir": "checkpoints, train.log, metrics.jsonl, log.txt",
    "eval_every": "val loss every N steps (0: only at the end)",
    "val_seq_len": "tokens per validation sequence (0: --seq-len)",
    "val_tokens": "validation tokens per evaluation over all ranks, e.g. a recipe's fixed validation set (0: --val-steps decides)",
    "hellaswag_every": "HellaSwag every N steps (0: off)",
    "hellaswag_path": "local hellaswag_val.jsonl (default: downloaded once into DATA_DIR/../hellaswag)",
    "hellaswag_url": "where to download the val jsonl from when no cached copy exists",
    "hellaswag_limit": "evaluate only the first N examples (0: all)",
    "sample_every": "print samples every N steps (0: only at the end)",
    "sample_num": "samples per sampling event (0: off)",
    "checkpoint_every": "save every N steps (0: only at the end)",
    "checkpoint_minutes": "also save when this many minutes passed since the last save (0: off)",
    "keep_last": "keep the newest N checkpoints (0: keep all)...",
    "keep_every": "...plus every checkpoint whose step is a multiple of N",
    "resume": "auto (newest checkpoint in --log-dir) | never | PATH",
    "init_from": "hf:DIR: start from the weights of a Hugging Face GPT-2 model directory (e.g. written by job.export)",
    "tensorboard": "TensorBoard event files in --log-dir (`tensorboard --logdir LOG`, make dashboard, fab dashboard)",
    "wandb": "PROJECT or PROJECT/RUN: log to Weights & Biases too; a restart continues the same W&B run "
             "(WANDB_MODE=offline keeps it on disk)",
    "device": "auto picks cuda, then mps, then cpu",
    "dtype": "auto: bf16 autocast on CUDA, fp32 elsewhere",
    "compile": "torch.compile; auto: on for CUDA",
    "compile_mode": "torch.compile mode; tuned: default plus Inductor's coordinate-descent tuning of its own kernels; "
                    "autotune: max-autotune-no-cudagraphs with GEMM candidates timed in child processes, so a faulting "
                    "kernel is dropped, not fatal (CUDA-graph modes are not offered: they break gradient accumulation)",
    "residual_dtype": "dtype of the residual stream between blocks: auto is bfloat16 under bf16 autocast on CUDA (half the memory "
                      "traffic of the residual adds and layer norms), float32 keeps build-nanogpt's fp32 stream exactly",
    "sdpa_backend": "attention kernel to try first (the others stay as fallbacks; math runs alone); auto: torch's own order "
                    "(cuDNN first on H100/H200 with torch >= 2.11, else flash); cudnn and efficient need CUDA",
    "ce_chunk_tokens": "compute the loss fused with the output layer, N tokens at a time, never holding the full logits (0: off)",
    "prefetch": "batches copied ahead to the device from pinned memory (0: copy each batch when it is used)",
    "ddp_bucket_mb": "DDP all-reduce bucket size in MiB",
}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m job.train", description="Train GPT-2 (build-nanogpt reproduction, or --recipe "
                "speedrun: modded-nanogpt's record). Every option overrides the preset's default (a recipe may have its own presets).")
    for f in fields(TrainConfig):
        kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
        default = GPTConfig.__dataclass_fields__[f.name].default if f.default is None and f.name in GPTConfig.__dataclass_fields__ \
            else f.default
        tiny = f", tiny: {PRESETS['tiny'][f.name]!r}" if f.name in PRESETS["tiny"] else ""
        help_text = (HELP[f.name] + " " if f.name in HELP else "") + f"(default {default!r}{tiny})"
        kw = dict(dest=f.name, default=None, help=help_text, metavar={int: "N", float: "X"}.get(kind, "VALUE"))
        if f.name == "preset":
            kw.update(choices=list(PRESETS), metavar="{" + ",".join(PRESETS) + "}")
        elif f.name == "recipe":
            kw.update(choices=recipes.names(), metavar="{" + ",".join(recipes.names()) + "}")
        elif f.name in CHOICES:
            kw.update(choices=list(CHOICES[f.name]), metavar="{" + ",".join(CHOICES[f.name]) + "}")
        else:
            kw["type"] = {int: int_arg(), float: float_arg()}.get(kind, str)
        p.add_argument(flag(f.name), **kw)
    return p


def parse_args(argv: list[str] | None = None, world_size: int = 1) -> TrainConfig:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return validate(from_dict({k: v for k, v in vars(args).items() if v is not None}), world_size)


