"""torch.compile's first step cold against warm, for each recipe's tiny preset, through the real trainer.

For each recipe: `python -m job.train --recipe R --preset tiny --compile on --max-steps 1` twice (a recipe with batch
stages, the current speedrun's, runs its shortest schedule: 3 scheduled steps and 1 of extension), each in a log dir of
its own (as on two boxes) and both with one empty compile-cache root (NANOGPT_COMPILE_CACHE, standing in for the
persistent file system): the first compiles everything, the second should take every graph from the directory for its
key. Prints the first step's seconds (the trainer's `compile` event), the process's wall time and the ratios.

    python scripts/bench_compile_cache.py [--recipes gpt2,speedrun] [--device cpu] [--data DIR] [-- extra trainer flags]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from job import recipes  # noqa: E402
from job.config import parse_args  # noqa: E402
from job.errors import ArgumentParser, UserError, cli_main  # noqa: E402

CORPUS = ROOT / "job" / "assets" / "tinyshakespeare.txt"


def shortest(recipe: str) -> list[str]:
    """The fewest steps the recipe's tiny preset trains: one, or a staged recipe's shortest schedule."""
    hp = vars(parse_args(["--recipe", recipe, "--preset", "tiny"], files=False).hp)
    if {"scheduled_steps", "extension_steps"} <= set(hp):
        return ["--scheduled-steps", "3", "--extension-steps", "1", "--max-steps", "4"]
    return ["--max-steps", "1"]


def run(recipe: str, data: Path, log: Path, cache_root: Path, device: str, extra: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env.update(NANOGPT_COMPILE_CACHE=str(cache_root), PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable,
        "-m",
        "job.train",
        "--recipe",
        recipe,
        "--preset",
        "tiny",
        "--device",
        device,
        "--compile",
        "on",
        *shortest(recipe),
        "--eval-every",
        "0",
        "--sample-num",
        "0",
        "--hellaswag-every",
        "0",
        "--data-dir",
        str(data),
        "--log-dir",
        str(log),
        *extra,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode == 2:  # the trainer's own one-line refusal of these settings
        raise UserError(f"the trainer refused the {recipe} run: {proc.stderr.strip().splitlines()[-1].removeprefix('error: ')}")
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    rows = [json.loads(line) for line in (log / "metrics.jsonl").read_text().splitlines() if line.strip()]
    event = next(r for r in rows if r["event"] == "compile")
    return {"first_step_s": event["seconds"], "hits": event["cache_hits"], "misses": event["cache_misses"], "wall_s": wall}


@cli_main
def main() -> None:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default=",".join(recipes.names()))
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", type=Path, help="a shard directory (default: the bundled corpus, tokenized into a temp dir)")
    p.add_argument("extra", nargs="*", help="more trainer flags, after --")
    args = p.parse_args()
    if unknown := [r for r in args.recipes.split(",") if r not in recipes.names()]:
        raise UserError(f"--recipes: no recipe {', '.join(unknown)}: pick from {', '.join(recipes.names())}")
    if args.data is not None and not args.data.is_dir():
        raise UserError(f"--data {args.data} is not a directory: pass a shard directory, or leave --data out for the bundled corpus")
    with tempfile.TemporaryDirectory(prefix="bench-compile-cache-") as tmp:
        tmp = Path(tmp)
        data = args.data
        if data is None:
            data = tmp / "data"
            subprocess.run(
                [sys.executable, "-m", "job.prepare", "text", str(CORPUS), "--paragraphs", "--out", str(data), "--shard-size", "50000"],
                cwd=ROOT,
                check=True,
                capture_output=True,
            )
        print(
            f"{'recipe':<20} {'cold first step':>16} {'warm first step':>16} {'ratio':>6} {'cold wall':>10} {'warm wall':>10} "
            f"{'ratio':>6}  warm graphs from cache"
        )
        for recipe in args.recipes.split(","):
            cache_root = tmp / f"persistent-{recipe}"
            cold = run(recipe, data, tmp / f"{recipe}-box1", cache_root, args.device, args.extra)
            warm = run(recipe, data, tmp / f"{recipe}-box2", cache_root, args.device, args.extra)
            print(
                f"{recipe:<20} {cold['first_step_s']:>14.1f} s {warm['first_step_s']:>14.1f} s "
                f"{warm['first_step_s'] / cold['first_step_s']:>6.2f} {cold['wall_s']:>8.1f} s {warm['wall_s']:>8.1f} s "
                f"{warm['wall_s'] / cold['wall_s']:>6.2f}  {warm['hits']} of {warm['hits'] + warm['misses']}",
                flush=True,
            )


if __name__ == "__main__":
    main()
