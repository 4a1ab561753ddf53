#!/usr/bin/env python
"""One table over several bench_train.py JSON files: every run's speed against the first file's (a).

    python scripts/bench_summary.py bench-out/main.json bench-out/candidates.json bench-out/tuned.json

gpu_bench.sh runs each stage in its own process, so each stage measures its own matmul peak and its MFU moves
with that peak (it varied 755-787 TFLOP/s between runs on one H200); tok/s does not, so the runs are compared
on tok/s. The last lines name the fastest run whose losses matched the plain baseline and the settings it ran
with (the stage's --set plus the variant's): what would have to become the trainer's default. A missing file (a
stage that timed out or crashed before writing) is listed as such, not an error; no readable file at all is.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from job.errors import ArgumentParser, UserError, cli_main  # noqa: E402

LABELS = {"a": "(a) trainer", "real": "(a) real data", "b": "(b) plain eager"}
# A candidate must beat the trainer's step by this much to be worth confirming: run-to-run spread on one GPU was
# 0.01-1 % (docs/BENCHMARKS.md), so less is noise.
MIN_GAIN = 0.01


def load(path: Path) -> dict | None:
    try:
        res = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not a bench_train.py JSON ({type(e).__name__}): pass the files its --json wrote") from None
    if not isinstance(res, dict) or not isinstance(res.get("runs"), dict):
        raise UserError(f"{path} is not a bench_train.py JSON (no runs in it): pass the files its --json wrote")
    return res


def rows(stage: str, res: dict) -> list[dict]:
    """A row per run of one file: what it ran (the stage's --set plus the variant's settings) and its figures."""
    out = []
    base = res.get("set", {})
    for name, r in res.get("runs", {}).items():
        settings = {**base, **r.get("settings", {})} if name != "b" else {}
        num = res.get("numerics", {}).get(name)
        out.append({"stage": stage, "run": name, "label": LABELS.get(name, f"(a) {name}"), "settings": settings,
                    "tok_s": r.get("tok_s"), "ms": r.get("ms_per_step"), "mfu": r.get("mfu"), "mem": r.get("peak_mem_gib"),
                    "error": r.get("error"), "numerics": num})
    return out


def row_line(r: dict, ref: dict | None) -> str:
    if r["error"] or not r["tok_s"]:
        return f"{r['stage']:<12} {r['label']:<24} failed: {r['error'] or 'no timing'}"
    vs = f"{r['tok_s'] / ref['tok_s'] - 1:+.1%}" if ref else "-"
    num = r["numerics"]
    check = f"{num['max_rel_diff']:.1e} {'ok' if num['ok'] else 'FAIL'}" if num else "-"
    what = ", ".join(f"{k}={v}" for k, v in r["settings"].items())
    return (f"{r['stage']:<12} {r['label']:<24} {r['ms']:>9.1f} {r['tok_s']:>11,.0f} {vs:>8} {r['mfu']:>6.1%} {r['mem']:>9.1f}  "
            f"{check}{'  ' + what if what else ''}")


def collect(paths: list[Path]) -> tuple[list, list[dict], dict | None]:
    """(stage, JSON or None) per file, every run's row, and the first file's (a) row (the reference)."""
    loaded = [(p.stem, load(p)) for p in paths]
    if not any(res for _, res in loaded):
        raise UserError(f"none of {', '.join(map(str, paths))} exists: run scripts/bench_train.py --json FILE (or gpu_bench.sh) first")
    table = [row for stage, res in loaded if res for row in rows(stage, res)]
    ref = next((r for r in table if r["stage"] == loaded[0][0] and r["run"] == "a" and r["tok_s"]), None)
    return loaded, table, ref


def fastest(table: list[dict]) -> dict | None:
    # Only runs of the trainer's step whose losses were checked and held are candidates for a new default.
    fair = [r for r in table if r["run"] not in ("b", "real") and r["tok_s"] and not r["error"] and r["numerics"] and r["numerics"]["ok"]]
    return max(fair, key=lambda r: r["tok_s"]) if fair else None


def winner_sets(paths: list[Path]) -> list[str]:
    """`--set key=value` arguments of the fastest run if it beats the reference by MIN_GAIN (else none): what
    gpu_bench.sh's confirm stage measures again beside the plain baseline, in one process."""
    _, table, ref = collect(paths)
    best = fastest(table)
    if not (best and ref) or best is ref or best["tok_s"] < ref["tok_s"] * (1 + MIN_GAIN):
        return []
    return [arg for k, v in best["settings"].items() for arg in ("--set", f"{k}={v}")]


def summarize(paths: list[Path]) -> list[str]:
    loaded, table, ref = collect(paths)
    first = next(res for _, res in loaded if res)
    lines = [f"summary: {first.get('preset')} on {first.get('device')}, torch {first.get('torch')}, {first.get('dtype')}; "
             + (f"tok/s against {ref['stage']}'s (a) {ref['tok_s']:,.0f}" if ref else "no (a) in the first file to compare with")
             + " (MFU: of each stage's own measured matmul peak)",
             f"{'stage':<12} {'run':<24} {'ms/step':>9} {'tok/s':>11} {'vs (a)':>8} {'MFU':>6} {'peak GiB':>9}  numerics / settings"]
    for stage, res in loaded:
        if res is None:
            lines.append(f"{stage:<12} no results ({stage}.json is missing: the stage failed, timed out or was skipped)")
        else:
            lines += [row_line(r, ref) for r in table if r["stage"] == stage]
    best = fastest(table)
    if best:
        lines.append(f"fastest with numerics ok: {best['stage']} {best['label']}, {best['tok_s']:,.0f} tok/s"
                     + (f" ({best['tok_s'] / ref['tok_s'] - 1:+.1%} vs (a))" if ref else ""))
        lines.append("its settings over the preset: " + (", ".join(f"{k}={v}" for k, v in best["settings"].items()) or "none"))
    return lines


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="+", type=Path, help="bench_train.py --json files; the first file's (a) is the reference")
    p.add_argument("--winner-sets", action="store_true",
                   help=f"print only the fastest run's settings as --set arguments, if it beats the reference by {MIN_GAIN * 100:.0f}%%")
    args = p.parse_args(argv)
    print(" ".join(winner_sets(args.json)) if args.winner_sets else "\n".join(summarize(args.json)))


if __name__ == "__main__":
    main()
