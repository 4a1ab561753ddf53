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
import dataclasses
import json
import platform
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib, also when imported by path (tests)

import benchlib as lib  # noqa: E402
from benchlib import HELLASWAG_EXAMPLES, PROFILE_TOP_PRINTED  # noqa: E402

from job.config import TrainConfig, from_dict, parse_settings, validate  # noqa: E402
from job.errors import ArgumentParser, UserError, check_output_path, cli_main, int_arg  # noqa: E402
from job.metrics import peak_flops  # noqa: E402
from job.model import GPT  # noqa: E402
from job.runtime import autocast_ctx, pick_device  # noqa: E402

RUNS = ("a", "real", "eval", "ckpt", "b")

def parse_variant(text: str) -> tuple[str, dict]:
    """NAME:key=value,key=value -> (NAME, {key: typed value}); keys are TrainConfig fields, or ddp=0/1."""
    name, _, spec = text.partition(":")
    if not name or not spec:
        raise UserError(f"--variant {text!r}: expected NAME:key=value[,key=value...], e.g. ce:ce_chunk_tokens=8192")
    return name, parse_settings(spec.split(","), f"--variant {name}", extra=("ddp",))


def base_config(args) -> TrainConfig:
    sets = parse_settings(args.set, "--set", extra=("ddp",))
    overrides = {k: v for k, v in dict(preset=args.preset, micro_batch=args.micro_batch, seq_len=args.seq_len).items() if v}
    if "recipe" in sets:  # a recipe brings its own presets (--set recipe=speedrun --preset tiny: its tiny size)
        overrides["recipe"] = sets["recipe"]
    cfg = from_dict(overrides)
    cfg.device, cfg.compile, cfg.dtype = args.device, args.compile, args.dtype
    cfg.total_batch_tokens = cfg.micro_batch * cfg.seq_len * args.grad_accum
    cfg.hellaswag_every, cfg.resume = 0, "never"
    if "ddp" in sets:  # the same vocabulary as --variant, so bench_summary.py --winner-sets can name any winner
        args.ddp = "on" if sets["ddp"] else "off"
    cfg = cfg.replace(**{k: v for k, v in sets.items() if k != "ddp"})
    if args.quick:
        cfg.val_steps, cfg.sample_tokens = 2, 4
    return validate(cfg)


def variant_config(base: TrainConfig, settings: dict) -> TrainConfig:
    # The same tokens per step: comparable losses, fair tok/s.
    cfg = base.replace(**{k: v for k, v in settings.items() if k != "ddp"}, total_batch_tokens=base.total_batch_tokens)
    return validate(cfg)


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


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
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
    p.add_argument("--log", action="store_true", help="each timed step also logs as the trainer's log step does: its line, "
                   "metrics.jsonl and the dashboards' writers (compare --set tensorboard=off with a variant tensorboard=on)")
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
    return args, runs


def describe_setup(cfg: TrainConfig, rt, args, dtype: str, gemm: int, peak: float, peak_dtype: str) -> dict:
    """The results' header: the device, the model and its FLOPs per token, the measured matmul peak."""
    probe = GPT(cfg.model_config())
    fpt = probe.flops_per_token(cfg.seq_len)
    n_params = probe.num_params() - probe.transformer.wpe.weight.numel()
    mc = cfg.model_config()
    name = torch.cuda.get_device_name(rt.device) if rt.device_type == "cuda" else f"CPU {platform.machine()} x {torch.get_num_threads()} threads"
    return {"device": name, "torch": torch.__version__, "dtype": dtype, "preset": cfg.preset, "params": n_params, "T": cfg.seq_len,
            "B": cfg.micro_batch, "tokens_per_step": cfg.total_batch_tokens, "peak_flops": peak, "peak_dtype": peak_dtype, "gemm_size": gemm,
            "nominal_peak": peak_flops(name) if rt.device_type == "cuda" else None,
            "flops": {"per_token": fpt, "N": n_params, "6N": 6 * n_params, "attention": 12 * mc.n_layer * mc.n_embd * cfg.seq_len},
            "steps": args.steps, "warmup": args.warmup, "seed": cfg.seed, "set": parse_settings(args.set, "--set", extra=("ddp",)), "runs": {}}


def trainer_parts(res: dict, runs: list[str], cfg: TrainConfig, rt, args) -> None:
    """(a) and what reuses its warm trainer: eval, ckpt, real. Every part is guarded: a setting that breaks on this
    torch (a compile, a kernel) costs its own figures only."""
    fpt, peak = res["flops"]["per_token"], res["peak_flops"]
    trainer = None
    try:
        res["runs"]["a"], trainer = lib.run_trainer("a", cfg, rt, args, fpt, peak, keep=True)
    except Exception as e:
        res["runs"]["a"] = {"name": "a", "error": lib.failure(e)}
        print(f"# (a) failed: {res['runs']['a']['error']}", flush=True)
    if trainer is not None and "eval" in runs:
        res["eval"] = lib.guarded("eval", lib.run_eval, trainer, cfg, rt, args, res["runs"]["a"])
    if trainer is not None and "ckpt" in runs:
        res["ckpt"] = lib.guarded("checkpoint", lib.run_ckpt, trainer, rt, args)
    if trainer is not None and "real" in runs:
        res["runs"]["real"] = lib.guarded("real data", lib.run_real, trainer, cfg, rt, args, fpt, peak)
        if "tok_s" in res["runs"]["real"]:
            res["real_vs_synthetic"] = res["runs"]["real"]["tok_s"] / res["runs"]["a"]["tok_s"] - 1
    if "a" not in runs:
        del res["runs"]["a"]


def variant_runs(res: dict, variants: list, rt, args) -> None:
    for vname, settings, vcfg in variants:
        vrt = dataclasses.replace(rt, ddp=bool(settings.get("ddp", args.ddp == "on")))
        try:
            res["runs"][vname], _ = lib.run_trainer(vname, vcfg, vrt, args, res["flops"]["per_token"], res["peak_flops"])
        except Exception as e:  # one failed variant (e.g. a compile mode that breaks) must not lose the others
            res["runs"][vname] = {"name": vname, "error": lib.failure(e)}
            print(f"# ({vname}) failed: {res['runs'][vname]['error']}", flush=True)
        res["runs"][vname]["settings"] = settings
        lib.reset_compiled()


def take_higher_peak(res: dict, after: float) -> None:
    """The peak again, after the runs: MFU is taken against the higher of the two, so a card that was slow to clock
    up (or throttled by the end) cannot flatter it. Both are reported."""
    res["peak_flops_measured"] = [res["peak_flops"], after]
    if after > res["peak_flops"]:
        res["peak_flops"] = after
        for r in res["runs"].values():
            if "tok_s" in r:
                r["mfu"] = res["flops"]["per_token"] * r["tok_s"] / after


def failed_parts(res: dict) -> list[str]:
    failed = [name for name, r in res["runs"].items() if "error" in r or "error" in r.get("profile", {})]
    failed += [part for part in ("eval", "ckpt") if "error" in res.get(part, {})]
    return failed + [f"numerics of {name}" for name, n in res["numerics"].items() if not n["ok"]]


@cli_main
def main(argv: list[str] | None = None) -> None:
    args, runs = parse_args(argv)
    cfg = base_config(args)
    variants = [(name, settings, variant_config(cfg, settings)) for name, settings in map(parse_variant, args.variant)]
    rt = lib.runtime(pick_device(cfg.device), args.ddp == "on" or any(v.get("ddp") for _, v, _ in variants))
    rt_a, rt_plain = dataclasses.replace(rt, ddp=args.ddp == "on"), dataclasses.replace(rt, ddp=False)
    dtype = str(autocast_ctx(cfg, rt)[1] or torch.float32).replace("torch.", "")
    gemm = args.gemm_size or (8192 if rt.device_type == "cuda" else (512 if args.quick else 1024))
    res = describe_setup(cfg, rt, args, dtype, gemm, *lib.matmul_peak(rt.device, gemm))
    print(f"# {res['device']}: {cfg.preset} B={cfg.micro_batch} T={cfg.seq_len} x{args.grad_accum} accum, {dtype}; runs "
          f"{','.join(runs)}" + (f" + variants {','.join(n for n, _, _ in variants)}" if variants else ""), flush=True)
    if any(r in runs for r in ("a", "real", "eval", "ckpt")):
        trainer_parts(res, runs, cfg, rt_a, args)
    lib.reset_compiled()
    variant_runs(res, variants, rt, args)
    reference = None
    if "b" in runs:
        res["runs"]["b"] = lib.run_plain(cfg, rt_plain, args, res["flops"]["per_token"], res["peak_flops"])
        reference = res["runs"]["b"]["losses"]
        if "tok_s" in res["runs"].get("a", {}):
            res["ratio_a_b"] = res["runs"]["a"]["tok_s"] / res["runs"]["b"]["tok_s"]
    elif args.compare_json:
        reference = lib.earlier_baseline(args.compare_json, res)
    take_higher_peak(res, lib.matmul_peak(rt.device, gemm)[0])
    res["numerics"] = lib.numerics(res["runs"], reference, dtype)
    print_report(res)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1, default=str) + "\n")
    if dist.is_initialized():
        dist.destroy_process_group()
    failed = failed_parts(res)
    if failed:
        raise UserError(f"failed: {', '.join(failed)} (every other figure is above" + (f" and in {args.json})" if args.json else ")"))


if __name__ == "__main__":
    main()
