#!/usr/bin/env python
"""The output layer and its loss alone, forward and backward: the full-logits loss beside the fused, chunked one.

    python scripts/bench_loss.py                                   # on a GPU: 64 x 1024 rows, 768 -> 50304, bf16
    python scripts/bench_loss.py --device cpu --rows 2048 --dim 64  # the same comparison on a CPU, smaller

For each --chunks entry (0: `lm_head` then F.cross_entropy over the full logits, as build-nanogpt; N: the model's
chunked_cross_entropy, N rows at a time, whose gradient is made in the forward pass), compiled as the trainer
compiles it: ms per forward + backward (median of --steps after --warmup), the time of the loss kernels alone
and of the matmuls (from the profiler), peak memory on a GPU, and the loss kernels' time as passes over the bf16
logits at this device's measured copy bandwidth. The loss is memory-bound, so passes are what it costs: one read
for the log-sum-exp, one read and one write for the gradient is the least a loss of this form can do (3 passes;
docs/BENCHMARKS.md has what the trainer's loss kernels take).
Losses and gradients are checked against the first entry's.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import kernel_category, profile_kernels, sync, timed_steps  # noqa: E402

from job.errors import ArgumentParser, UserError, check_output_path, cli_main, int_arg  # noqa: E402
from job.model import PADDED_VOCAB, chunked_cross_entropy  # noqa: E402
from job.runtime import pick_device  # noqa: E402


def copy_bandwidth(device: str, nbytes: int) -> float:
    """Bytes moved per second (read + write) by a device-to-device copy of nbytes: the memory speed to count
    passes against."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(8):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times)


def loss_fn(chunk: int, dtype: torch.dtype, device_type: str):
    def f(h, w, t):
        with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
            if chunk:
                return chunked_cross_entropy(h, w, t, chunk)
            return F.cross_entropy(F.linear(h, w), t)
    return f


def measure(chunk: int, h, w, t, args, device: str) -> dict:
    dtype = getattr(torch, args.dtype)
    fn = loss_fn(chunk, dtype, device.split(":")[0])
    if args.compile == "on":
        torch._dynamo.reset()
        fn = torch.compile(fn)

    def step(_i: int) -> float:
        h.grad = w.grad = None
        loss = fn(h, w, t)
        loss.backward()
        return loss.item()

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times, losses = timed_steps(step, args.warmup, args.steps, device)
    res = {"chunk": chunk, "ms": 1000 * statistics.median(times), "loss": losses[-1],
           "grad_h": h.grad.detach().clone(), "grad_w": w.grad.detach().clone()}
    if device.startswith("cuda"):
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    res.update(profile(step, device))
    return res


def profile(step, device: str) -> dict:
    """Kernel time (GPU) or operator self time (CPU) per step, by category: the loss's own kernels and the matmuls."""
    n = 2
    cats: dict[str, float] = {}
    loss_kernels = []
    for name, (us, calls) in profile_kernels(step, device, n).items():
        cat = kernel_category(name)  # Inductor names its kernels after the ops fused: log_softmax, logsumexp, ...
        cats[cat] = cats.get(cat, 0.0) + us / 1000 / n
        if cat == "loss":
            loss_kernels.append({"name": name, "ms": us / 1000 / n, "calls": calls / n})
    # Which kernels the loss became, and how long each took: e.g. whether the log-sum-exp is one online pass.
    loss_kernels.sort(key=lambda k: -k["ms"])
    return {"loss_ms": cats.get("loss", 0.0), "matmul_ms": cats.get("matmul", 0.0),
            "other_ms": sum(v for k, v in cats.items() if k not in ("loss", "matmul")), "loss_kernels": loss_kernels}


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu", "mps"))
    p.add_argument("--rows", type=int_arg(1), default=None, help="B x T rows of one micro-step (default 65536 on a GPU, 2048 on a CPU)")
    p.add_argument("--dim", type=int_arg(1), default=None, help="hidden size (default 768 on a GPU, 64 on a CPU)")
    p.add_argument("--vocab", type=int_arg(1), default=PADDED_VOCAB)
    p.add_argument("--chunks", default="0,8192,65536", help="comma-separated ce_chunk_tokens values; 0 is the full-logits loss")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--compile", default="on", choices=("on", "off"))
    p.add_argument("--steps", type=int_arg(1), default=10)
    p.add_argument("--warmup", type=int_arg(0), default=3)
    p.add_argument("--json", help="write the figures here too")
    args = p.parse_args(argv)
    try:
        chunks = [int(c) for c in args.chunks.split(",")]
    except ValueError:
        raise UserError(f"--chunks {args.chunks!r}: expected comma-separated whole numbers, e.g. 0,8192,65536") from None
    if not chunks or any(c < 0 for c in chunks):
        raise UserError(f"--chunks {args.chunks!r}: chunk sizes are 0 (full logits) or a positive number of rows")
    if args.json:
        check_output_path(args.json, "--json")  # now, not after the whole benchmark
    device = str(pick_device(args.device))
    if device == "cpu":
        # Inductor's CPU kernels are invisible to the profiler unless each is wrapped in a named range. (Imported here,
        # once the arguments are read: Inductor's config brings in Dynamo, a second of start-up.)
        import torch._inductor.config

        torch._inductor.config.cpp.enable_kernel_profile = True
    gpu = not device.startswith("cpu")
    rows = args.rows or (65536 if gpu else 2048)
    dim = args.dim or (768 if gpu else 64)

    g = torch.Generator().manual_seed(0)
    h = torch.randn(rows, dim, generator=g).to(device).requires_grad_()
    w = (0.02 * torch.randn(args.vocab, dim, generator=g)).to(device).requires_grad_()
    t = torch.randint(0, args.vocab, (rows,), generator=g).to(device)
    logits_bytes = rows * args.vocab * (2 if args.dtype == "bfloat16" else 4)
    bw = copy_bandwidth(device, min(logits_bytes, 2 << 30))
    print(f"device {device} | {rows} rows x {dim} -> {args.vocab}, {args.dtype}, compile {args.compile} | "
          f"logits {logits_bytes / 2**30:.2f} GiB | copy bandwidth {bw / 1e9:,.0f} GB/s (read + write)", flush=True)

    results = []
    for c in chunks:
        r = measure(c, h, w, t, args, device)
        r["loss_passes"] = r["loss_ms"] / 1000 * bw / logits_bytes
        results.append(r)
        print(f"# chunk {c} done: {r['ms']:.2f} ms", flush=True)
    ref = results[0]
    for r in results:
        r["rel_loss"] = abs(r["loss"] - ref["loss"]) / abs(ref["loss"])
        r["rel_grad_h"] = ((r["grad_h"] - ref["grad_h"]).norm() / ref["grad_h"].norm()).item()
        r["rel_grad_w"] = ((r["grad_w"] - ref["grad_w"]).norm() / ref["grad_w"].norm()).item()
    for r in results:
        del r["grad_h"], r["grad_w"]
    print(f"{'loss':<16}{'ms/fwd+bwd':>11}{'loss kern':>11}{'passes':>8}{'matmul':>9}{'other':>8}{'mem GiB':>9}  vs first")
    for r in results:
        name = "full logits" if r["chunk"] == 0 else f"chunks of {r['chunk']}"
        mem = f"{r['peak_mem_gib']:.2f}" if "peak_mem_gib" in r else "-"
        print(f"{name:<16}{r['ms']:>11.2f}{r['loss_ms']:>11.2f}{r['loss_passes']:>8.1f}{r['matmul_ms']:>9.2f}{r['other_ms']:>8.2f}"
              f"{mem:>9}  loss {r['rel_loss']:.1e}, grads {r['rel_grad_h']:.1e} / {r['rel_grad_w']:.1e}")
    for r in results:
        name = "full logits" if r["chunk"] == 0 else f"chunks of {r['chunk']}"
        for k in r["loss_kernels"][:4]:
            print(f"  {name}: {k['ms']:8.2f} ms in {k['calls']:g} calls  {k['name'][:110]}")
    if args.json:
        out = {"device": device, "rows": rows, "dim": dim, "vocab": args.vocab, "dtype": args.dtype, "compile": args.compile,
               "copy_bandwidth": bw, "logits_bytes": logits_bytes, "runs": results, "torch": torch.__version__}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
