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
from typing import Any

from job import contract, recipes
from job.errors import ArgumentParser, SettingsMismatch, UserError, flags_of, float_arg, int_arg
from job.gpt_config import PADDED_VOCAB, GPTConfig


@dataclass
class TrainConfig:
    """What every recipe's run has. The recipe's own hyperparameters are `hp` (its card's Hparams, job/recipes/)."""

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
    max_steps: int = 19073  # one epoch of FineWeb-edu 10B at 2**19 tokens a step
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
    # hardware
    device: str = "auto"  # auto | cuda | mps | cpu
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 elsewhere) | bfloat16 | float32
    compile: str = "auto"  # auto (on for CUDA) | on | off
    compile_mode: str = "default"  # default | tuned | autotune | max-autotune-no-cudagraphs (see COMPILE_OPTIONS, and CHOICES for why no CUDA graphs)
    prefetch: int = 1  # batches copied (pinned, non-blocking) to the device ahead of use; 0: copy when used
    ddp_bucket_mb: int = 25  # DDP gradient all-reduce bucket size (MiB)
    # the recipe's own hyperparameters: an instance of its card's Hparams (from_dict fills it in)
    hp: Any = None

    def model_config(self) -> GPTConfig:
        return GPTConfig(block_size=self.block_size, vocab_size=self.vocab_size, n_layer=self.n_layer,
                         n_head=self.n_head, n_embd=self.n_embd)

    def to_dict(self) -> dict:
        """The run's settings and the recipe's own, in one flat dict (what from_dict takes back; checkpoints, the start
        event and the dashboards record it)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "hp"}
        return {**out, **(dataclasses.asdict(self.hp) if self.hp is not None else {})}

    def replace(self, **values) -> TrainConfig:
        """A copy with these settings changed, run settings or the recipe's own alike (another recipe's is an error)."""
        return from_dict({**self.to_dict(), **values})

    @property
    def card(self) -> recipes.Recipe:
        return recipes.get(self.recipe)


# Compile modes with CUDA graphs (reduce-overhead, max-autotune) are left out on purpose: with gradient
# accumulation they hand a graph-owned buffer to .grad and the next micro-step overwrites it (pytorch#169545).
CHOICES = {"device": ("auto", "cuda", "mps", "cpu"), "dtype": ("auto", "bfloat16", "float32"), "compile": ("auto", "on", "off"),
           "compile_mode": ("default", "tuned", "autotune", "max-autotune-no-cudagraphs"), "tensorboard": ("on", "off")}
# Inductor settings per compile mode that is ours rather than torch's. "tuned" is max-autotune-no-cudagraphs without
# its GEMM autotuning: Inductor tries block sizes for its own fused kernels (norms, GELU, the loss, casts) by
# coordinate descent and keeps the fastest; the matmuls stay cuBLAS, since GEMM autotuning can crash the run (a
# Triton template's illegal memory access: docs/BENCHMARKS.md). "autotune" is max-autotune-no-cudagraphs with each
# GEMM candidate benchmarked in a child process: a Triton template that faults the GPU kills that child and drops
# out of the race instead of killing the run. Only with GEMM autotuning can Inductor fuse an epilogue (the GELU after
# the MLP's first matmul, casts) into a matmul of its own, saving a round trip of that tensor through memory.
COMPILE_OPTIONS = {"tuned": {"coordinate_descent_tuning": True},
                   "autotune": {"max_autotune": True, "coordinate_descent_tuning": True, "autotune_in_subproc": True}}


# W&B project and run names: no slash inside either, none of the characters W&B refuses in a project name.
WANDB_SPEC = re.compile(r"[^/\\#?%:\s]+(/[^/\\#?%:\s]+)?")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def card(recipe: str) -> recipes.Recipe:
    if recipe not in recipes.names():
        raise UserError(f"--recipe must be one of {', '.join(recipes.names())}, got {recipe!r}")
    return recipes.get(recipe)


def preset_table(recipe: str) -> dict[str, dict]:
    """The --preset table of a recipe (its card's)."""
    return card(recipe).presets


def val_steps(cfg: TrainConfig, world_size: int) -> int:
    """Validation micro-batches per rank and evaluation: --val-tokens spread over the ranks, else --val-steps."""
    if not cfg.val_tokens:
        return cfg.val_steps
    return cfg.val_tokens // (world_size * cfg.micro_batch * (cfg.val_seq_len or cfg.seq_len))


RUN_FIELDS = tuple(f.name for f in fields(TrainConfig) if f.name != "hp")


def foreign_setting(key: str, recipe: str) -> UserError | None:
    """The error for a setting that is not this recipe's, or None when it is a setting at all of no recipe."""
    owners = recipes.owner_of(key)
    if not owners:
        return None
    own = [flag(f.name) for f in card(recipe).hparam_fields()]
    return UserError(f"{flag(key)} is a setting of the {' and '.join(owners)} recipe, not of {recipe}, which would ignore it: "
                     f"leave it out" + (f" (the {recipe} recipe's own settings: {', '.join(own)}; "
                                        f"python -m job.train --recipe {recipe} --help)" if own else ""))


def from_dict(values: dict) -> TrainConfig:
    """Build a config from a preset plus explicit overrides (run settings and the recipe's own, in one flat dict);
    unknown keys, and another recipe's settings, are an error, not ignored."""
    recipe = values.get("recipe") or recipes.DEFAULT
    rc = card(recipe)
    own = {f.name for f in rc.hparam_fields()}
    for key in values:
        if key not in RUN_FIELDS and key not in own:
            raise foreign_setting(key, recipe) or UserError(
                f"unknown config key {key!r}: see `python -m job.train --recipe {recipe} --help` for the valid options")
    preset = values.get("preset") or rc.default_preset
    if preset not in rc.presets:
        raise UserError(f"unknown preset {preset!r} for the {recipe} recipe: choose one of {', '.join(rc.presets)}")
    merged = {**rc.presets[preset], **{k: v for k, v in values.items() if v is not None or k == "hellaswag_path"},
              "preset": preset, "recipe": recipe}
    cfg = TrainConfig(**{k: v for k, v in merged.items() if k in RUN_FIELDS},
                      hp=rc.Hparams(**{k: v for k, v in merged.items() if k in own}))
    for k in ("n_layer", "n_head", "n_embd", "block_size"):
        if getattr(cfg, k) is None:
            setattr(cfg, k, GPTConfig.__dataclass_fields__[k].default)
    return cfg


def _kind(f) -> type:
    """int, float or str, from a field's annotation (a string under `from __future__ import annotations`)."""
    name = f.type.__name__ if isinstance(f.type, type) else str(f.type).split(" ")[0]
    return {"int": int, "float": float}.get(name, str)


def setting_types() -> dict[str, type]:
    """Every setting's type: the run's, and every recipe's own (from_dict then says whose a setting is)."""
    types = {f.name: _kind(f) for f in fields(TrainConfig) if f.name != "hp"}
    for name in recipes.names():
        types.update({f.name: _kind(f) for f in recipes.get(name).hparam_fields()})
    return types


def parse_settings(items: list[str], where: str, extra: tuple[str, ...] = ()) -> dict:
    """KEY=VALUE strings (a script's --set) -> {setting: value of the setting's type}; `extra` names keys the caller
    takes besides the settings (ints)."""
    types = setting_types()
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or (key not in types and key not in extra):
            raise UserError(f"{where}: {item!r} is not key=value with a TrainConfig field (see python -m job.train --help)"
                            + "".join(f" or {k}" for k in extra))
        kind = types.get(key, int)
        try:
            out[key] = kind(value)
        except ValueError:
            raise UserError(f"{where}: {key} expects {kind.__name__}, got {value!r}") from None
    return out


def layouts(cfg: TrainConfig) -> list:
    """The distinct step layouts of the run (one, unless the recipe stages its batch)."""
    rc = cfg.card
    if not rc.staged(cfg):
        return [rc.step_layout(0, cfg)]
    return list(dict.fromkeys(rc.step_layout(step, cfg) for step in range(cfg.max_steps)))


SEED_MAX = 2**63 - 1  # torch's generators take a signed 64-bit seed
# Past these a run is a typo, not a plan: the sampling at the end would not finish (job.sample takes the same limits), the
# prefetch would hold the whole data set in memory, the checkpoint planning walks every step, and the layers are built one
# by one before any memory runs out.
UPPER_LIMITS = {"sample_tokens": 100_000, "sample_num": 1024, "prefetch": 64, "max_steps": 10_000_000, "n_layer": 1024}


def _refuse(name: str, msg: str) -> None:
    raise UserError(f"{flag(name)} {msg}")


def _check_values(cfg: TrainConfig) -> None:
    """Each setting on its own: counts, limits, seeds and the strings that must not be empty."""
    for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "micro_batch", "seq_len", "total_batch_tokens",
                 "max_steps", "val_steps", "log_every", "ddp_bucket_mb"):
        if getattr(cfg, name) <= 0:
            _refuse(name, f"must be a positive integer, got {getattr(cfg, name)}")
    for name in ("val_seq_len", "val_tokens", "sample_num", "eval_every", "hellaswag_every", "hellaswag_limit", "sample_every",
                 "sample_tokens", "checkpoint_every", "keep_every", "keep_last", "checkpoint_minutes", "prefetch"):
        if getattr(cfg, name) < 0:
            _refuse(name, f"must be >= 0, got {getattr(cfg, name)}")
    for name, most in UPPER_LIMITS.items():
        if getattr(cfg, name) > most:
            _refuse(name, f"must be at most {most:,}, got {getattr(cfg, name):,}")
    for name in ("seed", "sample_seed"):
        if not 0 <= getattr(cfg, name) <= SEED_MAX:
            _refuse(name, f"must be in 0..{SEED_MAX} (a 64-bit generator's seed), got {getattr(cfg, name)}")
    for name in ("log_dir", "data_dir"):
        if not getattr(cfg, name).strip():
            _refuse(name, "is empty: pass a directory")
    if cfg.sample_num and not cfg.sample_prompt:
        _refuse("sample_prompt", "is empty: pass some text to continue, or --sample-num 0 for no samples")


def validate(cfg: TrainConfig, world_size: int = 1, files: bool = True) -> TrainConfig:
    """Refuse what the run cannot do, in one line each. files=False leaves out what reads this machine's files (the
    launcher checks the trainer's settings on the laptop, where the box's files are not)."""
    _check_values(cfg)
    if cfg.n_embd % cfg.n_head:
        _refuse("n_embd", f"({cfg.n_embd}) must be divisible by --n-head ({cfg.n_head})")
    if cfg.vocab_size < 50257:
        _refuse("vocab_size", f"({cfg.vocab_size}) must be at least GPT-2's 50257 tokens")
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            _refuse(name, f"must be one of {', '.join(choices)}, got {getattr(cfg, name)!r}")
    rc = card(cfg.recipe)
    for f in rc.hparam_fields():
        choices = f.metadata.get("choices")
        if choices and getattr(cfg.hp, f.name) not in choices:
            _refuse(f.name, f"must be one of {', '.join(choices)}, got {getattr(cfg.hp, f.name)!r}")
    rc.check(cfg, world_size)  # before the batch arithmetic: its rules say what to change first
    for lay in layouts(cfg):
        per_step = lay.micro_batch * lay.seq_len * world_size
        if lay.tokens % per_step:
            raise UserError(
                f"--total-batch-tokens {lay.tokens} is not divisible by micro-batch x seq-len x world size "
                f"= {lay.micro_batch} x {lay.seq_len} x {world_size} = {per_step}: pick a multiple of {per_step}"
            )
        if lay.seq_len > cfg.block_size:
            _refuse("seq_len", f"({lay.seq_len}) exceeds the model's block size ({cfg.block_size}): lower it or raise --block-size")
    val_batch = world_size * cfg.micro_batch * (cfg.val_seq_len or cfg.seq_len)
    if cfg.val_tokens and cfg.val_tokens % val_batch:
        raise UserError(f"--val-tokens {cfg.val_tokens} is not a whole number of validation batches of micro-batch x "
                        f"val-seq-len x world size = {val_batch} tokens: pick a multiple of {val_batch}")
    if (cfg.val_seq_len or cfg.seq_len) > cfg.block_size:
        _refuse("val_seq_len", f"({cfg.val_seq_len}) exceeds the model's block size ({cfg.block_size}): lower it or raise --block-size")
    if cfg.wandb is not None and not WANDB_SPEC.fullmatch(cfg.wandb):
        _refuse("wandb", f"must be PROJECT or PROJECT/RUN (no spaces, and none of \\ # ? % : in the names), got {cfg.wandb!r}")
    if files:
        if cfg.resume not in ("auto", "never") and os.path.isdir(cfg.resume):
            _refuse("resume", f"{cfg.resume} is a directory: pass the path of a model_*.pt file in it, or auto to resume from --log-dir")
        if cfg.resume not in ("auto", "never") and not os.path.isfile(cfg.resume):
            _refuse("resume", f"checkpoint {cfg.resume} does not exist: pass auto, never or the path of a model_*.pt file")
        if cfg.hellaswag_path and not os.path.isfile(cfg.hellaswag_path):
            _refuse("hellaswag_path", f"file {cfg.hellaswag_path} does not exist: pass a hellaswag_val.jsonl or --hellaswag-every 0")
        try:
            rc.check_files(cfg)
        except SettingsMismatch as e:
            raise UserError(f"{e.problem}: {fitting(cfg, e, world_size)}") from None
    return cfg


def fitting(cfg: TrainConfig, mismatch: SettingsMismatch, world_size: int) -> str:
    """What to pass for this run to take what `mismatch` asks for: its settings, with what a smaller block forces (shorter
    sequences, in a batch of as many micro-steps), named only once the run they make passes this recipe's own checks,
    as the next run will check it; else what the recipe refuses, and the mismatch's other way. A preset of the recipe
    that fits as it is, is named beside them."""
    change = dict(mismatch.settings)
    block = change.get("block_size", cfg.block_size)
    if cfg.seq_len > block:
        micro_steps = max(cfg.total_batch_tokens // (cfg.micro_batch * cfg.seq_len * world_size), 1)
        change.update(seq_len=block, total_batch_tokens=micro_steps * cfg.micro_batch * block * world_size)
    if cfg.val_seq_len > block:
        change["val_seq_len"] = block
    if cfg.val_tokens:  # as many validation batches as before, of the new length
        before = world_size * cfg.micro_batch * (cfg.val_seq_len or cfg.seq_len)
        after = world_size * cfg.micro_batch * (change.get("val_seq_len", cfg.val_seq_len) or change.get("seq_len", cfg.seq_len))
        if after != before:
            change["val_tokens"] = max(cfg.val_tokens // before, 1) * after
    try:
        validate(cfg.replace(**change), world_size, files=False)
    except UserError as e:
        return f"the {cfg.recipe} recipe cannot take that ({flags_of(change)}: {e}): {mismatch.otherwise}"
    presets = [name for name, table in cfg.card.presets.items() if name != cfg.preset and _fits_as_is(cfg, name, mismatch, world_size)]
    return f"pass {flags_of(change)}" + (f" (or --preset {presets[0]}, which has that shape)" if presets else "")


def _fits_as_is(cfg: TrainConfig, preset: str, mismatch: SettingsMismatch, world_size: int) -> bool:
    """Whether --preset `preset` of this run's recipe, on its own defaults, has what `mismatch` asks for and passes the
    recipe's checks."""
    other = from_dict({"recipe": cfg.recipe, "preset": preset})
    model = {"n_layer", "n_head", "n_embd"}
    for name, value in mismatch.settings.items():
        have = getattr(other, name)
        if name in model and have != value or name == "block_size" and have > value or name == "vocab_size" and have < value:
            return False
    if any(getattr(other, k) != getattr(cfg, k) for k in model - set(mismatch.settings)):
        return False  # the shape the run has already fits: the preset must keep it
    try:
        validate(other, world_size, files=False)
    except UserError:
        return False
    return True


HELP = {
    "preset": "model size and its training defaults (each recipe has its own presets; the first is the default)",
    "recipe": "what is trained and how: model, optimizers, schedules (job/recipes/); --recipe NAME --help lists its own settings",
    "micro_batch": "sequences per forward pass per process (B); lower it if the GPU runs out of memory",
    "seq_len": "tokens per sequence (T)",
    "total_batch_tokens": "tokens per optimizer step, reached by gradient accumulation",
    "max_steps": "optimizer steps of the run",
    "data_dir": "directory of *train*/*val* shards (.npy or .bin)",
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
    "tensorboard": "TensorBoard event files in --log-dir (`tensorboard --logdir LOG`, make dashboard, fab dashboard)",
    "wandb": "PROJECT or PROJECT/RUN: log to Weights & Biases too; a restart continues the same W&B run "
             "(WANDB_MODE=offline keeps it on disk)",
    "device": "auto picks cuda, then mps, then cpu",
    "dtype": "auto: bf16 autocast on CUDA, fp32 elsewhere",
    "compile": "torch.compile; auto: on for CUDA",
    "compile_mode": "torch.compile mode; tuned: default plus Inductor's coordinate-descent tuning of its own kernels; "
                    "autotune: max-autotune-no-cudagraphs with GEMM candidates timed in child processes, so a faulting "
                    "kernel is dropped, not fatal (CUDA-graph modes are not offered: they break gradient accumulation)",
    "prefetch": "batches copied ahead to the device from pinned memory (0: copy each batch when it is used)",
    "ddp_bucket_mb": "DDP all-reduce bucket size in MiB",
}


def _add(p: argparse.ArgumentParser, f, default, help_text: str, preset_defaults: dict, choices=None) -> None:
    kind = _kind(f)
    if default is None and f.name in GPTConfig.__dataclass_fields__:
        default = GPTConfig.__dataclass_fields__[f.name].default
    presets = "".join(f", {name}: {table[f.name]!r}" for name, table in preset_defaults.items() if f.name in table)
    kw = dict(dest=f.name, default=None, help=(help_text + " " if help_text else "") + f"(default {default!r}{presets})",
              metavar={int: "N", float: "X"}.get(kind, "VALUE"))
    if choices:
        kw.update(choices=list(choices), metavar="{" + ",".join(choices) + "}")
    else:
        kw["type"] = {int: int_arg(), float: float_arg()}.get(kind, str)
    p.add_argument(flag(f.name), **kw)


def build_parser(recipe: str = recipes.DEFAULT, raises: bool = False) -> argparse.ArgumentParser:
    """The trainer's flags: the run's, and the chosen recipe's own (no other recipe's)."""
    rc = card(recipe)
    p = ArgumentParser(prog="python -m job.train", raises=raises, description=f"Train with the {recipe} recipe: {rc.summary}. Every option "
                       "overrides the preset's default. Recipes: " + ", ".join(recipes.names()) + " (--recipe NAME --help: its settings).")
    choices = {**CHOICES, "preset": tuple(rc.presets), "recipe": tuple(recipes.names())}
    # The default preset's own values are the defaults; the others' differing values are named beside them.
    others = {name: table for name, table in rc.presets.items() if name != rc.default_preset}
    first = rc.presets[rc.default_preset]
    for f in fields(TrainConfig):
        if f.name != "hp":
            _add(p, f, first.get(f.name, f.default), HELP.get(f.name, ""), others, choices.get(f.name))
    group = p.add_argument_group(f"the {recipe} recipe's own settings")
    for f in rc.hparam_fields():
        _add(group, f, first.get(f.name, f.default), f.metadata.get("help", ""), others, f.metadata.get("choices"))
    return p


def recipe_of(argv: list[str]) -> str:
    """The --recipe an argument list asks for (the default when none); an unknown one is one `error:` line, before any
    flag is judged against a recipe it did not mean."""
    for i, arg in enumerate(argv):
        if arg == "--recipe" and i + 1 < len(argv):
            return card(argv[i + 1]).name
        if arg.startswith("--recipe="):
            return card(arg.split("=", 1)[1]).name
    return recipes.DEFAULT


def parse_args(argv: list[str] | None = None, world_size: int = 1, files: bool = True) -> TrainConfig:
    """The trainer's command line -> a validated TrainConfig. torch-free: the launcher runs it on the laptop too
    (files=False: the paths are the box's)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    recipe = recipe_of(argv)
    own = RUN_FIELDS + tuple(f.name for f in card(recipe).hparam_fields())
    for arg in argv:
        if arg.startswith("--"):
            key = arg[2:].split("=", 1)[0].replace("-", "_")
            if key not in own and (err := foreign_setting(key, recipe)):
                raise err
    args = build_parser(recipe, raises=not files).parse_args(argv)
    return validate(from_dict({k: v for k, v in vars(args).items() if v is not None}), world_size, files)
