"""Training recipes: what a run trains and how, behind one small interface, so that the loop in job/train.py
serves any of them unchanged. `--recipe NAME` picks one.

A recipe supplies three things (see `Recipe`):

- build_model(cfg, device, compute_dtype): the model, on `device` (compute_dtype: autocast's, None for fp32). The
  trainer calls `forward(idx, targets) -> (logits, loss)` (the mean loss), `num_params()` and
  `flops_per_token(seq_len)`; HellaSwag and sampling, when on, also `forward(idx)`, `config.block_size` and
  `generate(...)` (job/hellaswag.py, job/sample.py). The trainer seeds torch's RNG with cfg.seed for this call
  only (the process's RNG is left as it was), so the initial weights follow from the config.
- build_optimizers(model, cfg, device_type): a list of torch optimizers (one, or several: e.g. Muon for the
  matrices and Adam for the rest). The trainer steps, zeroes and checkpoints them together (job.optim.Optimizers).
- schedule(optimizers, step, cfg): set this step's hyperparameters in the param groups (learning rate, and e.g.
  a momentum warm-up); called once per step after the gradients are summed and clipped (--grad-clip), right
  before the optimizers step. Return the values to log: "lr" (the step's log line) and any others (metrics.jsonl).

Optionally (the defaults suit a GPT-2-like model under autocast):

- presets: the recipe's own --preset table (name -> TrainConfig defaults), instead of job.config's.
- check(cfg, world_size): refuse settings this recipe cannot run (raise job.errors.UserError).
- model_schedule(model, step, cfg): set step-dependent model state (e.g. an attention window) before the step's
  evaluation, sampling and forward.
- autocast: False when the model sets its own precision (build_model's compute_dtype says which), so the trainer
  runs it without autocast.
- backward_scale(cfg): the factor on the mean loss whose gradient the step takes (1: the mean's; tokens per
  micro-batch: the summed loss's, as some recipes train).
- model_from_config(config): the model a checkpoint's "config" describes (job.checkpoint.load_model, for job.sample
  and job.export).

Hyperparameters come from TrainConfig (max_lr, warmup_steps, weight_decay, ...); `optimizers` is a
job.optim.Optimizers, which iterates over the recipe's optimizers in the order build_optimizers gave them.

A recipe is a module in this package that defines `RECIPE` (found when the package is imported), or any object
passed to `register()`. The name is the --recipe value; checkpoints record it, and a run refuses to resume
another recipe's checkpoint.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from job.config import TrainConfig
    from job.optim import Optimizers

DEFAULT = "gpt2"


class Recipe:
    """The interface; subclass it and override the three methods (and `describe`, optionally)."""

    name: str = ""

    def build_model(self, cfg: TrainConfig, device: str, compute_dtype: torch.dtype | None) -> torch.nn.Module:
        raise NotImplementedError

    def build_optimizers(self, model: torch.nn.Module, cfg: TrainConfig, device_type: str) -> list[torch.optim.Optimizer]:
        raise NotImplementedError

    def schedule(self, optimizers: Optimizers, step: int, cfg: TrainConfig) -> dict[str, float]:
        raise NotImplementedError

    def describe(self, model: torch.nn.Module, cfg: TrainConfig) -> str:
        """Settings of this recipe worth a word in the run's first log line (" | ..." parts), or ""."""
        return ""

    presets: dict[str, dict] | None = None
    autocast: bool = True

    def check(self, cfg: TrainConfig, world_size: int) -> None:
        return None

    def model_schedule(self, model: torch.nn.Module, step: int, cfg: TrainConfig) -> None:
        return None

    def backward_scale(self, cfg: TrainConfig) -> float:
        return 1.0

    def model_from_config(self, config: dict) -> torch.nn.Module:
        raise NotImplementedError


_REGISTRY: dict[str, Recipe] = {}


def register(recipe: Recipe) -> Recipe:
    if not recipe.name:
        raise ValueError(f"{type(recipe).__name__} has no name")
    _REGISTRY[recipe.name] = recipe
    return recipe


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def names() -> list[str]:
    return list(_REGISTRY)


def get(name: str) -> Recipe:
    return _REGISTRY[name]


def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "RECIPE"):
            register(module.RECIPE)


_discover()
