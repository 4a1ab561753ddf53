"""The training benchmark's measurements, for scripts/bench_train.py (the CLI and its report).

Each `run_*` measures one part: the trainer's real step on synthetic tokens (`run_trainer`, through job.train's
own Trainer), the same step fed by the real shard loader (`run_real`), evaluation and sampling (`run_eval`), a
checkpoint (`run_ckpt`), a profile of where a step's time goes (`run_profile`), and the plain eager baseline
(`run_plain`, `PlainStep`). `numerics` compares the loss trajectories. Timings are medians over the timed steps.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import gc
import json
import os
import resource
import shutil
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

from job.config import TrainConfig, from_dict  # noqa: E402
from job.data import DeviceLoader, ShardLoader, write_shard  # noqa: E402
from job.model import GPT, GPT2_VOCAB  # noqa: E402
from job.optim import configure_optimizer, get_lr  # noqa: E402
from job.runtime import Runtime, agree, autocast_ctx  # noqa: E402
from job.train import Trainer, prepare_process  # noqa: E402

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
        self.optimizer = configure_optimizer(self.model, cfg.hp.weight_decay, cfg.hp.max_lr, (cfg.hp.beta1, cfg.hp.beta2), cfg.hp.eps,
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
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.hp.grad_clip if cfg.hp.grad_clip else float("inf"))
        lr = get_lr(step, cfg.hp.max_lr, cfg.hp.max_lr * cfg.hp.min_lr_ratio, cfg.hp.warmup_steps, cfg.max_steps)
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

    A short burst: three warm-up calls (they pick the kernel and warm caches), then reps GEMMs timed one by one.
    A long run of back-to-back GEMMs, meant to bring an idle card up to its clocks, reads below what the trainer's
    own GEMMs reach (the card held at its power limit by the heaviest GEMM there is; docs/BENCHMARKS.md), so it
    is no ceiling. A card still at idle clocks reads low before the runs: the report takes the higher of this and
    the figure measured after the runs."""
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


def make_trainer(cfg: TrainConfig, rt: Runtime, log: bool = False) -> Trainer:
    cfg = dataclasses.replace(cfg, log_dir=tempfile.mkdtemp(prefix="bench-log-"))
    atexit.register(shutil.rmtree, cfg.log_dir, ignore_errors=True)
    pin = rt.device_type == "cuda"
    trainer = Trainer(cfg, rt, train_loader=SyntheticLoader(cfg.micro_batch, cfg.seq_len, seed=cfg.seed, pin=pin),
                      val_loader=SyntheticLoader(cfg.micro_batch, cfg.seq_len, seed=cfg.seed + 1, pin=pin))
    trainer.log.enabled = log  # --log: each step writes its log line, metrics.jsonl and the dashboards, as in training
    # The process-wide settings job.train's run() makes (seed, TF32 on CUDA); not its signal handlers, which turn
    # SIGTERM/Ctrl-C into "stop after this step": a benchmark should just stop.
    prepare_process(cfg, rt)
    return trainer


def describe(cfg: TrainConfig, trainer: Trainer) -> str:
    if cfg.recipe != "gpt2":  # the settings below are the gpt2 recipe's; another says its own (Recipe.describe)
        return (f"{cfg.recipe} recipe, compile {cfg.compile_mode if trainer.use_compile else 'off'}, "
                f"{'DDP x1' if trainer.rt.ddp else 'no DDP'}, prefetch {cfg.prefetch}"
                + trainer.recipe.describe(trainer.model, cfg).replace(" | ", ", "))
    return (f"compile {cfg.compile_mode if trainer.use_compile else 'off'}, "
            f"{'fused' if all(o.defaults.get('fused') for o in trainer.optimizer) else 'unfused'} AdamW, "
            f"{'DDP x1' if trainer.rt.ddp else 'no DDP'}, prefetch {cfg.prefetch}, "
            f"loss {'chunked ' + str(cfg.hp.ce_chunk_tokens) if cfg.hp.ce_chunk_tokens else 'full logits'}"
            + (f", attention {cfg.hp.sdpa_backend} first" if cfg.hp.sdpa_backend != "auto" else "")
            + (", residual bfloat16" if trainer.model.residual_dtype == torch.bfloat16 else ""))


def trainer_step_fn(trainer: Trainer, log: bool = False):
    # The trainer's own step and its per-step read-back (one all-reduce + one host sync, as under torchrun); with
    # `log`, also the trainer's own log step (stdout, train.log, metrics.jsonl, log.txt, the dashboards' writers).
    def step(i: int) -> float:
        t0 = time.perf_counter()
        loss, norm, hparams = trainer.train_step(i)
        agreed = agree(trainer.rt, loss, norm, trainer.requests(), read_back=True)
        if log:
            dt = time.perf_counter() - t0
            trainer._log_step(i, agreed.loss, agreed.norm, hparams, dt, dt)
        return agreed.loss

    return step


# --- the parts ---------------------------------------------------------------------------------------
def run_trainer(name: str, cfg: TrainConfig, rt: Runtime, args, fpt: float, peak: float, keep: bool = False):
    memory_reset(rt)
    log = getattr(args, "log", False)
    trainer = make_trainer(cfg, rt, log=log)
    times, losses = timed_steps(trainer_step_fn(trainer, log=log), args.warmup, args.steps, rt.device)
    trainer.log.close()
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
    saver = trainer.ckpt.saver
    n = 3 if args.quick else 5
    times_free, _ = timed_steps(step_fn, 0, n, rt.device)
    held = []
    for k in range(2):  # the first save allocates the pinned buffers, the next ones reuse them
        trainer.save(10_000 + k, None)
        held.append(trainer.ckpt.held_for[10_000 + k]["stall_s"])
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
    if not isinstance(earlier, dict) or not isinstance(earlier.get("runs", {}), dict):
        print(f"numerics: {path} is not a results file of this benchmark: not compared")
        return None
    if any(earlier.get(k) != res[k] for k in ("preset", "T", "tokens_per_step", "seed")):
        print(f"numerics: {path} is another setup (preset, T, tokens per step or seed differ): not compared")
        return None
    b = earlier.get("runs", {}).get("b")
    losses = b.get("losses") if isinstance(b, dict) else None
    return losses if isinstance(losses, list) and all(isinstance(x, (int, float)) for x in losses) else None


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


def reset_compiled() -> None:
    # Drop compiled graphs (and the models they hold) between runs, so every run starts from the same state.
    gc.collect()
    with contextlib.suppress(Exception):
        torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
