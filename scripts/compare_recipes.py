#!/usr/bin/env python
"""The three recipes' tiny sizes side by side: the same training tokens of the bundled corpus, the same validation
tokens, each run in a process of its own through the real entry point (python -m job.train).

    python scripts/compare_recipes.py                                  # about 100,000 tokens each, on the CPU
    python scripts/compare_recipes.py --tokens 50000 --json cmp.json
    python scripts/compare_recipes.py --extra gpt2="--n-layer 2" --extra speedrun="--n-embd 32"

Each recipe trains its `tiny` preset for as many steps as come closest to --tokens: steps x tokens per step for a
fixed batch; for a staged batch (the speedrun's) the --scheduled-steps / --extension-steps whose train_tokens (the
card's) is closest, ties going to the split nearest the preset's. Every run evaluates on the first --val-tokens
tokens of the val shard, through its own flags (--val-steps for the gpt2 recipe, --val-tokens for the speedruns), about
--evals times; the table gives the validation loss at equal token counts (a quarter, a half and three quarters of the
fewest tokens any run trained), each interpolated linearly in tokens between the run's two evaluations around it, and
every run's final one at its own exact tokens. Wall time is the trainer's process from start to exit; tok/s is the
trained tokens over the summed step times (no evaluation, start-up or checkpoint in it). Then `python -m job.sample`
draws samples from each final checkpoint with a fixed seed and prompt.

Logs go under --out: OUT/data (the bundled corpus, prepared as `make demo-data` prepares it, unless --data-dir names
shards), OUT/RECIPE (the run's log dir: train.log, metrics.jsonl, its checkpoint; console.txt, samples.txt).
"""

from __future__ import annotations

import json
import math
import platform
import re
import shlex
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from job import contract, recipes  # noqa: E402
from job.config import parse_args  # noqa: E402
from job.errors import ArgumentParser, UserError, check_output_path, cli_main, int_arg  # noqa: E402

RECIPES = ("gpt2", "speedrun", "speedrun-2025-05-24")
MARKS = (0.25, 0.5, 0.75)  # fractions of the fewest tokens any run trained
# Whose attention stops at document boundaries (the speedruns mask each document; gpt2 attends across them).
WITHIN_DOCUMENTS = {"speedrun", "speedrun-2025-05-24"}
CORPUS = ROOT / "job" / "assets" / "tinyshakespeare.txt"


# --- the plan: each recipe's flags --------------------------------------------------------------------
def recipe_config(recipe: str, extra: list[str], more: list[str] = ()):
    """The trainer's config for `recipe`'s tiny preset with `extra` flags, as the trainer's own parser reads it."""
    try:
        return parse_args(["--recipe", recipe, "--preset", "tiny", *extra, *more], files=False)
    except UserError as e:
        raise UserError(f"the {recipe} run: {e}") from None


def staged_steps(cfg, tokens: int) -> tuple[dict, int]:
    """(--scheduled-steps / --extension-steps / --max-steps, the train tokens) of a staged recipe whose card's
    train_tokens is closest to `tokens`; among equally close splits, the one nearest the preset's ratio."""
    card = cfg.card
    ratio = cfg.hp.extension_steps / cfg.hp.scheduled_steps
    best = None
    scheduled = 3  # the fewest the three stages take (the recipe's check)
    while True:
        one = cfg.replace(scheduled_steps=scheduled, extension_steps=1, max_steps=scheduled + 1)
        first = card.train_tokens(one)
        extension = card.step_layout(scheduled, one).tokens  # every extension step has the last stage's layout
        guess = max(1, 1 + round((tokens - first) / extension))
        for ext in {max(1, guess - 1), guess, guess + 1}:
            got = first + (ext - 1) * extension
            key = (abs(got - tokens), abs(ext / scheduled - ratio), -scheduled)
            if best is None or key < best[0]:
                best = (key, scheduled, ext, got)
        if first > tokens:  # longer schedules only train more
            break
        scheduled += 1
    _, scheduled, ext, got = best
    return {"scheduled_steps": scheduled, "extension_steps": ext, "max_steps": scheduled + ext}, got


def fixed_steps(cfg, tokens: int) -> tuple[dict, int]:
    per_step = cfg.card.step_layout(0, cfg).tokens
    steps = max(1, round(tokens / per_step))
    return {"max_steps": steps}, cfg.card.train_tokens(cfg.replace(max_steps=steps))


def val_flags(cfg, val_tokens: int) -> dict:
    """The recipe's own flags for exactly `val_tokens` validation tokens from the start of the val shard."""
    seq = cfg.val_seq_len or cfg.seq_len
    batch = cfg.micro_batch * seq
    if val_tokens % batch:
        raise UserError(f"--val-tokens {val_tokens} is not a whole number of the {cfg.recipe} recipe's validation batches "
                        f"of {cfg.micro_batch} x {seq} = {batch} tokens: pick a multiple of {batch}")
    if cfg.val_tokens:  # the speedruns' fixed validation set
        return {"val_tokens": val_tokens}
    return {"val_steps": val_tokens // batch}


def flags(settings: dict) -> list[str]:
    return [a for k, v in settings.items() for a in ("--" + k.replace("_", "-"), str(v))]


def plan(recipe: str, args, extra: list[str], data_dir: Path) -> dict:
    cfg = recipe_config(recipe, extra)
    staged = cfg.card.staged(cfg) and {"scheduled_steps", "extension_steps"} <= set(vars(cfg.hp))
    steps, tokens = (staged_steps if staged else fixed_steps)(cfg, args.tokens)
    every = max(1, steps["max_steps"] // args.evals)
    run = {**steps, **val_flags(cfg, args.val_tokens), "eval_every": every, "log_every": 1, "sample_num": 0, "hellaswag_every": 0,
           "checkpoint_every": 0, "resume": "never", "tensorboard": "off", "device": args.device,
           "data_dir": data_dir, "log_dir": Path(args.out) / recipe}
    argv = ["--recipe", recipe, "--preset", "tiny", *extra, *flags(run)]
    final = recipe_config(recipe, extra, flags(run))  # the trainer's own checks, before any run starts
    return {"recipe": recipe, "argv": argv, "steps": steps, "train_tokens": tokens, "eval_every": every,
            "val_seq_len": final.val_seq_len or final.seq_len, "log_dir": Path(args.out) / recipe}


# --- running ------------------------------------------------------------------------------------------
def prepare_data(out: Path) -> Path:
    """The bundled corpus as `make demo-data` prepares it (one document per paragraph), into OUT/data once."""
    data = out / "data"
    if (data / "manifest.json").exists():
        return data
    cmd = [sys.executable, "-m", "job.prepare", "text", str(CORPUS), "--paragraphs", "--out", str(data), "--shard-size", "50000"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise UserError(f"preparing the bundled corpus failed: {last_line(proc.stderr)}")
    return data


def last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def events(log_dir: Path) -> list[dict]:
    path = log_dir / contract.METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train(p: dict) -> dict:
    """Run the recipe's training in a process of its own; its figures from metrics.jsonl."""
    log = p["log_dir"]
    log.mkdir(parents=True)
    print(f"{p['recipe']}: python -m job.train {shlex.join(p['argv'])}", flush=True)
    t0 = time.perf_counter()
    with open(log / "console.txt", "w") as console:
        proc = subprocess.run([sys.executable, "-m", "job.train", *p["argv"]], cwd=ROOT, stdout=console,
                              stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        return {"error": f"the trainer exited with status {proc.returncode}: {last_line((log / 'console.txt').read_text())}"}
    rows = events(log)
    steps = {e["step"]: e for e in rows if e["event"] == "train"}
    before, total = {}, 0  # tokens trained before each step
    for step in range(p["steps"]["max_steps"] + 1):
        before[step] = total
        total += steps[step]["tokens"] if step in steps else 0
    evals = [{"step": e["step"], "tokens": before[e["step"]], "loss": e["loss"]} for e in rows if e["event"] == "val"]
    train_s = sum(e["ms"] for e in steps.values()) / 1000
    return {"wall_s": wall, "train_s": train_s, "tok_s": total / train_s, "trained_tokens": total, "evals": evals,
            "final_val": evals[-1]["loss"], "final_train_loss": steps[max(steps)]["loss"]}


SAMPLE = re.compile(r"^sample (\d+): ", re.M)


def sample(p: dict, args) -> dict:
    cmd = [sys.executable, "-m", "job.sample", "--checkpoint", str(p["log_dir"]), "--num", str(args.samples), "--max-tokens",
           str(args.sample_tokens), "--prompt", args.prompt, "--seed", str(args.seed), "--device", args.device]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    (p["log_dir"] / "samples.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        return {"samples_error": last_line(proc.stderr)}
    parts = SAMPLE.split(proc.stdout)  # [header, "0", text, "1", text, ...]
    return {"samples": [text.rstrip("\n") for text in parts[2::2]]}


def at_tokens(evals: list[dict], tokens: int) -> float:
    """The validation loss at `tokens`, linear in tokens between the two evaluations around it."""
    for a, b in pairwise(evals):
        if a["tokens"] <= tokens <= b["tokens"]:
            if b["tokens"] == a["tokens"]:
                return b["loss"]
            t = (tokens - a["tokens"]) / (b["tokens"] - a["tokens"])
            return a["loss"] + t * (b["loss"] - a["loss"])
    return math.nan


# --- the report -----------------------------------------------------------------------------------------
def report(res: dict) -> None:
    marks = res["marks"]
    head = f"{'recipe':<21} {'tokens':>9} {'steps':>6} " + " ".join(f"{'val@' + format(m, ','):>12}" for m in marks)
    print()
    print(head + f" {'final val':>10} {'wall s':>8} {'train s':>8} {'tok/s':>8}")
    for name, r in res["runs"].items():
        if "error" in r:
            print(f"{name:<21} failed: {r['error']}")
            continue
        cells = " ".join(f"{v:>12.4f}" for v in r["at_marks"])
        print(f"{name:<21} {r['trained_tokens']:>9,} {r['steps']['max_steps']:>6} {cells} {r['final_val']:>10.4f} "
              f"{r['wall_s']:>8.1f} {r['train_s']:>8.1f} {r['tok_s']:>8,.0f}")
    print()
    print(f"validation: the first {res['val_tokens']:,} tokens of the val shard for every recipe, in sequences of "
          + ", ".join(f"{r['val_seq_len']} ({n}{', within each document' if n in WITHIN_DOCUMENTS else ', across documents'})"
                      for n, r in res["runs"].items()))
    print("val@N: interpolated linearly in tokens between the run's two evaluations around N; final val: at the run's own "
          "tokens; tok/s: the trained tokens over the summed step times")
    for name, r in res["runs"].items():
        steps = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in r["steps"].items())
        print(f"{name}: {steps}, {r['train_tokens']:,} tokens, evaluated every {r['eval_every']} steps")
    print(f"\nsamples (python -m job.sample --num {res['samples']} --max-tokens {res['sample_tokens']} --seed {res['seed']} "
          f"--prompt {res['prompt']!r}):")
    for name, r in res["runs"].items():
        if "samples_error" in r:
            print(f"{name}: sampling failed: {r['samples_error']}")
        for i, text in enumerate(r.get("samples", [])):
            print(f"{name} {i}: {text!r}")


def parse_extra(items: list[str], names: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {n: [] for n in names}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or name not in recipes.names():
            raise UserError(f"--extra {item!r}: expected RECIPE=FLAGS with RECIPE one of {', '.join(RECIPES)}, "
                            f"e.g. --extra gpt2=\"--n-layer 2\"")
        try:
            out.setdefault(name, []).extend(shlex.split(text))
        except ValueError as e:
            raise UserError(f"--extra {item!r}: {e}: quote the flags as a shell would") from None
    return out


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="scripts/compare_recipes.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int_arg(1), default=100_000, help="training tokens per recipe (closest each can train)")
    p.add_argument("--val-tokens", type=int_arg(1), default=8192, help="validation tokens: the first N of the val shard")
    p.add_argument("--evals", type=int_arg(1), default=8, help="evaluations per run, about (and one at the end)")
    p.add_argument("--out", default="bench-out/compare_recipes", help="the runs' log dirs and the prepared corpus go here")
    p.add_argument("--data-dir", help="shards to train on (default: the bundled corpus, prepared into OUT/data)")
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipes to compare")
    p.add_argument("--extra", action="append", default=[], metavar="RECIPE=FLAGS",
                   help="more trainer flags for one recipe (e.g. a narrower model), repeatable")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps", "auto"))
    p.add_argument("--samples", type=int_arg(1), default=2, help="samples per recipe")
    p.add_argument("--sample-tokens", type=int_arg(1), default=32)
    p.add_argument("--prompt", default="ROMEO:")
    p.add_argument("--seed", type=int_arg(0), default=42)
    p.add_argument("--json", help="write the table's figures here too")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    unknown = [n for n in names if n not in recipes.names()]
    if unknown or not names:
        raise UserError(f"--recipes {args.recipes!r}: choose from {', '.join(recipes.names())}")
    extra = parse_extra(args.extra, names)
    out = Path(args.out)
    check_output_path(out, "--out", directory=True)
    if args.json:
        check_output_path(args.json, "--json")
    taken = [n for n in names if (out / n).exists()]
    if taken:
        raise UserError(f"--out {out} already holds a run of {', '.join(taken)}: choose another --out, or remove "
                        f"{out / taken[0]}")
    if args.data_dir and not Path(args.data_dir).is_dir():
        raise UserError(f"--data-dir {args.data_dir} is not a directory: leave it out to use the bundled corpus")
    data_dir = Path(args.data_dir) if args.data_dir else out / "data"
    plans = [plan(n, args, extra[n], data_dir) for n in names]  # every plan before any run
    if not args.data_dir:
        prepare_data(out)

    code = commit()  # the code that runs, before anything can change it
    runs = {}
    for pl in plans:
        r = {"argv": pl["argv"], "steps": pl["steps"], "train_tokens": pl["train_tokens"], "eval_every": pl["eval_every"],
             "val_seq_len": pl["val_seq_len"]}
        r.update(train(pl))
        if "error" not in r:
            r.update(sample(pl, args))
        runs[pl["recipe"]] = r
    done = [r for r in runs.values() if "error" not in r]
    fewest = min((r["trained_tokens"] for r in done), default=0)
    marks = [round(f * fewest) for f in MARKS]
    for r in done:
        r["at_marks"] = [at_tokens(r["evals"], m) for m in marks]
    import torch

    res = {"tokens": args.tokens, "val_tokens": args.val_tokens, "marks": marks, "samples": args.samples,
           "sample_tokens": args.sample_tokens, "prompt": args.prompt, "seed": args.seed, "device": args.device,
           "torch": torch.__version__, "machine": platform.processor() or platform.machine(), "commit": code,
           "runs": runs}
    report(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str) + "\n")
    if len(done) < len(runs):
        sys.exit(1)


def commit() -> str | None:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return proc.stdout.strip() or None


if __name__ == "__main__":
    main()
