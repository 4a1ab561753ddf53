"""How a run ends when it cannot go on: a stop asked for by a signal, memory that ran out, a rank that is gone,
numbers that stopped being finite. Each becomes one line naming the cause and what to do (job.errors.cli_main
prints it); the checkpoint to resume from comes from the run's Checkpointer."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys

import torch
import torch.distributed as dist

from job.config import TrainConfig
from job.errors import RankLost, TrainingDiverged, UserError
from job.runtime import Runtime
from job.supervisor import children


class StopFlag:
    """SIGTERM/SIGINT ask for a clean stop: finish the step, checkpoint, exit 0. A second Ctrl-C aborts.

    Creating one changes nothing; `installed()` puts the handlers in place for the duration of a run and puts the
    previous ones back after it."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False

    @contextlib.contextmanager
    def installed(self):
        previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        if signum == signal.SIGTERM and sibling_gone():
            # torchrun's agent stopping the survivors of a failed rank, not a user's stop: no checkpoint can follow
            # (the next collective fails), so promise none; the failure is said once, by whoever sees it.
            return
        if os.environ.get("LOCAL_RANK", "0") == "0":  # every process got it: one line per machine is enough
            print(f"received {signal.Signals(signum).name}: finishing this step, saving a checkpoint, then exiting "
                  "(Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)


def sibling_gone() -> bool:
    """Under torchrun, whether a rank of this machine has already exited: the agent's children (the workers) are
    fewer than it started. The agent reaps a failed worker before it signals the others."""
    local = os.environ.get("LOCAL_WORLD_SIZE")
    if not (local and local.isdigit() and os.path.isdir("/proc")):
        return False
    return len(children(os.getppid())) < int(local)


def lost_rank(e: BaseException) -> bool:
    # A collective whose peer went away: NCCL's errors are c10d's DistError family; gloo raises a plain
    # RuntimeError naming the connection that closed.
    return isinstance(e, dist.DistError) or any(s in str(e) for s in ("Connection closed by peer", "Connection reset by peer",
                                                                       "Broken pipe"))


def out_of_memory(e: BaseException) -> bool:
    # torch.OutOfMemoryError on CUDA; the CPU allocator says "can't allocate memory" in a plain RuntimeError.
    return isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e) or "out of memory" in str(e)


def oom_error(cfg: TrainConfig, rt: Runtime, step: int) -> UserError:
    """What to change when a step (or an evaluation) did not fit in memory, with the figures that say so."""
    B, T = cfg.micro_batch, cfg.seq_len
    where = f"out of {rt.device_type.upper() if rt.device_type == 'cuda' else rt.device_type} memory at step {step}"
    if rt.world > 1:  # one GPU may be short alone (another process on it): each rank says it for itself
        where = f"rank {rt.rank} ({rt.device}): {where}"
    if rt.device_type == "cuda":
        total = torch.cuda.get_device_properties(rt.device).total_memory
        where += f" (peak {torch.cuda.max_memory_allocated(rt.device) / 2**30:.1f} GiB of {total / 2**30:.1f} GiB)"
    fix = (f"lower --micro-batch, e.g. --micro-batch {B // 2}: gradient accumulation keeps the {cfg.total_batch_tokens:,} "
           "tokens per step" if B > 1 else "lower --seq-len or use a smaller model (--preset)")
    if getattr(cfg.hp, "ce_chunk_tokens", None) == 0:  # the gpt2 recipe's chunked loss, turned off
        fix += f"; --ce-chunk-tokens 8192 also avoids the full {B} x {T} x {cfg.vocab_size} logits"
    err = UserError(f"{where} with micro-batch {B} x seq-len {T}: {fix}")
    err.every_rank = True
    return err


def rank_lost_error(e: BaseException, rt: Runtime, step: int, ckpt) -> RankLost:
    """Another rank is gone: say so on this one in a line (not gloo's or NCCL's traceback), and what to resume.
    `ckpt` is the run's Checkpointer."""
    # gloo: "[.../pair.cc:553] Connection closed by peer [10.0.0.2]:5025. This is typically caused by ..."
    reason = re.sub(r"^\[[^\]]*\]\s*", "", str(e).strip().splitlines()[0]).split(". ")[0]
    msg = (f"rank {rt.rank}: another rank is gone (a collective failed at step {step}: {reason}): this one "
           "stops too, without a checkpoint; the launcher's line names the rank that failed first")
    if rt.master:  # a write in flight finishes first, and is the one to resume from
        msg += "; " + ckpt.resume_hint("rank-lost")
    return RankLost(msg)


def diverged_error(cfg: TrainConfig, rt: Runtime, step: int, what: str, ckpt) -> TrainingDiverged:
    """The run's numbers are no longer finite. NaN never heals (every later update is NaN too), so going on only
    burns the rented box and, worse, would rotate the last good checkpoints out. Saves already in flight hold
    weights checked finite: they land (resume_hint waits for them). Logs the run's end; the caller raises."""
    from job import recipes

    lower = recipes.get(cfg.recipe).divergence_advice(cfg)
    if rt.master:
        then = ckpt.resume_hint("diverged", lower)
    else:  # another machine of a multi-node run: rank 0 writes (and names) the checkpoints
        ckpt.report(wait=True)
        then = f"rank 0's log names the last checkpoint: resume from it with {lower}"
    ckpt.log.line(f"step {step:6d} | {what}: training diverged, stopping without saving")
    ckpt.log.event("end", step=step, reason="diverged")  # the S3 sidecar and the cost guard finish on this
    return TrainingDiverged(f"training diverged at step {step} ({what}) and stopped without saving; {then} "
                            "(the same settings repeat the same steps exactly)")
