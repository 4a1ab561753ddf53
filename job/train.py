"""Training entry: `python -m job.train [flags]` or `torchrun --nproc_per_node=N -m job.train [flags]`.

Thin wiring of config, data, model, optimizer, evaluation, checkpoints and logs. The loop is
build-nanogpt's, with what its users asked for: exact resume, checkpoints by steps and minutes,
graceful SIGTERM, and torch.compile that coexists with evaluation and sampling.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from job import checkpoint as ckpt_lib
from job import contract
from job.config import COMPILE_OPTIONS, CUDA_ONLY_SDPA, TrainConfig, parse_args
from job.data import DeviceLoader, ShardLoader, check_data_dir
from job.errors import RankLost, TrainingDiverged, UserError, cli_main
from job.fsutil import free_bytes, human_bytes
from job.metrics import MetricsLogger, format_eta, peak_flops
from job.model import GPT
from job.optim import configure_optimizer, get_lr
from job.sample import default_device, generate_samples
from job.supervisor import children


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


class StopFlag:
    """SIGTERM/SIGINT ask for a clean stop: finish the step, checkpoint, exit 0. A second Ctrl-C aborts."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        if signum == signal.SIGTERM and sibling_gone():
            # torchrun's agent stopping the survivors of a failed rank, not a user's stop: no checkpoint can follow
            # (the next collective fails), so promise none; the failure is said once, below, by whoever sees it.
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


def hellaswag_cache_dir(cfg: TrainConfig) -> Path:
    # Next to the data on the persistent filesystem, so a new box does not download it again.
    return Path(cfg.data_dir).resolve().parent / "hellaswag"


def autocast_ctx(cfg: TrainConfig, rt: Runtime):
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if rt.device_type == "cuda" else "float32")
    if dtype == "bfloat16":
        # Weights and optimizer stay fp32; matmuls run in bf16 (no loss scaling needed, unlike fp16).
        return torch.autocast(device_type=rt.device_type, dtype=torch.bfloat16), torch.bfloat16
    return contextlib.nullcontext(), None


def residual_dtype(cfg: TrainConfig, compute_dtype: torch.dtype | None, device_type: str) -> torch.dtype | None:
    """The residual stream's dtype for GPT.residual_dtype (None: whatever autocast leaves it, fp32).

    auto is bf16 under bf16 autocast on CUDA: half the bytes through every residual add and layer norm, the
    memory-bound part of the step (an H100: 4.8 % more tokens/s, docs/BENCHMARKS.md), as llm.c keeps its
    activations. Elsewhere auto stays fp32 (on the CPU the extra casts cost more than they save); float32 is
    build-nanogpt's stream exactly."""
    if cfg.residual_dtype == "bfloat16":
        return torch.bfloat16
    if cfg.residual_dtype == "auto" and compute_dtype == torch.bfloat16 and device_type == "cuda":
        return torch.bfloat16
    return None


def compile_model(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """torch.compile with one of CHOICES["compile_mode"]: torch's own modes by name, ours as Inductor options."""
    if mode in COMPILE_OPTIONS:
        return torch.compile(model, options=COMPILE_OPTIONS[mode])
    return torch.compile(model, mode=None if mode == "default" else mode)


class Trainer:
    def __init__(self, cfg: TrainConfig, rt: Runtime, train_loader=None, val_loader=None):
        self.cfg, self.rt = cfg, rt
        if cfg.sdpa_backend in CUDA_ONLY_SDPA and rt.device_type != "cuda":
            raise UserError(f"--sdpa-backend {cfg.sdpa_backend} needs a CUDA GPU and this run is on {rt.device_type}: "
                            "use --sdpa-backend auto")
        if cfg.residual_dtype == "bfloat16" and autocast_ctx(cfg, rt)[1] != torch.bfloat16:
            raise UserError("--residual-dtype bfloat16 needs bf16 autocast, and this run computes in float32: "
                            "add --dtype bfloat16 (the default on CUDA) or use --residual-dtype float32")
        B, T = cfg.micro_batch, cfg.seq_len
        # Loaders can be injected (the benchmark feeds synthetic tokens through the very same step). Either way
        # batches reach the step already on the device, copied ahead from pinned memory on CUDA.
        pin = rt.device_type == "cuda"
        self.train_loader = DeviceLoader(train_loader or ShardLoader(cfg.data_dir, "train", B, T, rt.rank, rt.world, pin_memory=pin),
                                         rt.device, cfg.prefetch)
        self.val_loader = DeviceLoader(val_loader or ShardLoader(cfg.data_dir, "val", B, T, rt.rank, rt.world, pin_memory=pin),
                                       rt.device, cfg.prefetch)
        # After the shards were opened (a bad one is an error before anything is written to the log dir).
        self.log = MetricsLogger(cfg.log_dir, enabled=rt.master)
        self.grad_accum = cfg.total_batch_tokens // (B * T * rt.world)
        torch.manual_seed(cfg.seed)
        if rt.device_type == "cuda":
            torch.cuda.manual_seed(cfg.seed)
            torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any fp32 matmul left outside autocast
            torch.backends.cudnn.allow_tf32 = True
        self.model = GPT(cfg.model_config()).to(rt.device)
        if cfg.init_from:  # a Hugging Face GPT-2 directory's weights; a checkpoint that _resume() finds below still wins
            from job.export import init_from_hf

            init_from_hf(self.model, cfg.init_from)
            self.log.line(f"initialized the weights from {cfg.init_from}")
        self.model.ce_chunk_tokens = cfg.ce_chunk_tokens
        self.model.set_sdpa_backend(cfg.sdpa_backend)
        self.model.residual_dtype = residual_dtype(cfg, autocast_ctx(cfg, rt)[1], rt.device_type)
        self.optimizer = configure_optimizer(self.model, cfg.weight_decay, cfg.max_lr, (cfg.beta1, cfg.beta2), cfg.eps,
                                             rt.device_type)
        self.start_step, self.val_done_at_start = 0, False
        self._resume()
        self.use_compile = cfg.compile == "on" or (cfg.compile == "auto" and rt.device_type == "cuda")
        # Compile only the fixed-shape train/val forward; HellaSwag and sampling (varying shapes) use the eager
        # model, which shares the same parameters. That is what lets compile stay on with evaluation.
        self.fwd_model = compile_model(self.model, cfg.compile_mode) if self.use_compile else self.model
        self.train_model = self.fwd_model
        if rt.ddp:
            # Gradients live in DDP's buckets (no second copy, no copy back); a static graph lets DDP skip its
            # per-step bookkeeping, but only without no_sync(): with gradient accumulation it crashes or silently
            # stops all-reducing (pytorch/pytorch#143580), so it is on only when every micro-step syncs.
            self.train_model = DDP(self.fwd_model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None,
                                   bucket_cap_mb=cfg.ddp_bucket_mb, gradient_as_bucket_view=True,
                                   static_graph=self.grad_accum == 1)
        self.autocast, self.autocast_dtype = autocast_ctx(cfg, rt)
        self.hellaswag = self._load_hellaswag() if cfg.hellaswag_every else None
        self.peak = peak_flops(torch.cuda.get_device_name(rt.device)) if rt.device_type == "cuda" else None
        self.flops_per_token = self.model.flops_per_token(T)
        self.stop = StopFlag()
        self.saver = ckpt_lib.AsyncSaver(cfg.log_dir, cfg.keep_last, cfg.keep_every)
        self.held_for: dict[int, dict] = {}  # step -> how long its save held training, until the write is logged
        self.last_save_time = time.time()
        self.last_saved_step = self.start_step if self.start_step else None
        self.room_warning = self._check_room() if rt.master else None
        self.write_error: ckpt_lib.CheckpointWriteError | None = None  # the master's first failed checkpoint write
        self.step = self.start_step

    # --- resume ------------------------------------------------------------------------------------
    def _resume(self) -> None:
        cfg = self.cfg
        if self.rt.master:
            ckpt_lib.clean_stale_temps(cfg.log_dir)
        if cfg.resume == "never":
            existing = ckpt_lib.list_checkpoints(cfg.log_dir)
            if existing:
                raise UserError(f"--resume never, but {cfg.log_dir} already holds {existing[-1][1].name} (and would be "
                                "overwritten): use another --log-dir, or --resume auto to continue that run")
            return
        if cfg.resume == "auto":
            found = ckpt_lib.find_resumable(cfg.log_dir)
            if found is None:
                return
            path, ckpt = found
        else:
            path, ckpt = cfg.resume, ckpt_lib.load(cfg.resume)
        ckpt_lib.check_compatible(ckpt, cfg.model_config().to_dict(), path)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.train_loader.load_state_dict(ckpt["data"])
        ckpt_lib.set_rng_state(ckpt["rng"], self.rt.device_type)
        self.start_step = int(ckpt["step"])
        self.val_done_at_start = ckpt.get("val_loss") is not None
        self.resumed_from = str(path)

    def _load_hellaswag(self):
        from job import hellaswag

        kwargs = dict(path=self.cfg.hellaswag_path, cache_dir=hellaswag_cache_dir(self.cfg), url=self.cfg.hellaswag_url)
        # The master downloads into the cache first; the other ranks then read the cached file.
        examples = hellaswag.load_examples(**kwargs) if self.rt.master else None
        if self.rt.ddp:
            dist.barrier()
        if not self.rt.master:
            examples = hellaswag.load_examples(**kwargs)
        return examples[: self.cfg.hellaswag_limit] if self.cfg.hellaswag_limit else examples

    # --- evaluation --------------------------------------------------------------------------------
    def _all_reduce(self, t: torch.Tensor, op=None) -> torch.Tensor:
        if self.rt.ddp:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t

    @torch.no_grad()
    def eval_val(self, step: int) -> float:
        self.model.eval()
        self.val_loader.reset()
        total = torch.zeros((), device=self.rt.device)
        for _ in range(self.cfg.val_steps):
            x, y = self.val_loader.next_batch()
            with self.autocast:
                _, loss = self.fwd_model(x, y)
            total += loss.detach().float()
        self.model.train()
        val_loss = self._all_reduce(total / self.cfg.val_steps).item() / self.rt.world
        self.log.line(f"step {step:6d} | val loss {val_loss:.4f}")
        self.log.event("val", step=step, loss=val_loss)
        if not math.isfinite(val_loss):
            self._diverged(step, f"the val loss is {val_loss}")
        return val_loss

    def eval_hellaswag(self, step: int) -> None:
        from job import hellaswag

        t0 = time.time()
        correct, total = hellaswag.evaluate(self.model, self.hellaswag, self.rt.device, self.rt.rank, self.rt.world,
                                            autocast_dtype=self.autocast_dtype)
        acc = correct / max(total, 1)
        self.log.line(f"step {step:6d} | HellaSwag acc_norm {correct}/{total} = {acc:.4f} ({time.time() - t0:.1f} s)")
        self.log.event("hellaswag", step=step, acc_norm=acc, correct=correct, total=total)

    def sample(self, step: int) -> None:
        if not self.rt.master or not self.cfg.sample_num:
            return
        cfg = self.cfg
        with self.autocast:
            texts = generate_samples(self.model, cfg.sample_prompt, cfg.sample_num, cfg.sample_tokens,
                                     cfg.sample_seed, self.rt.device)
        for i, text in enumerate(texts):
            self.log.line(f"step {step:6d} | sample {i}: {text!r}")
        self.log.event("sample", step=step, prompt=cfg.sample_prompt, samples=texts)

    # --- checkpoints -------------------------------------------------------------------------------
    def save(self, step: int, val_loss: float | None) -> None:
        """Snapshot the state and write it in the background: training is held only for a finite-weights check and
        the copy to CPU memory."""
        if self.last_saved_step == step:
            return
        t0 = time.perf_counter()  # training is held from here until the snapshot is in CPU memory
        # Between log lines nothing is read back, so weights can turn NaN unseen: a checkpoint must never keep them.
        # Every rank holds the same weights, so every rank reaches the same answer without talking to the others.
        if not self._weights_finite():
            self._diverged(step, "the weights are no longer finite numbers")
        if self.rt.master and self.write_error is None:  # after a failed write, training stops at the next step
            cfg = self.cfg
            state = {
                "model": self.model.state_dict(),
                "config": cfg.model_config().to_dict(),
                "step": step,
                "val_loss": val_loss,
                "optimizer": self.optimizer.state_dict(),
                "data": self.train_loader.state_dict(),
                "rng": ckpt_lib.rng_state(self.rt.device_type),
                "train_config": cfg.to_dict(),
                "format_version": ckpt_lib.FORMAT_VERSION,
            }
            try:
                held = self.saver.save(state, step, val_loss=val_loss)
            except ckpt_lib.CheckpointWriteError as e:  # the previous write failed; this one was not started
                self.write_error = self.write_error or e
            else:
                self.held_for[step] = {**held, "stall_s": time.perf_counter() - t0}  # with the check and state_dict()
            self._report_saves()  # the previous write, if save() just waited for it
        if self.rt.ddp:
            dist.barrier()  # every rank resumes together (the master was held for the snapshot)
        self.last_saved_step = step
        self.last_save_time = time.time()

    def _report_saves(self, wait: bool = False) -> None:
        """Log the checkpoint writes that have finished (all of them, after waiting, with wait=True)."""
        if not self.rt.master:
            return
        try:
            finished = self.saver.wait() if wait else self.saver.poll()
        except ckpt_lib.CheckpointWriteError as e:
            # Kept, not raised: under DDP the other ranks must hear of it first (train_and_agree), or they would
            # wait for this one in the next collective until torchrun kills them.
            self.write_error = self.write_error or e
            finished = self.saver.poll()
        for done in finished:
            held = self.held_for.pop(done["step"], {"stall_s": 0.0})
            removed = done["removed"]
            self.log.line(f"step {done['step']:6d} | saved {done['path']} (training held {held['stall_s']:.2f} s, "
                          f"written in the background in {done['write_s']:.2f} s)"
                          + (f", removed {', '.join(p.name for p in removed)}" if removed else ""))
            self.log.event("checkpoint", step=done["step"], path=str(done["path"]), val_loss=done["val_loss"],
                           seconds=round(done["write_s"], 3), stall_s=round(held["stall_s"], 3))

    def _oom(self) -> UserError:
        """What to change when a step (or an evaluation) did not fit in memory, with the figures that say so."""
        cfg, rt = self.cfg, self.rt
        B, T = cfg.micro_batch, cfg.seq_len
        where = f"out of {rt.device_type.upper() if rt.device_type == 'cuda' else rt.device_type} memory at step {self.step}"
        if rt.world > 1:  # one GPU may be short alone (another process on it): each rank says it for itself
            where = f"rank {rt.rank} ({rt.device}): {where}"
        if rt.device_type == "cuda":
            total = torch.cuda.get_device_properties(rt.device).total_memory
            where += f" (peak {torch.cuda.max_memory_allocated(rt.device) / 2**30:.1f} GiB of {total / 2**30:.1f} GiB)"
        fix = (f"lower --micro-batch, e.g. --micro-batch {B // 2}: gradient accumulation keeps the {cfg.total_batch_tokens:,} "
               "tokens per step" if B > 1 else "lower --seq-len or use a smaller model (--preset)")
        if not cfg.ce_chunk_tokens:
            fix += f"; --ce-chunk-tokens 8192 also avoids the full {B} x {T} x {cfg.vocab_size} logits"
        err = UserError(f"{where} with micro-batch {B} x seq-len {T}: {fix}")
        err.every_rank = True
        return err

    def _lost_rank(self, e: RuntimeError) -> RankLost:
        """Another rank is gone: say so on this one in a line (not gloo's or NCCL's traceback), and what to resume."""
        # gloo: "[.../pair.cc:553] Connection closed by peer [10.0.0.2]:5025. This is typically caused by ..."
        reason = re.sub(r"^\[[^\]]*\]\s*", "", str(e).strip().splitlines()[0]).split(". ")[0]
        msg = (f"rank {self.rt.rank}: another rank is gone (a collective failed at step {self.step}: {reason}): this one "
               "stops too, without a checkpoint; the launcher's line names the rank that failed first")
        if self.rt.master:
            self._report_saves(wait=True)  # a write in flight finishes first, and is the one to resume from
            saved = ckpt_lib.list_checkpoints(self.cfg.log_dir)
            msg += (f"; {saved[-1][1].name} (step {saved[-1][0]}) is the last checkpoint: run the same command to resume from "
                    "it" if saved else "; no checkpoint was written yet")
        return RankLost(msg)

    def _log_compile(self, step: int, seconds: float) -> None:
        """How the first step's compile went: graphs from the cache (a relaunch) or compiled afresh."""
        from torch._dynamo.utils import counters

        hits, misses = counters["inductor"].get("fxgraph_cache_hit", 0), counters["inductor"].get("fxgraph_cache_miss", 0)
        where = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "torch's default cache dir")
        self.log.line(f"step {step:6d} | first step {seconds:.1f} s with torch.compile: {hits} of {hits + misses} graphs from "
                      f"the cache in {where}")
        self.log.event("compile", step=step, seconds=round(seconds, 3), cache_hits=hits, cache_misses=misses)

    def _flush_saves(self) -> None:
        """Wait for every write in flight and log it; stop if one failed."""
        self._report_saves(wait=True)
        if self.write_error:
            self._write_failed()

    def _check_room(self) -> str | None:
        """Refuse to start when the log dir cannot hold even the next checkpoint (better now than an hour in), and
        return a warning when this run's checkpoints, with the retention policy, will outgrow its free space."""
        cfg = self.cfg
        probe = Path(cfg.log_dir) / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")  # an OSError naming the dir (one line from cli_main) if checkpoints could not go there
        probe.unlink()
        size, free = ckpt_lib.estimate_bytes(self.model), free_bytes(cfg.log_dir)
        if free < size:
            raise UserError(f"{cfg.log_dir} has {human_bytes(free)} free and a checkpoint of this model takes about "
                            f"{human_bytes(size)}: free space there, or pass a --log-dir on a disk with room")
        every = cfg.checkpoint_every
        future = [s for s in range(self.start_step + 1, cfg.max_steps + 1) if s == cfg.max_steps or (every and s % every == 0)]
        existing = [s for s, _ in ckpt_lib.list_checkpoints(cfg.log_dir)]
        more = ckpt_lib.most_on_disk(existing, future, cfg.keep_last, cfg.keep_every) - len(existing)
        if free >= more * size:
            return None
        return (f"warning: {cfg.log_dir} has {human_bytes(free)} free, and this run's checkpoints will need up to "
                f"{human_bytes(more * size)} more at once ({more} of about {human_bytes(size)}, with --keep-last {cfg.keep_last} "
                f"--keep-every {cfg.keep_every}): the run stops with an error when the disk fills. Free space, or keep "
                "fewer checkpoints")

    def _write_failed(self) -> None:
        """A checkpoint could not be written: stop (a run that cannot save only burns the box) and say how to go on.
        Every rank calls this in the same step (train_and_agree); only the master knows the details."""
        self._report_saves(wait=True)
        e = self.write_error
        if not self.rt.master:
            raise UserError("rank 0 could not write a checkpoint and training stopped: rank 0's error line names the "
                            "cause and the checkpoint to resume from")
        cfg = self.cfg
        saved = ckpt_lib.list_checkpoints(cfg.log_dir)
        fix = "make room (move old checkpoints away, or keep fewer with --keep-last)" if e.no_space else "fix that"
        if saved:
            then = (f"{saved[-1][1].name} (step {saved[-1][0]}) is the last one written and is intact: {fix}, then run the same "
                    "command to resume from it")
        else:
            then = f"no checkpoint was written yet: {fix} or pass another --log-dir, and start again"
        self.log.line(f"step {e.step:6d} | {e}: stopping")
        self.log.event("end", step=e.step, reason="checkpoint-failed")  # the S3 sidecar and the cost guard finish on this
        raise UserError(f"{e}; {then}") from e

    # --- divergence --------------------------------------------------------------------------------
    def _weights_finite(self) -> bool:
        # The max-abs norm is NaN or inf exactly when some weight is: one reduction per tensor, one read-back.
        return bool(torch.isfinite(torch.nn.utils.get_total_norm(list(self.model.parameters()), norm_type=float("inf"))))

    def _diverged(self, step: int, what: str) -> None:
        """Stop a run whose numbers are no longer finite, before it writes them anywhere or burns more GPU hours.

        NaN never heals (every later update is NaN too), so going on only wastes the rented box and, worse, would
        rotate the last good checkpoints out. Saves already in flight hold weights checked finite: they land."""
        self._report_saves(wait=True)
        saved = ckpt_lib.list_checkpoints(self.cfg.log_dir) if self.rt.master else []
        self.log.line(f"step {step:6d} | {what}: training diverged, stopping without saving")
        self.log.event("end", step=step, reason="diverged")  # the S3 sidecar and the cost guard finish on this
        lower = "a lower --max-lr" + (" or with --grad-clip 1.0" if not self.cfg.grad_clip else "")
        if not self.rt.master:  # another machine of a multi-node run: rank 0 writes (and names) the checkpoints
            then = f"rank 0's log names the last checkpoint: resume from it with {lower}"
        elif saved:
            then = f"the last checkpoint, {saved[-1][1]} (step {saved[-1][0]}), was written before: resume from it with {lower}"
        else:
            then = f"no checkpoint was written to {self.cfg.log_dir}: start again with {lower}"
        raise TrainingDiverged(f"training diverged at step {step} ({what}) and stopped without saving; {then} "
                               "(the same settings repeat the same steps exactly)")

    # --- the loop ----------------------------------------------------------------------------------
    def train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One optimizer step over `grad_accum` micro-batches. Nothing here waits for the GPU: the loss is summed
        on the device, batches arrive already copied, and the caller decides when to read anything back."""
        cfg, rt = self.cfg, self.rt
        self.optimizer.zero_grad(set_to_none=True)
        loss_accum = torch.zeros((), device=rt.device)
        for micro in range(self.grad_accum):
            x, y = self.train_loader.next_batch()
            # Gradients are all-reduced only on the last micro-step; earlier ones just accumulate locally.
            sync = not rt.ddp or micro == self.grad_accum - 1
            with contextlib.nullcontext() if sync else self.train_model.no_sync():
                with self.autocast:
                    _, loss = self.train_model(x, y)
                loss = loss / self.grad_accum  # the gradient of the mean over the whole batch, not the sum
                loss_accum += loss.detach()
                loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip if cfg.grad_clip else float("inf"))
        lr = get_lr(step, cfg.max_lr, cfg.max_lr * cfg.min_lr_ratio, cfg.warmup_steps, cfg.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        return loss_accum, norm, lr

    def train_and_agree(self, step: int, read_back: bool = True) -> tuple[float | None, float | None, float, bool, bool, bool]:
        """train_step, then (loss, grad norm, lr, stop?, save now?, a checkpoint write failed?) with at most one host sync.

        Under DDP the loss, the stop request, the timed-save request and a failed write travel in one all-reduce
        and are read back every step, so every rank takes the same decision (a rank that stopped alone would hang
        the others). A single process reads back only when asked (steps that log): between those the host queues
        step after step without waiting for the GPU; loss and norm are then None.
        """
        cfg, rt = self.cfg, self.rt
        loss_accum, norm, lr = self.train_step(step)
        if rt.master and not self.stop.requested and (Path(cfg.log_dir) / contract.STOP_REQUEST_FILE).exists():
            # The cost guard on the box (--max-hours) asks for the same clean stop as SIGTERM: checkpoint, then exit.
            self.stop.requested = True
            self.log.line(f"{contract.STOP_REQUEST_FILE} in {cfg.log_dir}: stopping with a checkpoint")
        timed = bool(cfg.checkpoint_minutes and rt.master and time.time() - self.last_save_time >= 60 * cfg.checkpoint_minutes)
        failed = self.write_error is not None
        if not (rt.ddp or read_back):
            return None, None, lr, self.stop.requested, timed, failed
        flags = torch.tensor([float(self.stop.requested), float(timed), float(failed)], device=rt.device)
        packed = torch.cat([loss_accum.float().view(1), norm.float().view(1), flags])
        loss_v, norm_v, stop_v, timed_v, failed_v = self._all_reduce(packed).tolist()
        return loss_v / rt.world, norm_v / rt.world, lr, bool(stop_v), bool(timed_v), bool(failed_v)

    def run(self) -> None:
        try:
            self._loop()
        except RuntimeError as e:  # torch.OutOfMemoryError (CUDA) is one; the CPU allocator raises a plain one
            if out_of_memory(e):
                raise self._oom() from None  # from None: the traceback's frames hold the tensors that did not fit
            if self.rt.ddp and lost_rank(e):
                raise self._lost_rank(e) from None
            raise
        finally:
            # A write in flight always completes before the process moves on, even after an error.
            self._report_saves(wait=True)

    def _loop(self) -> None:
        cfg = self.cfg
        self._print_header()
        step, val_loss = self.start_step, None
        if step >= cfg.max_steps and self.start_step:
            self.log.line(f"already trained to step {step} (--max-steps {cfg.max_steps}): nothing to do")
            return
        recent: list[float] = []
        window_s, window_n = 0.0, 0  # train time and steps since the last log line
        while True:
            self.step = step  # for an out-of-memory error's message
            last = step == cfg.max_steps
            fresh = not (step == self.start_step and self.val_done_at_start)  # already evaluated before the resume
            val_loss = None
            if fresh and (last or (cfg.eval_every and step % cfg.eval_every == 0)):
                val_loss = self.eval_val(step)
            if self.hellaswag is not None and fresh and (last or step % cfg.hellaswag_every == 0):
                self.eval_hellaswag(step)
            if fresh and (last or (cfg.sample_every and step > 0 and step % cfg.sample_every == 0)):
                self.sample(step)
            if step > self.start_step and (last or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)):
                self.save(step, val_loss)
            if last:
                break
            log_now = step % cfg.log_every == 0 or step == cfg.max_steps - 1
            t0 = time.time()
            loss_v, norm_v, lr, stop, timed, failed = self.train_and_agree(step, read_back=log_now)
            window_s, window_n = window_s + time.time() - t0, window_n + 1
            if step == self.start_step and self.use_compile:
                self._log_compile(step, time.time() - t0)
            if log_now:
                # Steps that did not read back were only queued; the read-back waited for all of them, so the
                # window's mean is the true time per step.
                dt = window_s / window_n
                recent = (recent + [dt])[-20:]
                self._log_step(step, loss_v, lr, norm_v, dt, sum(recent) / len(recent))
                window_s, window_n = 0.0, 0
            if loss_v is not None and not math.isfinite(loss_v + norm_v):  # under DDP: read back, and agreed, each step
                self._diverged(step, f"the loss is {loss_v}, the gradient norm {norm_v}")
            if failed:
                self._write_failed()
            self._report_saves()
            step += 1
            if stop or timed:
                self.save(step, None)
            if stop:
                self._flush_saves()
                self.log.line(f"stopped at step {step}: resume with the same command")
                self.log.event("end", step=step, reason="stopped")  # the S3 sidecar and cost guard wait for this
                return
        self._flush_saves()  # "end" means every checkpoint is on disk
        self.log.line(f"done: {cfg.max_steps} steps, final val loss {val_loss:.4f}")
        self.log.event("end", step=cfg.max_steps, reason="done")

    def _log_step(self, step: int, loss: float, lr: float, norm: float, dt: float, avg_dt: float) -> None:
        tok_s = self.cfg.total_batch_tokens / dt
        mfu = self.flops_per_token * tok_s / (self.peak * self.rt.world) if self.peak else None
        eta = format_eta(avg_dt * (self.cfg.max_steps - step - 1))
        # As in build-nanogpt, `step` is the 0-based index of the update that just ran; a checkpoint or val loss
        # at step s is the model after s updates.
        self.log.line(f"step {step:6d}/{self.cfg.max_steps} | loss {loss:.6f} | lr {lr:.4e} | norm {norm:.4f} | "
                      f"{dt * 1000:.1f} ms | {tok_s:,.0f} tok/s" + (f" | MFU {100 * mfu:.1f}%" if mfu else "") + f" | ETA {eta}")
        self.log.event("train", step=step, loss=loss, lr=lr, norm=norm, ms=round(dt * 1000, 2), tok_s=round(tok_s, 1),
                       **({"mfu": mfu} if mfu else {}))

    def _print_header(self) -> None:
        cfg, rt = self.cfg, self.rt
        self.log.line(f"model {cfg.preset}: {self.model.num_params() / 1e6:.1f}M params | device {rt.device} x {rt.world} | "
                      f"batch {cfg.total_batch_tokens:,} tokens = {cfg.micro_batch} x {cfg.seq_len} x {rt.world} ranks x "
                      f"{self.grad_accum} accum | compile {'on, ' + cfg.compile_mode if self.use_compile else 'off'}"
                      + (f" | attention: {cfg.sdpa_backend} first" if cfg.sdpa_backend != "auto" else "")
                      + (" | residual stream bfloat16" if self.model.residual_dtype == torch.bfloat16 else "")
                      + (f" | loss in chunks of {cfg.ce_chunk_tokens} tokens" if cfg.ce_chunk_tokens else "") + f" | log dir {cfg.log_dir}")
        if self.room_warning:
            self.log.line(self.room_warning)
        if self.start_step:
            self.log.line(f"resumed from {self.resumed_from} at step {self.start_step}")
            self.log.event("resume", step=self.start_step, path=self.resumed_from)
        else:
            self.log.event("start", config=cfg.to_dict(), world=rt.world)


@cli_main
def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    check_data_dir(cfg.data_dir)
    if Path(cfg.log_dir).exists() and not Path(cfg.log_dir).is_dir():
        raise UserError(f"--log-dir {cfg.log_dir} is a file, not a directory: pass a directory (it is created if missing)")
    # Inductor reads this when it first compiles; a path set by the user wins.
    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str((Path(cfg.log_dir) / contract.COMPILE_CACHE_DIR).absolute())
    rt = setup_runtime(cfg)
    try:
        Trainer(cfg, rt).run()
    finally:
        if rt.ddp and dist.is_initialized():
            dist.destroy_process_group()


def entry(argv: list[str] | None = None) -> None:
    """`python -m job.train` and the old workflow's train.py: main(), and a DDP rank then ends without the
    interpreter's teardown. DDP keeps the process group and its C++ threads (gloo's) alive past
    destroy_process_group (their count does not drop), and C++ teardown racing the interpreter's is the likely cause
    of a rank that aborted after its clean one-line error, once in CI ("terminate called without an active
    exception", SIGABRT; not reproduced in 40 tries since): the launcher then reports a crash, and the exit status
    no longer says done / stopped / mistake. Every file the run writes is complete by now (checkpoint writes are
    waited for in Trainer.run), so skipping the teardown loses nothing."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:  # cli_main's exit status for errors; argparse's for --help and usage mistakes
        code = e.code
    if under_ddp():
        if isinstance(code, str):  # what sys.exit("...") would have printed
            print(code, file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        if code and os.environ.get("LOCAL_RANK", "0") != "0":
            # A mistake in the settings or files stops every rank alike, and only each machine's local rank 0 says
            # it. Leave first and the agent would SIGTERM rank 0 before its line is out (seen in CI): let a sibling
            # (normally rank 0, printing) go first, for at most a few seconds.
            deadline = time.time() + 5
            while time.time() < deadline and not sibling_gone():
                time.sleep(0.05)
        os._exit(code if isinstance(code, int) else 0 if code is None else 1)
    sys.exit(code)


if __name__ == "__main__":
    entry()
