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
