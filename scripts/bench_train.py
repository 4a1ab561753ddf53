#!/usr/bin/env python
"""Time the trainer's real optimizer step on synthetic tokens: tok/s, ms/step, peak memory, MFU.

    python scripts/bench_train.py --preset gpt2 --micro-batch 64 --seq-len 1024      # on a GPU
    python scripts/bench_train.py --preset tiny                                      # on a laptop CPU

MFU is model FLOPs (6N + attention term per token, see GPT.flops_per_token) over a matmul peak
measured in the same run: bf16 on CUDA (the number training uses), fp32 on CPU.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from job.config import from_dict, validate  # noqa: E402
from job.train import Runtime, Trainer, pick_device  # noqa: E402


class SyntheticLoader:
    """Random tokens, generated up front so no data work lands inside the timed region."""

    def __init__(self, B: int, T: int, n: int = 8, vocab: int = 50257, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.batches = [torch.randint(0, vocab, (B, T + 1), generator=g) for _ in range(n)]
        self.i = 0

    def next_batch(self):
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return b[:, :-1].contiguous(), b[:, 1:].contiguous()

    def reset(self):
        self.i = 0

    def state_dict(self):
        return {}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(device: str, n: int, reps: int = 10) -> tuple[float, str]:
    """Median FLOP/s of a large square GEMM: bf16 on CUDA, fp32 on CPU."""
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(reps + 2):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        if i >= 2:  # first calls pick kernels / warm caches
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times), str(dtype).replace("torch.", "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--micro-batch", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, allocator, caches)")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    p.add_argument("--gemm-size", type=int, default=None, help="matmul size for the peak (default 8192 GPU, 2048 CPU)")
    args = p.parse_args()

    overrides = {k: v for k, v in dict(preset=args.preset, micro_batch=args.micro_batch, seq_len=args.seq_len).items() if v}
    cfg = from_dict(overrides)
    cfg.total_batch_tokens = cfg.micro_batch * cfg.seq_len * args.grad_accum
    cfg.device, cfg.compile, cfg.dtype = args.device, args.compile, args.dtype
    cfg.hellaswag_every, cfg.resume = 0, "never"
    cfg.log_dir = tempfile.mkdtemp(prefix="bench-")
    validate(cfg)
    device = pick_device(cfg.device)
    if device == "cuda":
        device = "cuda:0"
        torch.cuda.set_device(device)
    rt = Runtime(False, 0, 0, 1, device, device.split(":")[0])

    peak, peak_dtype = matmul_peak(device, args.gemm_size or (8192 if rt.device_type == "cuda" else 2048))
    loader = SyntheticLoader(cfg.micro_batch, cfg.seq_len)
    trainer = Trainer(cfg, rt, train_loader=loader, val_loader=loader)
    trainer.log.enabled = False
    if rt.device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        loss, _, _ = trainer.train_step(step)
        loss.item()  # the trainer syncs once per step for its log line; so does the benchmark
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    tok_s = cfg.total_batch_tokens / dt
    fpt = trainer.model.flops_per_token(cfg.seq_len)
    mem = (torch.cuda.max_memory_allocated() / 2**30 if rt.device_type == "cuda"
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    name = torch.cuda.get_device_name(device) if rt.device_type == "cuda" else f"CPU x {torch.get_num_threads()} threads"
    print(f"device        {name}")
    print(f"model         {cfg.preset}: {trainer.model.num_params() / 1e6:.1f}M params, B={cfg.micro_batch} T={cfg.seq_len} "
          f"x{args.grad_accum} accum, compile {'on' if trainer.use_compile else 'off'}, dtype {cfg.dtype}")
    print(f"FLOPs/token   {fpt / 1e9:.3f} GFLOP (6N + 12*L*d*T)")
    print(f"matmul peak   {peak / 1e12:.2f} TFLOP/s ({peak_dtype}, measured)")
    print(f"step          {dt * 1000:.1f} ms median of {args.steps} (min {min(times) * 1000:.1f}, max {max(times) * 1000:.1f})")
    print(f"throughput    {tok_s:,.0f} tok/s")
    print(f"MFU           {100 * fpt * tok_s / peak:.1f}% of measured {peak_dtype} peak")
    print(f"peak memory   {mem:.2f} GiB ({'CUDA allocated' if rt.device_type == 'cuda' else 'process max RSS'})")


if __name__ == "__main__":
    main()
