"""Where a run executes: the device, the process group under torchrun, autocast, and the one collective of every
training step (`agree`), by which all ranks take the same decisions."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from job.config import TrainConfig
from job.errors import UserError
from job.sample import default_device


@dataclass
class Runtime:
    ddp: bool
    rank: int
    local_rank: int
    world: int
    device: str
    device_type: str

    @property
    def master(self) -> bool:
        return self.rank == 0


def pick_device(requested: str) -> str:
    if requested == "auto":
        return default_device()
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible: use --device auto or cpu")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for but MPS is not available: use --device auto or cpu")
    return requested


def under_ddp() -> bool:
    """Started by torchrun with other ranks (gloo or NCCL process group)."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup_runtime(cfg: TrainConfig) -> Runtime:
    device = pick_device(cfg.device)
    ddp = under_ddp()
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    if device == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if ddp:
        # NCCL between GPUs; gloo lets the same code run as several CPU processes (tests, laptops).
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Runtime(ddp, rank, local_rank, world, device, device.split(":")[0])


def autocast_ctx(cfg: TrainConfig, rt: Runtime):
    """(the autocast context of forward passes, its compute dtype or None for fp32)."""
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if rt.device_type == "cuda" else "float32")
    if dtype == "bfloat16":
        # Weights and optimizer stay fp32; matmuls run in bf16 (no loss scaling needed, unlike fp16).
        return torch.autocast(device_type=rt.device_type, dtype=torch.bfloat16), torch.bfloat16
    return contextlib.nullcontext(), None


def all_reduce(rt: Runtime, t: torch.Tensor, op=None) -> torch.Tensor:
    """Sum (or `op`) over the ranks, in place; a single process has nothing to add."""
    if rt.ddp:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


@dataclass
class Requests:
    """What one rank wants after a step: stop (a signal or the stop file), save now (minutes passed), or stop
    because a checkpoint write failed (only the master writes, so only it knows)."""

    stop: bool = False
    save: bool = False
    failed: bool = False


@dataclass
class Agreed(Requests):
    """The step's outcome every rank acts on: the requests of any rank, and the loss and gradient norm averaged
    over the ranks (None where the step was not read back)."""

    loss: float | None = None
    norm: float | None = None


def agree(rt: Runtime, loss: torch.Tensor, norm: torch.Tensor, wants: Requests, read_back: bool) -> Agreed:
    """At most one host sync per step. Under DDP the loss, the norm and every rank's requests travel in one
    all-reduce and are read back every step, so all ranks take the same decision (a rank that stopped alone would
    hang the others in their next collective). A single process reads back only when asked (steps that log):
    between those the host queues step after step without waiting for the device."""
    if not (rt.ddp or read_back):
        return Agreed(wants.stop, wants.save, wants.failed)
    flags = torch.tensor([float(wants.stop), float(wants.save), float(wants.failed)], device=rt.device)
    packed = torch.cat([loss.float().view(1), norm.float().view(1), flags])
    loss_v, norm_v, stop, save, failed = all_reduce(rt, packed).tolist()
    return Agreed(bool(stop), bool(save), bool(failed), loss=loss_v / rt.world, norm=norm_v / rt.world)
