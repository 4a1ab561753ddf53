#!/usr/bin/env python
"""Peak memory of one training step of a preset, on any machine and without the memory: the trainer's model and
AdamW run one step (forward, backward, optimizer) on fake tensors under torch's MemTracker, which adds up the
live tensors by kind.

    python scripts/estimate_memory.py --preset gpt2-xl                 # the preset's own micro-batch
    python scripts/estimate_memory.py --preset gpt2 --micro-batch 64 --set ce_chunk_tokens=0 --json est.json  # full logits

It counts the eager step: every activation autograd keeps, every temporary the ops make. With full logits
(`--set ce_chunk_tokens=0`) torch.compile fuses many of those away, so the trainer's compiled step needs less than
this figure: an upper bound. With the default chunked loss it is an estimate, not a bound (Inductor keeps buffers of
the chunk loop that the eager loop frees). docs/BENCHMARKS.md has both beside what the GPU measured. The larger
presets' default micro-batches are chosen from the full-logits figures, which stay above the chunked step's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from job.config import TrainConfig, from_dict, parse_settings, validate  # noqa: E402
from job.errors import ArgumentParser, check_output_path, cli_main, int_arg  # noqa: E402
from job.recipes.gpt2 import residual_dtype  # noqa: E402

KINDS = ("Parameter", "Gradient", "Optstate", "Activation", "Temp", "Buffer", "Other")


def step_peak_tracker():
    """A MemTracker keeping only the step's peak over all live tensors. MemTracker also keeps each module's own peak:
    it walks every module on each op, which is most of the time of an estimate for a deep model, for figures this
    script never reads. The same bookkeeping as MemTracker's own last loop (torch's _tools.mem_tracker). Imported
    here, not at the top: torch's tools bring Inductor and Dynamo (seconds), which a mistake in the arguments need
    not wait for."""
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker

    class StepPeak(MemTracker):
        def _update_peak_stats(self, peak_state) -> None:
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap[_TOTAL_KEY]:
                    self._peak_mem[dev] = snap[_TOTAL_KEY]
                    self._peak_mem_snap[dev] = dict(snap)

    return StepPeak()


def estimate(cfg: TrainConfig) -> dict[str, int]:
    """Bytes at the step's peak, by kind (MemTracker's categories) and "Total"."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from job.model import GPT
    from job.optim import configure_optimizer

    B, T = cfg.micro_batch, cfg.seq_len
    dtype = torch.float32 if cfg.dtype == "float32" else torch.bfloat16  # "auto" is bf16 on a GPU
    with FakeTensorMode():
        model = GPT(cfg.model_config())
        model.ce_chunk_tokens = cfg.hp.ce_chunk_tokens
        model.residual_dtype = residual_dtype(cfg, dtype if dtype == torch.bfloat16 else None, "cuda")
        opt = configure_optimizer(model, cfg.hp.weight_decay, cfg.hp.max_lr, (cfg.hp.beta1, cfg.hp.beta2), cfg.hp.eps, "cpu", fused=False)
        # AdamW makes its moments at its first step: make them first, so the tracked step is a steady-state one.
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
        x = torch.randint(0, cfg.vocab_size, (B, T))
        y = torch.randint(0, cfg.vocab_size, (B, T))
        tracker = step_peak_tracker()
        tracker.track_external(model, opt, x, y)
        with tracker:
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                _, loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        (snap,) = tracker.get_tracker_snapshot("peak").values()
    out = {str(getattr(k, "value", k)): v for k, v in snap.items()}
    return {k: out.get(k, 0) for k in (*KINDS, "Total")}


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2")
    p.add_argument("--micro-batch", type=int_arg(1), help="B (default: the preset's)")
    p.add_argument("--seq-len", type=int_arg(1), help="T (default: the preset's)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="TrainConfig field, e.g. ce_chunk_tokens=8192 or residual_dtype=float32")
    p.add_argument("--json", help="also write the figures (bytes) here")
    args = p.parse_args(argv)
    if args.json:
        check_output_path(args.json, "--json")
    values = {"preset": args.preset, "micro_batch": args.micro_batch, "seq_len": args.seq_len, "dtype": args.dtype,
              **parse_settings(args.set, "--set")}
    cfg = validate(from_dict({k: v for k, v in values.items() if v is not None}))
    est = estimate(cfg)
    import torch

    gib = {k: v / 2**30 for k, v in est.items()}
    print(f"{cfg.preset}: micro-batch {cfg.micro_batch} x seq-len {cfg.seq_len}, {'float32' if cfg.dtype == 'float32' else 'bfloat16'}"
          + (f", loss in chunks of {cfg.hp.ce_chunk_tokens}" if cfg.hp.ce_chunk_tokens else "")
          + (", residual bfloat16" if residual_dtype(cfg, None if cfg.dtype == "float32" else torch.bfloat16, "cuda") else ""))
    compiled = "a compiled step can need ~15 % more" if cfg.hp.ce_chunk_tokens else "torch.compile needs less"
    print(f"peak of one eager training step (fake tensors; {compiled}): "
          + ", ".join(f"{k.lower()} {v:.2f}" for k, v in gib.items() if v >= 0.005 and k != "Total") + f" GiB; total {gib['Total']:.2f} GiB")
    if args.json:
        Path(args.json).write_text(json.dumps({"preset": cfg.preset, "micro_batch": cfg.micro_batch, "seq_len": cfg.seq_len,
                                               "bytes": est}, indent=1))


if __name__ == "__main__":
    main()
