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
    """Started by torchrun with other ranks (gloo or NCCL process group). Never raises: it is asked again on the
    way out, after a malformed variable was reported (dist_env)."""
    try:
        return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


_UNSET = "unset RANK, LOCAL_RANK and WORLD_SIZE to train in one process, or start the run with torchrun (which sets them all)"


def dist_env() -> tuple[int, int, int]:
    """(rank, local rank, world size) from torchrun's variables, or one line naming the one that cannot be: not a
    whole number, out of range, or a distributed run without MASTER_ADDR / MASTER_PORT to meet at."""
    values = {}
    for name, default in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)):
        text = os.environ.get(name, "").strip()
        try:
            values[name] = int(text) if text else default
        except ValueError:
            err = UserError(f"{name}={text!r} in the environment is not a whole number: {_UNSET}")
            err.every_rank = True  # a LOCAL_RANK that is not "0" would otherwise keep every rank quiet
            raise err from None
    rank, local_rank, world = values["RANK"], values["LOCAL_RANK"], values["WORLD_SIZE"]
    if world < 1 or not 0 <= rank < world or local_rank < 0:
        err = UserError(f"RANK={rank}, LOCAL_RANK={local_rank}, WORLD_SIZE={world} in the environment: every rank must be in "
                        f"0..WORLD_SIZE-1 and WORLD_SIZE at least 1: {_UNSET}")
        err.every_rank = True
        raise err
    if "RANK" in os.environ and world > 1:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k, "").strip()]
        if missing:
            raise UserError(f"RANK and WORLD_SIZE={world} are set (a distributed run) but {' and '.join(missing)} "
                            f"{'is' if len(missing) == 1 else 'are'} not, so the ranks have nowhere to meet: {_UNSET}")
    return rank, local_rank, world


def setup_runtime(cfg: TrainConfig) -> Runtime:
    rank, local_rank, world = dist_env()
    device = pick_device(cfg.device)
    ddp = under_ddp()
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
