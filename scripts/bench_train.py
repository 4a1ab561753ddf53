#!/usr/bin/env python
"""The training benchmark: the trainer's real step beside a plain eager baseline, in one process and one run.

    python scripts/bench_train.py --preset gpt2                       # on a GPU: B=64, T=1024, bf16
    python scripts/bench_train.py --preset tiny --device cpu --quick  # smoke test on a laptop CPU
    python scripts/bench_train.py --runs b --variant ce:ce_chunk_tokens=8192 --variant mb32:micro_batch=32

Runs (--runs, default all): `a` the trainer's step exactly as job.train runs it (its Trainer: torch.compile,
fused AdamW, gradient accumulation, DDP wrapper with world size 1, prefetching loader) on synthetic tokens;
`real` the same step fed by the real shard loader from a generated shard; `eval` validation, sampling and
HellaSwag cost and the recompilations after warm-up; `ckpt` how long a checkpoint holds training; `b` the same
model trained plainly (eager, unfused AdamW, full-logits loss, a pageable copy and a loss read-back per step).
Each --variant NAME:key=value,... is another `a` with TrainConfig fields changed (plus ddp=0/1).

Every run keeps the tokens per optimizer step fixed (B x T x accum of the base), starts from the same seed and
sees the same synthetic rows, so all loss trajectories are comparable: the optimised runs are checked against
`b` (bf16: 1e-2 relative). The matmul peak is measured first (median of several large GEMMs); MFU is
FLOPs/token x tok/s over it, FLOPs/token = 6N + 12*L*d*T (N: parameters without position embeddings, the
tied embedding counted once, as the output layer). Timings: median over --steps after --warmup steps.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import gc
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from job.config import TrainConfig, from_dict, parse_settings, validate  # noqa: E402
from job.data import DeviceLoader, ShardLoader, write_shard  # noqa: E402
from job.errors import ArgumentParser, UserError, check_output_path, cli_main, int_arg  # noqa: E402
from job.metrics import peak_flops  # noqa: E402
from job.model import GPT, GPT2_VOCAB  # noqa: E402
from job.optim import configure_optimizer, get_lr  # noqa: E402
from job.train import Runtime, Trainer, autocast_ctx, pick_device  # noqa: E402

RUNS = ("a", "real", "eval", "ckpt", "b")
HELLASWAG_EXAMPLES = 10042  # the validation split the trainer evaluates
NUMERICS_TOL = {"bfloat16": 1e-2, "float32": 1e-4}  # max relative loss difference, optimised vs plain


# --- data ------------------------------------------------------------------------------------------
class SyntheticLoader:
    """Random token rows, made up front (pinned on CUDA) so no data work lands in the timed region.

    Batches take consecutive rows of one fixed pool, so B=32 with twice the accumulation sees exactly the
    tokens of B=64: runs with different micro-batches stay comparable.
    """

    def __init__(self, B: int, T: int, rows: int = 512, seed: int = 0, pin: bool = False, text: torch.Tensor | None = None):
        if text is None:
            g = torch.Generator().manual_seed(seed)
            pool = torch.randint(0, GPT2_VOCAB, (rows, T + 1), generator=g)
        else:  # windows of real tokens instead (a model can learn them: tests want a falling loss)
            pool = text[: rows * (T + 1)].long().view(rows, T + 1)
        self.x, self.y = pool[:, :-1].contiguous(), pool[:, 1:].contiguous()
        if pin:
            self.x, self.y = self.x.pin_memory(), self.y.pin_memory()
        self.B, self.rows, self.i = B, rows, 0
        assert rows % B == 0

    def next_batch(self):
        s = (self.i * self.B) % self.rows
        self.i += 1
        return self.x[s : s + self.B], self.y[s : s + self.B]

    def reset(self):
        self.i = 0

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


def generated_shard_dir(tokens: int, seed: int = 1) -> Path:
    """A temporary data dir with one random train shard: the real loader's path without a dataset."""
    d = Path(tempfile.mkdtemp(prefix="bench-shard-"))
    rng = np.random.default_rng(seed)
    write_shard(d / "bench_train_000000.npy", rng.integers(0, GPT2_VOCAB, tokens, dtype=np.uint16))
    return d


# --- the plain baseline ------------------------------------------------------------------------------
class PlainStep:
    """(b): the same model and schedule trained the plain way, as a first version of build-nanogpt would:
    eager, torch's default (unfused) AdamW, F.cross_entropy over the full logits, a pageable host-to-device
    copy per micro-batch and the loss read back every step."""

    def __init__(self, cfg: TrainConfig, rt: Runtime, loader, grad_accum: int):
        self.cfg, self.rt, self.loader, self.grad_accum = cfg, rt, loader, grad_accum
        torch.manual_seed(cfg.seed)
        if rt.device_type == "cuda":
            torch.cuda.manual_seed(cfg.seed)
        self.model = GPT(cfg.model_config()).to(rt.device)
        self.optimizer = configure_optimizer(self.model, cfg.weight_decay, cfg.max_lr, (cfg.beta1, cfg.beta2), cfg.eps,
                                             rt.device_type, fused=False)
        self.autocast, _ = autocast_ctx(cfg, rt)

    def step(self, step: int) -> float:
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        loss_accum = torch.zeros((), device=self.rt.device)
        for _ in range(self.grad_accum):
            x, y = self.loader.next_batch()
            x, y = x.to(self.rt.device), y.to(self.rt.device)
            with self.autocast:
                _, loss = self.model(x, y)
            loss = loss / self.grad_accum
            loss_accum += loss.detach()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip if cfg.grad_clip else float("inf"))
        lr = get_lr(step, cfg.max_lr, cfg.max_lr * cfg.min_lr_ratio, cfg.warmup_steps, cfg.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        return loss_accum.item()


# --- measuring -----------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(device: str, n: int, reps: int = 10) -> tuple[float, str]:
    """Median FLOP/s of an n x n x n GEMM: bf16 on CUDA (what training uses), fp32 on CPU.

    A short burst: three warm-up calls (they pick the kernel and warm caches), then reps GEMMs timed one by one
    (~20 ms on an H100). A second of back-to-back GEMMs first (tried in the seventh session, so that an idle card
    would reach its clocks) read 536-687 TFLOP/s on an H100 in the ninth, below the ~690 TFLOP/s that the
    trainer's own GEMMs ran at in the same runs (most likely the card held at its power limit by a second of
    the heaviest GEMM there is), so it was no ceiling; short bursts read 746-778 on H100s before. A card still
    at idle clocks reads low before the runs: the report takes the higher of this and the after-runs figure."""
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times), str(dtype).replace("torch.", "")


def memory_reset(rt: Runtime) -> None:
    gc.collect()
    if rt.device_type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def memory_peak_gib(rt: Runtime) -> float:
    if rt.device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process-wide high-water mark (KiB)


def timed_steps(step_fn, n_warmup: int, n_steps: int, device: str) -> tuple[list[float], list[float]]:
    """(seconds per timed step, loss of every step). step_fn(step) must end with a read-back (a host sync)."""
    times, losses = [], []
    for step in range(n_warmup + n_steps):
        sync(device)
        t0 = time.perf_counter()
        losses.append(step_fn(step))
        if step >= n_warmup:
            times.append(time.perf_counter() - t0)
    return times, losses


def summarize(name: str, times: list[float], losses: list[float], tokens: int, B: int, accum: int, fpt: float, peak: float,
              mem: float, notes: str) -> dict:
    dt = statistics.median(times)
    tok_s = tokens / dt
    return {"name": name, "B": B, "accum": accum, "tokens_per_step": tokens, "ms_per_step": 1000 * dt, "ms_min": 1000 * min(times),
            "ms_max": 1000 * max(times), "steps": len(times), "tok_s": tok_s, "mfu": fpt * tok_s / peak, "peak_mem_gib": mem,
            "losses": losses, "notes": notes}


def dynamo_frames() -> int:
    """Frames torch.compile has compiled so far (a recompilation counts as one more)."""
    from torch._dynamo.utils import counters

    return int(counters["frames"].get("total", 0))


# --- setup -------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def runtime(device: str, ddp: bool) -> Runtime:
    if device.startswith("cuda"):
        device = "cuda:0"
        torch.cuda.set_device(device)
    if ddp and not dist.is_initialized():
        # The trainer's DDP path with one process: the wrapper, its hooks and buckets, a real (trivial) all-reduce.
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", rank=0, world_size=1)
    return Runtime(ddp, 0, 0, 1, device, device.split(":")[0])


def parse_variant(text: str) -> tuple[str, dict]:
    """NAME:key=value,key=value -> (NAME, {key: typed value}); keys are TrainConfig fields, or ddp=0/1."""
    name, _, spec = text.partition(":")
    if not name or not spec:
        raise UserError(f"--variant {text!r}: expected NAME:key=value[,key=value...], e.g. ce:ce_chunk_tokens=8192")
    return name, parse_settings(spec.split(","), f"--variant {name}", extra=("ddp",))


def base_config(args) -> TrainConfig:
    overrides = {k: v for k, v in dict(preset=args.preset, micro_batch=args.micro_batch, seq_len=args.seq_len).items() if v}
    cfg = from_dict(overrides)
    cfg.device, cfg.compile, cfg.dtype = args.device, args.compile, args.dtype
    cfg.total_batch_tokens = cfg.micro_batch * cfg.seq_len * args.grad_accum
    cfg.hellaswag_every, cfg.resume = 0, "never"
    for k, v in parse_settings(args.set, "--set", extra=("ddp",)).items():
        if k == "ddp":  # the same vocabulary as --variant, so bench_summary.py --winner-sets can name any winner
            args.ddp = "on" if v else "off"
        else:
            setattr(cfg, k, v)
    if args.quick:
        cfg.val_steps, cfg.sample_tokens = 2, 4
    return validate(cfg)


def variant_config(base: TrainConfig, settings: dict) -> TrainConfig:
    cfg = dataclasses.replace(base, **{k: v for k, v in settings.items() if k != "ddp"})
    cfg.total_batch_tokens = base.total_batch_tokens  # same tokens per step: comparable losses, fair tok/s
    return validate(cfg)


def make_trainer(cfg: TrainConfig, rt: Runtime) -> Trainer:
    cfg = dataclasses.replace(cfg, log_dir=tempfile.mkdtemp(prefix="bench-log-"))
    atexit.register(shutil.rmtree, cfg.log_dir, ignore_errors=True)
    pin = rt.device_type == "cuda"
    trainer = Trainer(cfg, rt, train_loader=SyntheticLoader(cfg.micro_batch, cfg.seq_len, seed=cfg.seed, pin=pin),
                      val_loader=SyntheticLoader(cfg.micro_batch, cfg.seq_len, seed=cfg.seed + 1, pin=pin))
    trainer.log.enabled = False
    # The trainer turns SIGTERM/Ctrl-C into "stop after this step"; a benchmark should just stop.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return trainer


def describe(cfg: TrainConfig, trainer: Trainer) -> str:
    return (f"compile {cfg.compile_mode if trainer.use_compile else 'off'}, "
            f"{'fused' if trainer.optimizer.defaults.get('fused') else 'unfused'} AdamW, "
            f"{'DDP x1' if trainer.rt.ddp else 'no DDP'}, prefetch {cfg.prefetch}, "
            f"loss {'chunked ' + str(cfg.ce_chunk_tokens) if cfg.ce_chunk_tokens else 'full logits'}"
            + (f", attention {cfg.sdpa_backend} first" if cfg.sdpa_backend != "auto" else "")
            + (", residual bfloat16" if trainer.model.residual_dtype == torch.bfloat16 else ""))


def trainer_step_fn(trainer: Trainer):
    # The trainer's own step and its per-step read-back (one all-reduce + one host sync, as under torchrun).
    return lambda step: trainer.train_and_agree(step, read_back=True)[0]


# --- the parts ---------------------------------------------------------------------------------------
def run_trainer(name: str, cfg: TrainConfig, rt: Runtime, args, fpt: float, peak: float, keep: bool = False):
    memory_reset(rt)
    trainer = make_trainer(cfg, rt)
    times, losses = timed_steps(trainer_step_fn(trainer), args.warmup, args.steps, rt.device)
    res = summarize(name, times, losses, cfg.total_batch_tokens, cfg.micro_batch, trainer.grad_accum, fpt, peak,
                    memory_peak_gib(rt), describe(cfg, trainer))
    if args.profile:  # after the timed steps, so profiling costs none of the figures above (nor can lose them)
        res["profile"] = guarded(f"({name}) profile", run_profile, trainer, rt, args, res["ms_per_step"])
    # MFU here is against the peak measured before the runs; the report's is against the higher of that and the peak
    # measured after them, so the two can differ.
    print(f"# ({name}) done: {res['ms_per_step']:.1f} ms/step, {res['tok_s']:,.0f} tok/s, "
          f"MFU {100 * res['mfu']:.1f}% of the peak measured before the runs", flush=True)
    return (res, trainer) if keep else (res, None)


# Kernel (GPU) or operator (CPU) names -> what part of the step they are; the first match wins, so attention
# kernels (which run GEMM-like instructions) are claimed before the matmuls, and the loss before other reductions.
PROFILE_CATEGORIES = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "attn")),
    ("communication", ("nccl", "allreduce", "all_reduce")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "clip_grad", "norm_kernel")),
    # triton_tem_*: Inductor's GEMM templates (compile mode autotune), with whatever epilogue they fused
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "wgmma", "triton_tem", "aten::mm", "aten::addmm", "aten::bmm", "matmul")),
    ("loss", ("softmax", "nll", "cross_entropy", "logsumexp")),
    ("layer norm", ("layer_norm",)),
    ("gelu", ("gelu", "tanh")),
    ("embedding", ("embedding", "index_put", "scatter", "gather")),
    ("copy/fill", ("memcpy", "memset", "copy", "fill", "zero")),
)


PROFILE_TOP_PRINTED, PROFILE_TOP_JSON = 12, 60  # the log shows the first; --json keeps more for reading afterwards


def kernel_category(name: str) -> str:
    low = name.lower()
    for category, needles in PROFILE_CATEGORIES:
        if any(n in low for n in needles):
            return category
    return "other"


def profile_kernels(step_fn, device: str, n: int) -> dict[str, list]:
    """{kernel (GPU) or operator (CPU) name: [total microseconds, calls]} over n calls of step_fn(i)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    with profile(activities=activities) as prof:
        for s in range(n):
            step_fn(s)
        sync(device)
    kernels: dict[str, list] = {}
    for evt in prof.key_averages():
        if getattr(evt, "is_user_annotation", False):
            continue  # record_function ranges (DDP's forward, ...): also on the GPU timeline, but they are not kernels
        if cuda:
            if evt.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = evt.self_device_time_total
        else:
            # Operators only: autograd nodes (SomethingBackward0) and compiled-region markers are frames around them.
            if evt.key.startswith(("ProfilerStep", "Torch-Compiled", "CompiledFunction", "## ", "autograd::")) or \
                    evt.key.rstrip("0123456789").endswith("Backward"):
                continue
            us = evt.self_cpu_time_total
        if us > 0:
            k = kernels.setdefault(evt.key, [0.0, 0])
            k[0] += us
            k[1] += evt.count
    return kernels


def run_profile(trainer: Trainer, rt: Runtime, args, wall_ms: float) -> dict:
    """Where one step's time goes: GPU kernel time by category (operator self time on a CPU), for 2 steps of
    the already-warm trainer, beside the measured wall time per step. The gap is time the GPU sat idle."""
    cuda = rt.device_type == "cuda"
    n = 1 if args.quick else 2
    kernels = profile_kernels(trainer_step_fn(trainer), rt.device, n)
    if not kernels:
        raise RuntimeError("the profiler recorded no " + ("GPU kernels (is CUPTI available?)" if cuda else "operators"))
    busy_ms = sum(us for us, _ in kernels.values()) / 1000 / n
    by_cat: dict[str, float] = {}
    for name, (us, _) in kernels.items():
        cat = kernel_category(name)
        by_cat[cat] = by_cat.get(cat, 0.0) + us / 1000 / n
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:PROFILE_TOP_JSON]
    return {"steps": n, "what": "GPU kernel time" if cuda else "CPU operator self time", "wall_ms_per_step": wall_ms,
            "busy_ms_per_step": busy_ms, "categories_ms": dict(sorted(by_cat.items(), key=lambda kv: -kv[1])),
            "top": [{"name": name, "ms_per_step": us / 1000 / n, "calls_per_step": calls / n, "category": kernel_category(name)}
                    for name, (us, calls) in top],
            "attention_kernels": sorted(name for name in kernels if kernel_category(name) == "attention")}


def run_real(trainer: Trainer, cfg: TrainConfig, rt: Runtime, args, fpt: float, peak: float) -> dict:
    """The same (already compiled) step, fed from a generated shard through ShardLoader + DeviceLoader."""
    per_step = cfg.total_batch_tokens
    d = generated_shard_dir(per_step * (args.warmup + args.steps + 2) + 1)
    trainer.train_loader = DeviceLoader(ShardLoader(d, "train", cfg.micro_batch, cfg.seq_len, pin_memory=rt.device_type == "cuda"),
                                        rt.device, cfg.prefetch)
    memory_reset(rt)
    times, losses = timed_steps(trainer_step_fn(trainer), min(args.warmup, 2), args.steps, rt.device)
    shutil.rmtree(d, ignore_errors=True)
    return summarize("real", times, losses, per_step, cfg.micro_batch, trainer.grad_accum, fpt, peak, memory_peak_gib(rt),
                     "as (a), real ShardLoader on a generated shard (memory-mapped, pinned, prefetched)")


def hellaswag_like_examples(n: int) -> list[dict]:
    """HellaSwag-shaped examples (a context and 4 endings of a few dozen tokens) from the bundled corpus."""
    text = (Path(__file__).resolve().parents[1] / "job" / "assets" / "tinyshakespeare.txt").read_text()
    lines = [ln for ln in text.splitlines() if len(ln.split()) >= 6]
    return [{"ctx": " ".join(lines[(7 * i + k) % len(lines)] for k in range(3)),
             "endings": [lines[(13 * i + 5 * k) % len(lines)] for k in range(4)], "label": i % 4} for i in range(n)]


def run_eval(trainer: Trainer, cfg: TrainConfig, rt: Runtime, args, a: dict) -> dict:
    """Validation, sampling and HellaSwag as the trainer runs them, their share of wall time at the default
    intervals, and the recompilations they cause once warm."""
    from job import hellaswag

    n_hs = 8 if args.quick else args.hellaswag_examples
    examples = hellaswag_like_examples(n_hs)
    defaults = from_dict({"preset": cfg.preset})  # the intervals a real run of this preset uses
    sample_cfg = dataclasses.replace(cfg, sample_num=defaults.sample_num, sample_tokens=4 if args.quick else defaults.sample_tokens)
    trainer.cfg = sample_cfg

    def hs():
        return hellaswag.evaluate(trainer.model, examples, rt.device, autocast_dtype=trainer.autocast_dtype)

    def timed(fn):
        sync(rt.device)
        t0 = time.perf_counter()
        fn()
        sync(rt.device)
        return time.perf_counter() - t0

    step_fn = trainer_step_fn(trainer)
    # Warm-up: everything once, then training again (train mode after eval mode).
    frames0 = dynamo_frames()
    timed(lambda: trainer.eval_val(0))
    timed(lambda: trainer.sample(0))
    timed(hs)
    for s in range(2):
        step_fn(s)
    frames_warm = dynamo_frames()
    t_val = timed(lambda: trainer.eval_val(0))
    t_sample = timed(lambda: trainer.sample(0))
    t_hs = timed(hs)
    for s in range(2):
        step_fn(s)
    t_val2 = timed(lambda: trainer.eval_val(0))
    recompiles = dynamo_frames() - frames_warm
    trainer.cfg = cfg
    # At the preset's real batch (e.g. 2**19 tokens per step) and eval intervals, not the benchmark's.
    step_s = defaults.total_batch_tokens / a["tok_s"]
    t_val = min(t_val, t_val2)
    hs_full = t_hs / n_hs * HELLASWAG_EXAMPLES
    share = {}
    for key, every, cost in (("val", defaults.eval_every, t_val), ("hellaswag", defaults.hellaswag_every, hs_full),
                             ("sample", defaults.sample_every, t_sample)):
        share[key] = cost / (every * step_s) if every else 0.0
    total = sum(share.values())
    return {"val_s": t_val, "val_batches": cfg.val_steps, "sample_s": t_sample,
            "sample": f"{sample_cfg.sample_num} x {sample_cfg.sample_tokens} tokens",
            "hellaswag_s_per_example": t_hs / n_hs, "hellaswag_examples_timed": n_hs, "hellaswag_full_s": hs_full,
            "intervals": {"eval_every": defaults.eval_every, "hellaswag_every": defaults.hellaswag_every, "sample_every": defaults.sample_every},
            "step_s_at_preset_batch": step_s, "share": share, "share_total": total / (1 + total),
            "compiled_frames_warmup": frames_warm - frames0, "recompiles_after_warmup": recompiles}


def run_ckpt(trainer: Trainer, rt: Runtime, args) -> dict:
    """How long a checkpoint (model + AdamW state) holds training, with the trainer's own save()."""
    step_fn = trainer_step_fn(trainer)
    saver = trainer.saver
    n = 3 if args.quick else 5
    times_free, _ = timed_steps(step_fn, 0, n, rt.device)
    held = []
    for k in range(2):  # the first save allocates the pinned buffers, the next ones reuse them
        trainer.save(10_000 + k, None)
        held.append(trainer.held_for[10_000 + k]["stall_s"])
        writing = saver.busy
        times_busy, _ = timed_steps(step_fn, 0, n, rt.device)  # training while the file is written
        done = saver.wait()
    write_s = done[-1]["write_s"]
    size = Path(done[-1]["path"]).stat().st_size
    shutil.rmtree(trainer.cfg.log_dir, ignore_errors=True)  # two GPT-2 checkpoints are 3 GB of temp space
    return {"bytes": size, "stall_first_s": held[0], "stall_s": held[1], "write_s": write_s, "write_overlapped": writing,
            "step_ms_idle": 1000 * statistics.median(times_free), "step_ms_while_writing": 1000 * statistics.median(times_busy)}


def run_plain(cfg: TrainConfig, rt: Runtime, args, fpt: float, peak: float) -> dict:
    memory_reset(rt)
    accum = cfg.total_batch_tokens // (cfg.micro_batch * cfg.seq_len)
    plain = PlainStep(cfg, rt, SyntheticLoader(cfg.micro_batch, cfg.seq_len, seed=cfg.seed), accum)
    times, losses = timed_steps(plain.step, min(args.warmup, 3), args.steps, rt.device)
    res = summarize("b", times, losses, cfg.total_batch_tokens, cfg.micro_batch, accum, fpt, peak, memory_peak_gib(rt),
                    "eager, unfused AdamW, no DDP, full logits, pageable copies, loss read back per step")
    del plain
    return res


def earlier_baseline(path: str, res: dict) -> list[float] | None:
    """(b)'s losses from an earlier results file of the same setup, or None (said on stdout) if there are none."""
    try:
        earlier = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        print(f"numerics: no baseline to compare with ({path}: {type(e).__name__})")
        return None
    if any(earlier.get(k) != res[k] for k in ("preset", "T", "tokens_per_step", "seed")):
        print(f"numerics: {path} is another setup (preset, T, tokens per step or seed differ): not compared")
        return None
    return earlier.get("runs", {}).get("b", {}).get("losses")


def numerics(runs: dict, reference: list[float] | None, dtype: str) -> dict:
    """Max relative loss difference of each synthetic-data run to the plain baseline, step by step."""
    out = {}
    if not reference:
        return out
    tol = NUMERICS_TOL.get(dtype, 1e-2)
    for name, r in runs.items():
        if name in ("b", "real") or "losses" not in r:
            continue
        n = min(len(r["losses"]), len(reference))
        diff = max(abs(x - y) / abs(y) for x, y in zip(r["losses"][:n], reference[:n], strict=True))
        out[name] = {"max_rel_diff": diff, "steps": n, "tolerance": tol, "ok": diff <= tol}
    return out


# --- output ------------------------------------------------------------------------------------------
LABELS = {"a": "(a) trainer", "real": "(a) real data", "b": "(b) plain eager"}


def print_report(res: dict) -> None:
    print(f"device        {res['device']} | torch {res['torch']} | {res['dtype']}")
    print(f"model         {res['preset']}: {res['params'] / 1e6:.1f}M params, T={res['T']}, {res['tokens_per_step']:,} tokens per step")
    measured = res.get("peak_flops_measured") or [res["peak_flops"]]
    print(f"matmul peak   {res['peak_flops'] / 1e12:.4g} TFLOP/s ({res['peak_dtype']} {res['gemm_size']}^3 GEMM, measured, median"
          + (f"; the higher of {' before and '.join(f'{p / 1e12:.4g}' for p in measured)} after the runs" if len(measured) > 1 else "")
          + ")"
          + (f"; nominal {res['nominal_peak'] / 1e12:.0f}" if res.get("nominal_peak") else ""))
    f = res["flops"]
    print(f"FLOPs/token   {f['per_token'] / 1e9:.4f} GFLOP = 6N {f['6N'] / 1e9:.4f} (N={f['N'] / 1e6:.1f}M) + attention 12*L*d*T "
          f"{f['attention'] / 1e9:.4f}")
    print()
    print(f"{'run':<22} {'B':>4} {'accum':>5} {'ms/step':>9} {'tok/s':>11} {'MFU':>6} {'peak GiB':>9}  notes")
    for name, r in res["runs"].items():
        label = LABELS.get(name, f"(a) {name}")
        if "error" in r:
            print(f"{label:<22} {'':>4} {'':>5} {'':>9} {'':>11} {'':>6} {'':>9}  failed: {r['error']}")
            continue
        print(f"{label:<22} {r['B']:>4} {r['accum']:>5} {r['ms_per_step']:>9.1f} {r['tok_s']:>11,.0f} {100 * r['mfu']:>5.1f}% "
              f"{r['peak_mem_gib']:>9.2f}  {r['notes']}")
    print()
    if "ratio_a_b" in res:
        print(f"ratio a/b: {res['ratio_a_b']:.2f}x")
    if "real_vs_synthetic" in res:
        print(f"real data vs synthetic: {100 * res['real_vs_synthetic']:+.1f}% tok/s (goal: within 2%)")
    for name, n in res.get("numerics", {}).items():
        print(f"numerics {name} vs b: max rel loss diff {n['max_rel_diff']:.2e} over {n['steps']} steps "
              f"(tolerance {n['tolerance']:.0e}): {'ok' if n['ok'] else 'FAIL'}")
    for part in ("eval", "ckpt"):
        if "error" in res.get(part, {}):
            print(f"{part}: failed: {res[part]['error']}")
    if "eval" in res and "error" not in res["eval"]:
        e = res["eval"]
        iv = e["intervals"]
        print(f"eval: val {e['val_s']:.3f} s ({e['val_batches']} batches), sampling {e['sample_s']:.3f} s ({e['sample']}), "
              f"HellaSwag {1000 * e['hellaswag_s_per_example']:.1f} ms/example -> {e['hellaswag_full_s']:.1f} s for {HELLASWAG_EXAMPLES}")
        sh = e["share"]
        print(f"eval share: {100 * e['share_total']:.1f}% of wall time at every {iv['eval_every']}/{iv['hellaswag_every']}/"
              f"{iv['sample_every']} steps (val {100 * sh['val']:.2f}%, HellaSwag {100 * sh['hellaswag']:.2f}%, "
              f"sampling {100 * sh['sample']:.2f}%; step {e['step_s_at_preset_batch']:.2f} s at the preset's batch)")
        print(f"recompiles after warm-up: {e['recompiles_after_warmup']} (frames compiled in warm-up: {e['compiled_frames_warmup']})")
    for name, r in res["runs"].items():
        if "error" in r.get("profile", {}):
            print(f"profile {LABELS.get(name, f'(a) {name}')}: failed: {r['profile']['error']}")
        elif "profile" in r:
            print_profile(LABELS.get(name, f"(a) {name}"), r["profile"])
    if "ckpt" in res and "error" not in res["ckpt"]:
        c = res["ckpt"]
        print(f"checkpoint: {c['bytes'] / 2**20:,.0f} MiB, training held {c['stall_s']:.3f} s "
              f"(first save, which allocates the buffers: {c['stall_first_s']:.3f} s), written in {c['write_s']:.2f} s in the background; "
              f"step {c['step_ms_while_writing']:.1f} ms while writing vs {c['step_ms_idle']:.1f} ms")


def print_profile(label: str, pr: dict) -> None:
    wall, busy = pr["wall_ms_per_step"], pr["busy_ms_per_step"]
    print(f"profile {label}: {pr['what']} {busy:.1f} ms per step of {wall:.1f} ms wall ({100 * busy / wall:.0f}%; "
          f"over {pr['steps']} step{'s' if pr['steps'] > 1 else ''} after the timed ones)")
    print("  " + ", ".join(f"{cat} {ms:.1f} ms ({100 * ms / wall:.1f}%)" for cat, ms in pr["categories_ms"].items()))
    for k in pr["top"][:PROFILE_TOP_PRINTED]:
        print(f"  {k['ms_per_step']:8.2f} ms {100 * k['ms_per_step'] / wall:5.1f}% x{k['calls_per_step']:<5g} {k['category']:<13} {k['name'][:110]}")
    if pr["attention_kernels"]:
        print("  attention kernels: " + "; ".join(n[:90] for n in pr["attention_kernels"]))


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2")
    p.add_argument("--micro-batch", type=int_arg(1))
    p.add_argument("--seq-len", type=int_arg(1))
    p.add_argument("--grad-accum", type=int_arg(1), default=2, help="micro-steps per optimizer step (default 2: the trainer's "
                   "accumulation path; on one GPU it uses 8 for 2**19 tokens, which only amortises the optimizer more)")
    p.add_argument("--steps", type=int_arg(1), default=20, help="timed optimizer steps per run (median reported)")
    p.add_argument("--warmup", type=int_arg(0), default=5, help="untimed steps first (compile, allocator, caches)")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    p.add_argument("--ddp", default="on", choices=["on", "off"], help="wrap (a) in DDP with world size 1, as under torchrun")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="TrainConfig field for (a) and variants, or ddp=0/1 (as --ddp)")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {','.join(RUNS)}")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...", help="another (a) with these settings")
    p.add_argument("--compare-json", help="results JSON of an earlier run whose (b) losses the variants are checked against")
    p.add_argument("--hellaswag-examples", type=int_arg(1), default=200, help="HellaSwag-shaped examples timed (extrapolated to 10042)")
    p.add_argument("--gemm-size", type=int_arg(1), help="matmul size for the peak (default 8192 on GPU, 1024 on CPU)")
    p.add_argument("--quick", action="store_true", help="a smoke test: 3 steps after 1 warm-up, small evals")
    p.add_argument("--json", help="write every figure to this JSON file")
    p.add_argument("--profile", action="store_true", help="after timing (a) and each variant, profile 2 more steps: "
                   "GPU time by kernel category (matmul, attention, loss, ...), the top kernels, which attention kernel ran")
    args = p.parse_args(argv)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    bad = [r for r in runs if r not in RUNS]
    if bad:
        raise UserError(f"--runs: unknown run {bad[0]!r}; choose from {', '.join(RUNS)}")
    if args.quick:
        args.steps, args.warmup = 3, 1
    if args.json:
        check_output_path(args.json, "--json")  # now, not after the whole benchmark
    cfg = base_config(args)
    variants = [(name, settings, variant_config(cfg, settings)) for name, settings in map(parse_variant, args.variant)]
    device = pick_device(cfg.device)
    rt = runtime(device, args.ddp == "on" or any(v.get("ddp") for _, v, _ in variants))
    rt_a = dataclasses.replace(rt, ddp=args.ddp == "on")
    rt_plain = dataclasses.replace(rt, ddp=False)
    dtype = str(autocast_ctx(cfg, rt)[1] or torch.float32).replace("torch.", "")
    gemm = args.gemm_size or (8192 if rt.device_type == "cuda" else (512 if args.quick else 1024))
    peak, peak_dtype = matmul_peak(rt.device, gemm)
    probe = GPT(cfg.model_config())
    fpt = probe.flops_per_token(cfg.seq_len)
    n_params = probe.num_params() - probe.transformer.wpe.weight.numel()
    mc = cfg.model_config()
    del probe
    name = torch.cuda.get_device_name(rt.device) if rt.device_type == "cuda" else f"CPU {platform.machine()} x {torch.get_num_threads()} threads"
    res = {"device": name, "torch": torch.__version__, "dtype": dtype, "preset": cfg.preset, "params": n_params, "T": cfg.seq_len,
           "B": cfg.micro_batch, "tokens_per_step": cfg.total_batch_tokens, "peak_flops": peak, "peak_dtype": peak_dtype, "gemm_size": gemm,
           "nominal_peak": peak_flops(name) if rt.device_type == "cuda" else None,
           "flops": {"per_token": fpt, "N": n_params, "6N": 6 * n_params, "attention": 12 * mc.n_layer * mc.n_embd * cfg.seq_len},
           "steps": args.steps, "warmup": args.warmup, "seed": cfg.seed, "set": parse_settings(args.set, "--set", extra=("ddp",)), "runs": {}}
    print(f"# {name}: {cfg.preset} B={cfg.micro_batch} T={cfg.seq_len} x{args.grad_accum} accum, {dtype}; runs {','.join(runs)}"
          + (f" + variants {','.join(n for n, _, _ in variants)}" if variants else ""), flush=True)

    trainer = None
    if any(r in runs for r in ("a", "real", "eval", "ckpt")):
        # Every part is guarded: a setting that breaks on this torch (a compile, a kernel) costs its own figures only.
        try:
            res["runs"]["a"], trainer = run_trainer("a", cfg, rt_a, args, fpt, peak, keep=True)
        except Exception as e:
            res["runs"]["a"] = {"name": "a", "error": failure(e)}
            print(f"# (a) failed: {res['runs']['a']['error']}", flush=True)
        if trainer is not None and "eval" in runs:
            res["eval"] = guarded("eval", run_eval, trainer, cfg, rt_a, args, res["runs"]["a"])
        if trainer is not None and "ckpt" in runs:
            res["ckpt"] = guarded("checkpoint", run_ckpt, trainer, rt_a, args)
        if trainer is not None and "real" in runs:
            res["runs"]["real"] = guarded("real data", run_real, trainer, cfg, rt_a, args, fpt, peak)
            if "tok_s" in res["runs"]["real"]:
                res["real_vs_synthetic"] = res["runs"]["real"]["tok_s"] / res["runs"]["a"]["tok_s"] - 1
        if "a" not in runs:
            del res["runs"]["a"]
    del trainer
    _reset_compiled()
    for vname, settings, vcfg in variants:
        vrt = dataclasses.replace(rt, ddp=bool(settings.get("ddp", args.ddp == "on")))
        try:
            res["runs"][vname], _ = run_trainer(vname, vcfg, vrt, args, fpt, peak)
        except Exception as e:  # one failed variant (e.g. a compile mode that breaks) must not lose the others
            res["runs"][vname] = {"name": vname, "error": failure(e)}
            print(f"# ({vname}) failed: {res['runs'][vname]['error']}", flush=True)
        res["runs"][vname]["settings"] = settings
        _reset_compiled()
    reference = None
    if "b" in runs:
        res["runs"]["b"] = run_plain(cfg, rt_plain, args, fpt, peak)
        reference = res["runs"]["b"]["losses"]
        if "tok_s" in res["runs"].get("a", {}):
            res["ratio_a_b"] = res["runs"]["a"]["tok_s"] / res["runs"]["b"]["tok_s"]
    elif args.compare_json:
        reference = earlier_baseline(args.compare_json, res)
    # The peak again, after the runs: MFU is taken against the higher of the two, so a card that was slow to
    # clock up (or throttled by the end) cannot flatter it. Both are reported.
    after, _ = matmul_peak(rt.device, gemm)
    res["peak_flops_measured"] = [peak, after]
    if after > peak:
        res["peak_flops"] = after
        for r in res["runs"].values():
            if "tok_s" in r:
                r["mfu"] = fpt * r["tok_s"] / after
    res["numerics"] = numerics(res["runs"], reference, dtype)
    print_report(res)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1, default=str) + "\n")
    if dist.is_initialized():
        dist.destroy_process_group()
    failed = [name for name, r in res["runs"].items() if "error" in r or "error" in r.get("profile", {})]
    failed += [part for part in ("eval", "ckpt") if "error" in res.get(part, {})]
    failed += [f"numerics of {name}" for name, n in res["numerics"].items() if not n["ok"]]
    if failed:
        raise UserError(f"failed: {', '.join(failed)} (every other figure is above" + (f" and in {args.json})" if args.json else ")"))


def failure(e: BaseException) -> str:
    if isinstance(e, torch.OutOfMemoryError):
        return "out of GPU memory"
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


def guarded(what: str, fn, *args):
    """fn(*args), or {"error": ...} (said on stdout) if it raised."""
    try:
        out = fn(*args)
    except Exception as e:
        print(f"# {what} failed: {failure(e)}", flush=True)
        return {"error": failure(e)}
    print(f"# {what} done", flush=True)
    return out


def _reset_compiled() -> None:
    # Drop compiled graphs (and the models they hold) between runs, so every run starts from the same state.
    gc.collect()
    with contextlib.suppress(Exception):
        torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
