"""Training entry: `python -m job.train [flags]` or `torchrun --nproc_per_node=N -m job.train [flags]`.

Thin wiring of config, data, recipe, evaluation, checkpoints and logs. The loop (`Trainer._loop`) is
build-nanogpt's and reads top to bottom: evaluate, save, one optimizer step, agree with the other ranks, log. With
what its users asked for: exact resume, checkpoints by steps and minutes, graceful SIGTERM, and torch.compile that
coexists with evaluation and sampling. What is trained and how comes from a recipe (job/recipes/); the checkpoint
lifecycle from a Checkpointer (job/checkpoint.py); how a run that cannot go on says so, from job/failures.py.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from job import checkpoint as ckpt_lib
from job import compile_cache, contract, recipes
from job.config import COMPILE_OPTIONS, TrainConfig, layouts, parse_args, val_steps
from job.dashboards import open_writers
from job.data import DeviceLoader, check_data_dir
from job.errors import UserError, check_output_path, cli_main
from job.failures import StopFlag, diverged_error, lost_rank, oom_error, out_of_memory, rank_lost_error, sibling_gone
from job.identity import run_identity
from job.metrics import MetricsLogger, StepTimer, format_eta, peak_flops
from job.optim import Optimizers
from job.runtime import Requests, Runtime, agree, all_reduce, autocast_ctx, dist_env, pick_device, setup_runtime, under_ddp
from job.sample import generate_samples


def hellaswag_cache_dir(cfg: TrainConfig) -> Path:
    # Next to the data on the persistent filesystem, so a new box does not download it again.
    return Path(cfg.data_dir).resolve().parent / "hellaswag"


def compile_model(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """torch.compile with one of CHOICES["compile_mode"]: torch's own modes by name, ours as Inductor options.

    Static shapes (dynamic=False, as modded-nanogpt compiles): each batch shape gets a graph specialised to it.
    Left to torch's automatic dynamic shapes, the training step, compiled after the first evaluation (whose
    sequences can be longer: the speedrun's are 256K tokens, its training ones 48K), would be a graph for any
    sequence length."""
    if mode in COMPILE_OPTIONS:
        return torch.compile(model, options=COMPILE_OPTIONS[mode], dynamic=False)
    return torch.compile(model, mode=None if mode == "default" else mode, dynamic=False)


@contextlib.contextmanager
def seeded(seed: int, rt: Runtime):
    """torch's RNG seeded with `seed` inside the block, and as it was after it (the initial weights follow from the
    config without the process's RNG changing)."""
    devices = [torch.device(rt.device).index or 0] if rt.device_type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def prepare_process(cfg: TrainConfig, rt: Runtime, rng_state: dict | None = None) -> None:
    """The process-wide state a run owns, set when it starts, never when a Trainer is built: torch's RNG (seeded,
    or the resumed checkpoint's state) and TF32 for any fp32 matmul left outside autocast on CUDA."""
    torch.manual_seed(cfg.seed)
    if rng_state is not None:
        ckpt_lib.set_rng_state(rng_state, rt.device_type)
    if rt.device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def weights_finite(model: torch.nn.Module) -> bool:
    # The max-abs norm is NaN or inf exactly when some weight is: one reduction per tensor, one read-back.
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(list(model.parameters()), norm_type=float("inf"))))


def due(every: int, step: int) -> bool:
    """Whether an every-N-steps event falls on `step` (every 0: never, except where the caller adds the last step)."""
    return bool(every) and step % every == 0


class Trainer:
    """One training run. Building it touches no process-wide state (signal handlers, torch's RNG, TF32 flags):
    `run()` sets those for its duration. Loaders can be injected (the benchmark feeds synthetic tokens through
    the very same step); either way batches reach the step already on the device."""

    def __init__(self, cfg: TrainConfig, rt: Runtime, train_loader=None, val_loader=None):
        self.cfg, self.rt = cfg, rt
        self.recipe = recipes.get(cfg.recipe)
        # Settings that only this machine can refuse (validate() in job.config knows no device).
        self.recipe.check_runtime(cfg, rt.device_type, autocast_ctx(cfg, rt)[1])
        self.staged = self.recipe.staged(cfg)  # the batch layout changes during the run
        self.train_loader, self.val_loader = self._loaders(train_loader, val_loader)
        self.grad_accum = self._accum(self.recipe.step_layout(0, cfg))  # step 0's; a staged recipe's changes
        self.autocast, self.autocast_dtype = autocast_ctx(cfg, rt)
        if not self.recipe.autocast:  # the model keeps its own precision (built for autocast_dtype)
            self.autocast = contextlib.nullcontext()
        self.val_steps = val_steps(cfg, rt.world)
        with seeded(cfg.seed, rt):
            self.model = self.recipe.build_model(cfg, rt.device, self.autocast_dtype)
        initialized = self.recipe.init_from(self.model, cfg)  # weights a setting names (a checkpoint to resume still wins)
        # After the shards were opened and the weights built and loaded: a bad shard, a model too large for the device
        # or a damaged weights file is an error before anything is written to the log dir.
        self.log = MetricsLogger(cfg.log_dir, enabled=rt.master, writers=open_writers(cfg) if rt.master else ())
        if initialized:
            self.log.line(initialized)
        self.optimizer = Optimizers(self.recipe.build_optimizers(self.model, cfg, rt.device_type))
        self.ckpt = ckpt_lib.Checkpointer(cfg.log_dir, cfg.keep_last, cfg.keep_every, rt.master, self.log)
        self.start_step, self.val_done_at_start, self.resumed_from, self.rng_state = self._resume()
        self.use_compile = cfg.compile == "on" or (cfg.compile == "auto" and rt.device_type == "cuda")
        self.fwd_model, self.train_model = self._wrap_model()
        self.hellaswag = self._load_hellaswag() if cfg.hellaswag_every else None
        self.peak = peak_flops(torch.cuda.get_device_name(rt.device)) if rt.device_type == "cuda" else None
        self.flops_per_token = self.model.flops_per_token(cfg.seq_len)
        self.stop = StopFlag()
        self.room_warning = (self.ckpt.check_room(self.model, self.start_step, cfg.max_steps, cfg.checkpoint_every)
                             if rt.master else None)
        self.step = self.start_step  # the step in progress, for an error's message

    # --- setup ---------------------------------------------------------------------------------------
    def _loaders(self, train_loader, val_loader) -> tuple[DeviceLoader, DeviceLoader]:
        cfg, rt = self.cfg, self.rt
        pin = rt.device_type == "cuda"  # batches copied ahead from pinned memory on CUDA

        def shards(split):
            if split == "val":  # one micro-batch per rank and evaluation step
                val_len = cfg.val_seq_len or cfg.seq_len
                return self.recipe.loader(cfg.data_dir, split, cfg.micro_batch, val_len, rt.rank, rt.world, pin,
                                          step_tokens=cfg.micro_batch * val_len * rt.world)
            # Sized to the largest step (a staged recipe's); each step then asks for its own layout.
            largest = max(layouts(cfg), key=lambda lay: lay.micro_batch * lay.seq_len)
            return self.recipe.loader(cfg.data_dir, split, largest.micro_batch, largest.seq_len, rt.rank, rt.world, pin,
                                      step_tokens=None if self.staged else largest.tokens)

        return (DeviceLoader(train_loader or shards("train"), rt.device, cfg.prefetch),
                DeviceLoader(val_loader or shards("val"), rt.device, cfg.prefetch))

    def _resume(self) -> tuple[int, bool, str | None, dict | None]:
        """(start step, whether its evaluation is done, the checkpoint's path, its RNG state); all zero/None fresh.
        The RNG state is set by run(), with the rest of the process's state."""
        cfg = self.cfg
        found = self.ckpt.resume(cfg.resume, cfg.model_config().to_dict(), cfg.recipe)
        if found is None:
            return 0, False, None, None
        path, ckpt = found
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.train_loader.load_state_dict(ckpt["data"])
            torch.Generator().set_state(ckpt["rng"]["torch"])  # what run() restores: refused now, not after the setup
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as e:
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise UserError(f"checkpoint {path} does not hold this run's state ({type(e).__name__}: {first}): it is damaged "
                            "or was edited; pass another --resume, or --resume never to start fresh") from None
        return ckpt["step"], ckpt.get("val_loss") is not None, path, ckpt["rng"]

    def _wrap_model(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(the forward model for train/val batches, the model the step trains: DDP's wrapper of it under torchrun,
        unless the recipe's optimizer reduces the gradients itself)."""
        cfg, rt = self.cfg, self.rt
        # Compile only the fixed-shape train/val forward; HellaSwag and sampling (varying shapes) use the eager
        # model, which shares the same parameters. That is what lets compile stay on with evaluation.
        fwd = compile_model(self.model, cfg.compile_mode) if self.use_compile else self.model
        if not rt.ddp:
            return fwd, fwd
        if self.recipe.reduces_gradients:
            # Its optimizer reduces each rank's gradients itself: no DDP to reduce them first. The ranks start from
            # rank 0's weights and buffers, as DDP's wrapping would make them (the record broadcasts them too).
            for t in self.model.state_dict().values():
                dist.broadcast(t, 0)
            return fwd, fwd
        # Gradients live in DDP's buckets (no second copy, no copy back); a static graph lets DDP skip its
        # per-step bookkeeping, but only without no_sync(): with gradient accumulation it crashes or silently
        # stops all-reducing (pytorch/pytorch#143580), so it is on only when every micro-step syncs. Buffers are
        # broadcast once, when DDP wraps the model, not before every forward (DDP's default): a model's buffers follow
        # from its config and the recipe's model_schedule, the same on every rank (at full size the speedrun's rotary
        # tables alone are 1.5 GB a forward).
        return fwd, DDP(fwd, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None,
                        bucket_cap_mb=cfg.ddp_bucket_mb, gradient_as_bucket_view=True, forward_sync_buffers=False,
                        static_graph=self.grad_accum == 1 and not self.staged)

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

    # --- the run -------------------------------------------------------------------------------------
    def run(self) -> None:
        """Train to --max-steps, or until a stop is asked for. Signal handlers, torch's RNG and TF32 are set here
        (the handlers are put back after); a failure becomes its one-line error (job/failures.py)."""
        prepare_process(self.cfg, self.rt, self.rng_state)
        with self.stop.installed():
            failed = True
            try:
                self._loop()
                failed = False
            except RuntimeError as e:  # torch.OutOfMemoryError (CUDA) is one; the CPU allocator raises a plain one
                if out_of_memory(e):
                    raise oom_error(self.cfg, self.rt, self.step) from None  # the traceback's frames hold the tensors
                if self.rt.ddp and lost_rank(e):
                    raise rank_lost_error(e, self.rt, self.step, self.ckpt) from None
                raise
            finally:
                self.ckpt.report(wait=True)  # a write in flight always completes, even after an error
                self.log.close(failed)  # the dashboards' last records

    def _loop(self) -> None:
        cfg, start = self.cfg, self.start_step
        self._print_header()
        if start and start >= cfg.max_steps:
            self.log.line(f"already trained to step {start} (--max-steps {cfg.max_steps}): nothing to do")
            return
        step, timer = start, StepTimer()
        while True:
            self.step = step
            self.recipe.model_schedule(self.model, step, cfg)  # e.g. the attention window: evaluation sees it too
            last = step == cfg.max_steps
            fresh = not (step == start and self.val_done_at_start)  # else evaluated before the resumed checkpoint
            val_loss = self.eval_val(step) if fresh and (last or due(cfg.eval_every, step)) else None
            if self.hellaswag is not None and fresh and (last or due(cfg.hellaswag_every, step)):
                self.eval_hellaswag(step)
            if fresh and (last or (step > 0 and due(cfg.sample_every, step))):
                self.sample(step)
            if step > start and (last or due(cfg.checkpoint_every, step)):
                self.save(step, val_loss)
            if last:
                break
            log_now = step % cfg.log_every == 0 or step == cfg.max_steps - 1
            timer.start()
            loss, norm, hparams = self.train_step(step)
            agreed = agree(self.rt, loss, norm, self.requests(), read_back=log_now)
            timer.stop()
            if step == start and self.use_compile:
                self._log_compile(step, timer.last_s)
            if log_now:
                self._log_step(step, agreed.loss, agreed.norm, hparams, *timer.lap())
            if agreed.loss is not None and not math.isfinite(agreed.loss + agreed.norm):  # DDP: each step, agreed
                self._diverged(step, f"the loss is {agreed.loss}, the gradient norm {agreed.norm}")
            if agreed.failed:
                self.ckpt.raise_failed_write()
            self.ckpt.report()
            step += 1
            if agreed.stop or agreed.save:
                self.save(step, None)
            if agreed.stop:
                self._end(step, "stopped", f"stopped at step {step}: resume with the same command")
                return
        self._end(cfg.max_steps, "done", f"done: {cfg.max_steps} steps, final val loss {val_loss:.4f}")

    def _accum(self, layout) -> int:
        return layout.tokens // (layout.micro_batch * layout.seq_len * self.rt.world)

    def train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """One optimizer step over the step's micro-batches (the recipe's layout): (loss, gradient norm) as device
        tensors, and the hyperparameters the recipe's schedule set. Nothing here waits for the device: the loss is
        summed there, batches arrive already copied, and the caller decides when to read anything back."""
        cfg, rt, recipe = self.cfg, self.rt, self.recipe
        layout = recipe.step_layout(step, cfg)
        accum = self._accum(layout) if self.staged else self.grad_accum
        shape = (layout.micro_batch, layout.seq_len) if self.staged else ()
        scale = recipe.backward_scale(cfg, layout)
        self.optimizer.zero_grad(set_to_none=True)
        loss_accum = torch.zeros((), device=rt.device)
        for micro in range(accum):
            x, y = self.train_loader.next_batch(*shape)
            recipe.batch_taken(self.optimizer, *self.train_loader.host_batch)
            # Gradients are all-reduced only on the last micro-step; earlier ones just accumulate locally.
            sync = not isinstance(self.train_model, DDP) or micro == accum - 1
            with contextlib.nullcontext() if sync else self.train_model.no_sync():
                with self.autocast:
                    loss = recipe.loss(self.train_model, x, y)
                loss = loss / accum  # the gradient of the mean over the whole batch, not the sum
                loss_accum += loss.detach()
                (loss * scale if scale != 1 else loss).backward()
        clip = recipe.grad_clip(cfg)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip else float("inf"))
        hparams = recipe.schedule(self.optimizer, step, cfg)
        self.optimizer.step()
        self.step_tokens = layout.tokens
        return loss_accum, norm, hparams

    def requests(self) -> Requests:
        """What this rank wants after the step; agree() combines every rank's."""
        cfg = self.cfg
        if self.rt.master and not self.stop.requested and (Path(cfg.log_dir) / contract.STOP_REQUEST_FILE).exists():
            # The cost guard on the box (--max-hours) asks for the same clean stop as SIGTERM: checkpoint, then exit.
            self.stop.requested = True
            self.log.line(f"{contract.STOP_REQUEST_FILE} in {cfg.log_dir}: stopping with a checkpoint")
        return Requests(stop=self.stop.requested, save=self.ckpt.due(cfg.checkpoint_minutes), failed=self.ckpt.failed)

    def _end(self, step: int, reason: str, line: str) -> None:
        self.ckpt.flush()  # "end" means every checkpoint is on disk
        self.log.line(line)
        self.log.event("end", step=step, reason=reason)  # the S3 sidecar and the cost guard wait for this

    # --- evaluation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def eval_val(self, step: int) -> float:
        self.model.eval()
        self.val_loader.reset()
        total = torch.zeros((), device=self.rt.device)
        for _ in range(self.val_steps):
            x, y = self.val_loader.next_batch()
            with self.autocast:
                _, loss = self.fwd_model(x, y)
            total += loss.detach().float()
        self.model.train()
        val_loss = all_reduce(self.rt, total / self.val_steps).item() / self.rt.world
        self.log.line(f"step {step:6d} | val loss {val_loss:.4f}")
        self.log.event("val", step=step, loss=val_loss)
        if not math.isfinite(val_loss):
            self._diverged(step, f"the val loss is {val_loss}")
        return val_loss

    def eval_hellaswag(self, step: int) -> None:
        from job import hellaswag

        t0 = time.time()
        correct, total = hellaswag.evaluate(self.model, self.hellaswag, self.rt.device, self.rt.rank, self.rt.world,
                                            autocast_dtype=self.autocast_dtype if self.recipe.autocast else None)
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

    # --- checkpoints and failures --------------------------------------------------------------------
    def save(self, step: int, val_loss: float | None) -> None:
        """Snapshot the state and write it in the background: training is held only for a finite-weights check and
        the copy to CPU memory."""
        if self.ckpt.last_step == step:
            return
        t0 = time.perf_counter()  # training is held from here until the snapshot is in CPU memory
        # Between log lines nothing is read back, so weights can turn NaN unseen: a checkpoint must never keep them.
        # Every rank holds the same weights, so every rank reaches the same answer without talking to the others.
        if not weights_finite(self.model):
            self._diverged(step, "the weights are no longer finite numbers")
        # Every rank asks for the optimizers' state: one that shards it over the ranks (the speedrun's NorMuonAndAdam)
        # gathers it in a collective that all of them must join, though only the master's copy is written.
        optimizer_state = self.optimizer.state_dict()
        self.ckpt.save(step, lambda: self.checkpoint_state(step, val_loss, optimizer_state), held_since=t0)
        if self.rt.ddp:
            dist.barrier()  # every rank resumes together (the master was held for the snapshot)

    def checkpoint_state(self, step: int, val_loss: float | None, optimizer_state: dict | None = None) -> dict:
        cfg = self.cfg
        return {
            "model": self.model.state_dict(),
            "config": cfg.model_config().to_dict(),
            "step": step,
            "val_loss": val_loss,
            "optimizer": self.optimizer.state_dict() if optimizer_state is None else optimizer_state,
            "data": self.train_loader.state_dict(),
            "rng": ckpt_lib.rng_state(self.rt.device_type),
            "train_config": cfg.to_dict(),  # its recipe too: resuming checks it
            "format_version": ckpt_lib.FORMAT_VERSION,
            "identity": run_identity(self.rt.device),  # the code, image, torch, CUDA, driver and GPU that wrote it
        }

    def _diverged(self, step: int, what: str) -> None:
        """Stop a run whose numbers are no longer finite, before it writes them anywhere or burns more GPU hours."""
        raise diverged_error(self.cfg, self.rt, step, what, self.ckpt)

    # --- logs ----------------------------------------------------------------------------------------
    def _log_step(self, step: int, loss: float, norm: float, hparams: dict, dt: float, avg_dt: float) -> None:
        tok_s = self.step_tokens / dt
        mfu = self.flops_per_token * tok_s / (self.peak * self.rt.world) if self.peak else None
        eta = format_eta(avg_dt * (self.cfg.max_steps - step - 1))
        lr, extra = hparams["lr"], {k: v for k, v in hparams.items() if k != "lr"}
        # As in build-nanogpt, `step` is the 0-based index of the update that just ran; a checkpoint or val loss
        # at step s is the model after s updates.
        self.log.line(f"step {step:6d}/{self.cfg.max_steps} | loss {loss:.6f} | lr {lr:.4e} | norm {norm:.4f} | "
                      f"{dt * 1000:.1f} ms | {tok_s:,.0f} tok/s" + (f" | MFU {100 * mfu:.1f}%" if mfu else "") + f" | ETA {eta}")
        self.log.event("train", step=step, loss=loss, lr=lr, norm=norm, ms=round(dt * 1000, 2), tokens=self.step_tokens,
                       tok_s=round(tok_s, 1),
                       **({"mfu": mfu} if mfu else {}), **extra)

    def _log_compile(self, step: int, seconds: float) -> None:
        """How the first step's compile went: graphs from the cache (a relaunch) or compiled afresh."""
        from torch._dynamo.utils import counters

        hits, misses = counters["inductor"].get("fxgraph_cache_hit", 0), counters["inductor"].get("fxgraph_cache_miss", 0)
        where = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "torch's default cache dir")
        self.log.line(f"step {step:6d} | first step {seconds:.1f} s with torch.compile: {hits} of {hits + misses} graphs from "
                      f"the cache in {where}")
        self.log.event("compile", step=step, seconds=round(seconds, 3), cache_hits=hits, cache_misses=misses)

    def _print_header(self) -> None:
        cfg, rt = self.cfg, self.rt
        recipe = f" ({cfg.recipe} recipe)" if cfg.recipe != recipes.DEFAULT else ""
        self.log.line(f"model {cfg.preset}{recipe}: {self.model.num_params() / 1e6:.1f}M params | device {rt.device} x "
                      f"{rt.world} | batch {cfg.total_batch_tokens:,} tokens = {cfg.micro_batch} x {cfg.seq_len} x {rt.world} "
                      f"ranks x {self.grad_accum} accum | compile {'on, ' + cfg.compile_mode if self.use_compile else 'off'}"
                      + self.recipe.describe(self.model, cfg) + f" | log dir {cfg.log_dir}")
        if self.room_warning:
            self.log.line(self.room_warning)
        if self.start_step:
            self.log.line(f"resumed from {self.resumed_from} at step {self.start_step}")
            self.log.event("resume", step=self.start_step, path=self.resumed_from, identity=run_identity(rt.device))
        else:
            self.log.event("start", config=cfg.to_dict(), world=rt.world, identity=run_identity(rt.device))


@cli_main
def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv, world_size=dist_env()[2])
    check_data_dir(cfg.data_dir)
    check_output_path(cfg.log_dir, "--log-dir", directory=True)  # a file in its place or on its path; no right to write
    user_cache = os.environ.get(compile_cache.ENV, "")  # a path set by the user wins
    rt = setup_runtime(cfg)
    try:
        try:
            trainer = Trainer(cfg, rt)
        except RuntimeError as e:
            if not out_of_memory(e):
                raise
            shape = f"{cfg.n_layer} layers of {cfg.n_embd}, block {cfg.block_size}, vocabulary {cfg.vocab_size}"
            raise UserError(f"the model ({shape}) does not fit in {rt.device} memory while it is built: pick a smaller "
                            "--preset or model flags") from None
        # After the trainer's own refusals, so that a refused run creates no cache directory (in a new log dir, or on
        # the persistent file system), and before the first step, where Inductor first compiles and reads it.
        compile_cache.use(cfg.log_dir, cfg.recipe, pick_device(cfg.device), user_dir=user_cache)
        trainer.run()
    finally:
        if rt.ddp and dist.is_initialized():
            dist.destroy_process_group()


def entry(argv: list[str] | None = None) -> None:
    """`python -m job.train` and the top-level train.py: main(), and a DDP rank then ends without the interpreter's
    teardown. DDP keeps the process group and its C++ threads (gloo's) alive past destroy_process_group, and C++
    teardown racing the interpreter's can abort a rank after its clean one-line error ("terminate called without an
    active exception", SIGABRT): the launcher would then report a crash, and the exit status would no longer say
    done / stopped / mistake. Every file the run writes is complete by now (checkpoint writes are waited for in
    Trainer.run), so skipping the teardown loses nothing."""
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
        remove_temporary_directories()
        os._exit(code if isinstance(code, int) else 0 if code is None else 1)
    sys.exit(code)


def remove_temporary_directories() -> None:
    """What the interpreter's exit does for each tempfile.TemporaryDirectory still alive (through its finalizer), and
    os._exit skips: remove it. wandb makes two when it is imported, for every rank that imports it. One that cannot be
    removed stays, as it would: the rank's exit status is what matters here."""
    for obj in gc.get_objects():
        if issubclass(type(obj), tempfile.TemporaryDirectory):  # isinstance would read __class__, which some objects warn on
            with contextlib.suppress(OSError):
                obj.cleanup()


if __name__ == "__main__":
    entry()
