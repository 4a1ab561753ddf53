"""Training recipes: what a run trains and how, each one module in this package, so that the loop in job/train.py
serves any of them unchanged. `--recipe NAME` picks one.

A recipe module is its card: importing it needs no torch, because the laptop's launcher (no torch there) reads the
same module as the trainer. The card is the class attributes of its `Recipe`:

- name, summary: the --recipe value and one line for --help and the launcher.
- Hparams: a dataclass of the recipe's own hyperparameters, each field with `help` in its metadata (see hparam()).
  Only the chosen recipe's flags are offered: `--recipe speedrun-2025-05-24 --max-lr 1e-4` is one `error:` line, not a setting
  silently ignored. A run's values are TrainConfig.hp.
- presets: --preset name -> defaults, for TrainConfig fields and Hparams fields alike (the first is the default).
- data: the corpus it trains on (a job.contract.HUB_SHARDS key); bundled_presets: presets that train on the
  bundled corpus instead.
- published: the step time of a published run of it (what a price rests on until a run of ours measures one).
- check(cfg, world_size): refuse what this recipe cannot run, torch-free, so the launcher refuses it too;
  check_files(cfg) and check_runtime(cfg, device_type, compute_dtype): what only the trainer's machine can check.
- step_layout(step, cfg): this step's micro-batch, sequence length and tokens (a recipe may stage them);
  train_tokens(cfg) sums them, which is what a download is sized to.
- divergence_advice(cfg): what to change after the run diverged, in this recipe's own flags.

What the trainer calls (these import torch inside, never at the module's top):

- build_model(cfg, device, compute_dtype): the model on `device` (compute_dtype: autocast's, None for fp32). The
  trainer calls `num_params()` and `flops_per_token(seq_len)`; HellaSwag and sampling, when on, `forward(idx)`,
  `config.block_size` and `generate(...)`. The trainer seeds torch's RNG with cfg.seed for this call only.
- build_optimizers(model, cfg, device_type): a list of torch optimizers, stepped, zeroed and checkpointed together
  (state_dict() on every rank, so that an optimizer whose state is sharded across the ranks can gather it).
- schedule(optimizers, step, cfg): set this step's hyperparameters in the param groups, right before the optimizers
  step; return the values to log: "lr" (the step's log line) and any others (metrics.jsonl).
- loss(model, x, y): the micro-batch's mean loss (default: `model(x, y)[1]`, a GPT's forward).
- loader(data_dir, split, micro_batch, seq_len, rank, world, pin_memory, step_tokens): the batches' source (default:
  the interleaved windows of job.data.ShardLoader, moving to the next shard as build-nanogpt's loader does); its
  next_batch(B, T) takes the step's layout. step_tokens: the tokens of one step over all ranks and micro-steps (None
  for a staged recipe's train split), for a loader that keeps each step within one shard.
- grad_clip(cfg): the gradient norm clipped to (0: none; the norm is logged either way).
- model_schedule(model, step, cfg): step-dependent model state (e.g. an attention window), before evaluation too.
  It runs on every rank: under DDP the model's buffers are broadcast once, when DDP wraps it, not before each
  forward, so they must follow from the config and this schedule alone. job.checkpoint.load_model calls it too, with
  the checkpoint's step and settings, so a loaded model samples with the state its run evaluated with.
- reduces_gradients: True when the recipe's optimizers average the ranks' gradients themselves (a sharded optimizer
  reduce-scatters them, say). The trainer then does not wrap the model in DDP: every rank starts from rank 0's
  weights and buffers, accumulates its micro-steps' gradients locally, and the optimizers' step reduces them. The
  gradient norm the trainer logs (and clips to: such a recipe leaves grad_clip at 0) is then each rank's own, before
  the reduction.
- autocast: False when the model keeps its own precision. backward_scale(cfg, layout): the factor on the mean loss whose
  gradient the step takes (tokens per micro-batch: the summed loss's, as some recipes train).
- model_from_config(config): the model a checkpoint's "config" describes (job.checkpoint.load_model, for job.sample
  and job.export).
- init_from(model, cfg): load the weights a setting names, or return None; the trainer logs what it returns.

A recipe is a module in this package that defines `RECIPE`, found when the package is imported, or any object passed
to `register()`. Checkpoints record the name, and a run refuses to resume another recipe's checkpoint.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from job.config import TrainConfig

DEFAULT = "gpt2"


def hparam(default: Any, help: str, **kw) -> Any:  # noqa: A002 (argparse's word)
    """A field of a recipe's Hparams: its default and the --help text of its flag."""
    return dataclasses.field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class Published:
    """A published run of a recipe: its step time on the hardware it ran on."""

    step_seconds: float
    on: str  # the Lambda instance type closest to the hardware of that report
    source: str  # who published it, in words


@dataclass(frozen=True)
class StepLayout:
    micro_batch: int  # sequences per forward pass per rank
    seq_len: int
    tokens: int  # tokens of the whole step, over all ranks and micro-steps


@dataclass
class NoHparams:
    """A recipe with no hyperparameters of its own."""


class Recipe:
    """The interface; subclass it, fill in the card and override build_model, build_optimizers and schedule."""

    name: str = ""
    summary: str = ""
    Hparams: type = NoHparams
    presets: dict[str, dict] = {}
    data: str = "finewebedu-gpt2"
    bundled_presets: tuple[str, ...] = ()
    published: Published | None = None
    autocast: bool = True
    reduces_gradients: bool = False

    # --- the card's rules (torch-free: the launcher calls them too) -----------------------------------
    def check(self, cfg: TrainConfig, world_size: int) -> None:
        return None

    def check_files(self, cfg: TrainConfig) -> None:
        """Refuse settings that name files this machine reads (the trainer's side only)."""
        return None

    def check_runtime(self, cfg: TrainConfig, device_type: str, compute_dtype) -> None:
        """Refuse settings this device cannot run (the trainer's side only, once the device is known)."""
        return None

    def step_layout(self, step: int, cfg: TrainConfig) -> StepLayout:
        return StepLayout(cfg.micro_batch, cfg.seq_len, cfg.total_batch_tokens)

    def staged(self, cfg: TrainConfig) -> bool:
        """Whether the layout changes during the run (the trainer then checks every step's, and sizes loaders to the
        largest)."""
        return False

    def train_tokens(self, cfg: TrainConfig) -> int:
        if not self.staged(cfg):
            return cfg.max_steps * self.step_layout(0, cfg).tokens
        return sum(self.step_layout(step, cfg).tokens for step in range(cfg.max_steps))

    def divergence_advice(self, cfg: TrainConfig | None) -> str:
        return "a lower learning rate"

    def describe(self, model: torch.nn.Module, cfg: TrainConfig) -> str:
        """Settings of this recipe worth a word in the run's first log line (" | ..." parts), or ""."""
        return ""

    # --- what the trainer runs -------------------------------------------------------------------------
    def build_model(self, cfg: TrainConfig, device: str, compute_dtype: torch.dtype | None) -> torch.nn.Module:
        raise NotImplementedError

    def build_optimizers(self, model: torch.nn.Module, cfg: TrainConfig, device_type: str) -> list[torch.optim.Optimizer]:
        raise NotImplementedError

    def schedule(self, optimizers, step: int, cfg: TrainConfig) -> dict[str, float]:
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return model(x, y)[1]

    def batch_taken(self, optimizers, x: torch.Tensor, y: torch.Tensor) -> None:
        """Each training micro-batch, in host memory, in the order the steps take them (prefetching and rewinds
        already settled): for an optimizer that must know what a batch touched before its step."""
        return None

    def loader(self, data_dir, split: str, micro_batch: int, seq_len: int, rank: int, world: int, pin_memory: bool = False,
               step_tokens: int | None = None):
        from job.data import ShardLoader

        return ShardLoader(data_dir, split, micro_batch, seq_len, rank, world, pin_memory=pin_memory)

    def grad_clip(self, cfg: TrainConfig) -> float:
        return 0.0

    def init_from(self, model: torch.nn.Module, cfg: TrainConfig) -> str | None:
        return None

    def model_schedule(self, model: torch.nn.Module, step: int, cfg: TrainConfig) -> None:
        return None

    def backward_scale(self, cfg: TrainConfig, layout: StepLayout) -> float:
        return 1.0

    def model_from_config(self, config: dict) -> torch.nn.Module:
        raise NotImplementedError

    # --- the card, as the parser and the launcher read it ------------------------------------------------
    @classmethod
    def hparam_fields(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls.Hparams))

    @property
    def default_preset(self) -> str:
        return next(iter(self.presets))


_REGISTRY: dict[str, Recipe] = {}


def register(recipe: Recipe) -> Recipe:
    if not recipe.name:
        raise ValueError(f"{type(recipe).__name__} has no name")
    if not recipe.presets:
        raise ValueError(f"recipe {recipe.name} has no presets")
    _REGISTRY[recipe.name] = recipe
    return recipe


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def names() -> list[str]:
    return list(_REGISTRY)


def get(name: str) -> Recipe:
    return _REGISTRY[name]


def owner_of(flag_name: str) -> list[str]:
    """The recipes whose Hparams have this field."""
    return [n for n, r in _REGISTRY.items() if flag_name in {f.name for f in r.hparam_fields()}]


def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "RECIPE"):
            register(module.RECIPE)


_discover()
