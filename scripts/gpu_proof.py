"""The recipes' proof on one lent GPU, prepared to finish within --budget seconds (480: 8 minutes on one H100/H200),
and its CPU mode, the same stages at tiny sizes (what the test suite runs):

    bash scripts/gpu_proof.sh                                          # GPU: full sizes, out in ./proof-out
    RECORD_2025=LOG25 RECORD_2026=LOG26 bash scripts/gpu_proof.sh      # ... with the records' own code beside the ports
    DEVICE=cpu OUT=/tmp/p bash scripts/gpu_proof.sh                    # CPU: tiny sizes, eager

Stages, in order, each in a child process under its own time limit (a stage that cannot run says why in one line,
and the others still run):

- env: torch, CUDA, Triton and the GPU.
- record-2025: the 2025-05-24 port beside that record's own code, run by scripts/bench_speedrun.py in one process from
  the same weights on the same batches: each step's loss, the weights' drift, step times side by side. Needs the
  record's log (RECORD_2025 / --record-2025), which is never part of this repository.
- record-2026: the 2026-07-17 port through the trainer's loop beside that record's own code
  (scripts/speedrun_2026_07_17_check_trainer.py), with its Triton and CUDA kernels replaced by torch definitions: a
  CPU check only, so on a GPU it says so and is skipped. Needs RECORD_2026 / --record-2026.
- train-RECIPE, for each recipe: the trainer itself (`python -m job.train`, compiled on a GPU) on synthetic documents
  for --steps steps at the recipe's full size (the speedrun's stage table shortened so that they cross its stages):
  the first step (the cold compile), the median of the later steps, tokens/s; then the same run's first step again in
  another log dir with the compile cache the first one filled (the warm compile).
- summary: one table, and for each speedrun the projected 8xH100 time to its target: the record's steps times the
  median step time of this one GPU divided by 8 (perfect scaling over eight GPUs: an optimistic bound).

Results: OUT/stages.txt (one line per stage), OUT/STAGE.json and .log, OUT/summary.json.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from job import recipes  # noqa: E402
from job.data import write_shard  # noqa: E402
from job.errors import ArgumentParser, UserError, check_output_path, cli_main, int_arg  # noqa: E402
from job.tokenizer import EOT  # noqa: E402

# Every run: no HellaSwag, samples or checkpoints; a step's line in metrics.jsonl each step.
QUIET = ["--eval-every", "0", "--hellaswag-every", "0", "--sample-num", "0", "--checkpoint-every", "0", "--log-every", "1"]
# Per device, each recipe's size: on a GPU the full one (a validation of one record-sized window batch), on a CPU
# the tests' narrowed tiny ones. STEPS is filled in from --steps; a staged recipe runs its stages over them.
SIZES = {
    "cuda": {
        "gpt2": ["--preset", "gpt2", "--val-steps", "1"],
        "speedrun": ["--preset", "gpt2", "--val-tokens", str(8 * 262144)],
        "speedrun-2025-05-24": ["--preset", "gpt2", "--val-tokens", str(8 * 262144)],
    },
    "cpu": {
        "gpt2": ["--preset", "tiny", "--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--block-size", "64", "--seq-len", "32",
                 "--micro-batch", "4", "--total-batch-tokens", "256", "--val-steps", "1"],
        "speedrun": ["--preset", "tiny", "--n-embd", "32", "--block-size", "128", "--batch-divisor", "1024", "--seq-len", "48",
                     "--total-batch-tokens", "384", "--val-seq-len", "64", "--val-tokens", "512"],
        "speedrun-2025-05-24": ["--preset", "tiny", "--n-head", "1", "--n-embd", "64", "--block-size", "256", "--seq-len", "128",
                                "--total-batch-tokens", "256", "--val-seq-len", "256", "--val-tokens", "512"],
    },
}
# The records' published runs, for the projection: steps to the 3.28 target.
RECORD_STEPS = {"speedrun": 1390, "speedrun-2025-05-24": 1770}
STAGE_FLOOR = 20  # seconds: a stage that would start with less budget left is skipped


def synthetic_documents(out: Path, train_tokens: int, val_tokens: int, seed: int = 0) -> Path:
    """Shards of random GPT-2 tokens cut into documents of 200-3000 tokens, each after <|endoftext|>: every recipe's
    loader reads them (the speedrun's starts each sequence at a document)."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)

    def stream(n: int) -> np.ndarray:
        tokens = rng.integers(0, EOT, size=n, dtype=np.int64).astype(np.uint16)
        pos = 0
        while pos < n:
            tokens[pos] = EOT
            pos += int(rng.integers(200, 3000))
        return tokens

    write_shard(out / "proof_val_000000.npy", stream(val_tokens))
    write_shard(out / "proof_train_000001.npy", stream(train_tokens))
    return out


def recipe_argv(recipe: str, device: str, steps: int) -> list[str]:
    argv = ["--recipe", recipe, *SIZES[device][recipe], "--max-steps", str(steps)]
    if recipe == "speedrun":  # its stage table over the run's steps: the last one or two are the extension
        extension = max(1, steps // 4)
        argv += ["--scheduled-steps", str(steps - extension), "--extension-steps", str(extension)]
    return argv


def train(argv: list[str], data: Path, log: Path, cache: Path, device: str, compile_mode: str, timeout: float) -> dict:
    """One run of the trainer; its step times and compile event from metrics.jsonl."""
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env.update(NANOGPT_COMPILE_CACHE=str(cache), PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "job.train", *argv, *QUIET, "--device", device, "--compile", compile_mode,
           "--data-dir", str(data), "--log-dir", str(log)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    (log.parent / f"{log.name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        last = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"the trainer exited {proc.returncode}: {last[0][:300]}")
    rows = [json.loads(line) for line in (log / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if r["event"] == "train"]
    compiled = next((r for r in rows if r["event"] == "compile"), None)
    later = [r["ms"] for r in steps[1:]]
    return {
        "wall_s": round(wall, 2),
        "first_step_s": round(compiled["seconds"] if compiled else steps[0]["ms"] / 1000, 3),
        "cache_hits": compiled["cache_hits"] if compiled else None,
        "cache_misses": compiled["cache_misses"] if compiled else None,
        "step_ms_median": round(statistics.median(later), 2) if later else None,
        "tokens_per_step": [r["tokens"] for r in steps],
        "tok_s_median": round(statistics.median(r["tok_s"] for r in steps[1:]), 1) if len(steps) > 1 else None,
        "losses": [round(r["loss"], 5) for r in steps],
    }


class Proof:
    def __init__(self, args):
        self.args, self.out = args, args.out
        self.deadline = time.monotonic() + args.budget
        self.lines: list[str] = []
        self.results: dict[str, dict] = {}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def stage(self, name: str, fn) -> None:
        if self.left() < STAGE_FLOOR:
            return self.record(name, f"skipped ({self.left():.0f} s of the budget left)")
        t0 = time.monotonic()
        try:
            result = fn()
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            return self.record(name, f"failed in {time.monotonic() - t0:.0f} s: {str(e).splitlines()[0]}")
        if isinstance(result, str):  # a stage that cannot run here says why
            return self.record(name, f"skipped ({result})")
        self.results[name] = result
        (self.out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
        self.record(name, f"ok ({time.monotonic() - t0:.0f} s)")

    def record(self, name: str, status: str) -> None:
        line = f"== {name}: {status}"
        print(line, flush=True)
        self.lines.append(line)
        (self.out / "stages.txt").write_text("\n".join(self.lines) + "\n")

    # --- the stages -------------------------------------------------------------------------------------
    def env(self) -> dict:
        code = ("import json, torch, importlib.util as u; c = torch.cuda.is_available(); print(json.dumps({'torch': torch.__version__, "
                "'cuda': torch.version.cuda, 'gpu': torch.cuda.get_device_name() if c else None, "
                "'capability': torch.cuda.get_device_capability() if c else None, 'triton': u.find_spec('triton') is not None, "
                "'cpu_capability': torch.backends.cpu.get_cpu_capability()}))")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        if proc.returncode:
            raise RuntimeError(proc.stderr.strip().splitlines()[-1])
        return json.loads(proc.stdout)

    def record_2025(self):
        if not self.args.record_2025:
            return "no RECORD_2025: the 2025-05-24 record's log is needed, and is never part of this repository"
        size = "full" if self.args.device == "cuda" else "small"
        steps = str(self.args.steps if self.args.device == "cuda" else 2)
        out = self.out / "record-2025-raw.json"
        self._script("bench_speedrun.py", "--record", self.args.record_2025, "--device", self.args.device, "--size", size,
                     "--steps", steps, "--out", str(out), log="record-2025")
        return json.loads(out.read_text())

    def record_2026(self):
        if self.args.device != "cpu":
            return "the 2026-07-17 record's comparison replaces its Triton and CUDA kernels with torch: a CPU check"
        if not self.args.record_2026:
            return "no RECORD_2026: the 2026-07-17 record's log is needed, and is never part of this repository"
        script = ROOT / "scripts" / "speedrun_2026_07_17_check_trainer.py"
        if not script.exists():
            return "scripts/speedrun_2026_07_17_check_trainer.py is not in this checkout"
        proc = self._script(script.name, "--record", self.args.record_2026, log="record-2026")
        return {"output": proc.stdout.splitlines()[-20:]}

    def _script(self, name: str, *argv, log: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / name), *map(str, argv)], cwd=ROOT, capture_output=True,
                              text=True, timeout=max(self.left() - 5, 1))
        (self.out / f"{log}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode:
            last = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"{name} exited {proc.returncode}: {last[0][:300]}")
        return proc

    def train_recipe(self, recipe: str, data: Path) -> dict:
        argv = recipe_argv(recipe, self.args.device, self.args.steps)
        cache = self.out / "compile-cache"
        timeout = max(self.left() - 5, 1)
        cold = train(argv, data, self.out / f"train-{recipe}", cache, self.args.device, self.args.compile, timeout)
        result = {"argv": argv, "cold": cold}
        if self.args.compile == "on" and self.left() > STAGE_FLOOR:  # the same first step, its graphs from the cache
            warm_argv = [*argv[: argv.index("--max-steps")], "--max-steps", "1", *argv[argv.index("--max-steps") + 2 :]]
            if recipe == "speedrun":
                warm_argv = argv  # its stage table must add up to --max-steps: the whole short run again
            result["warm"] = train(warm_argv, data, self.out / f"train-{recipe}-warm", cache, self.args.device, "on",
                                   max(self.left() - 5, 1))
        return result

    def summary(self) -> dict:
        rows = {}
        for recipe in recipes.names():
            got = self.results.get(f"train-{recipe}")
            if not got:
                continue
            cold, warm = got["cold"], got.get("warm")
            row = {"step_ms_median": cold["step_ms_median"], "tok_s_median": cold["tok_s_median"], "cold_first_step_s": cold["first_step_s"],
                   "warm_first_step_s": warm["first_step_s"] if warm else None}
            if recipe in RECORD_STEPS and cold["step_ms_median"] and self.args.device == "cuda":
                row["projected_8xh100_s"] = round(RECORD_STEPS[recipe] * cold["step_ms_median"] / 1000 / 8, 1)
            rows[recipe] = row
        print(f"{'recipe':<22}{'step ms':>10}{'tok/s':>12}{'cold 1st step s':>17}{'warm 1st step s':>17}{'8xH100 s (proj.)':>18}")
        for recipe, r in rows.items():
            warm = "-" if r["warm_first_step_s"] is None else f"{r['warm_first_step_s']:.1f}"
            proj = r.get("projected_8xh100_s", "-")
            print(f"{recipe:<22}{r['step_ms_median'] or 0:>10.1f}{r['tok_s_median'] or 0:>12.0f}{r['cold_first_step_s']:>17.1f}"
                  f"{warm:>17}{proj!s:>18}")
        return {"device": self.args.device, "steps": self.args.steps, "recipes": rows, "stages": self.lines}

    def run(self) -> None:
        self.stage("env", self.env)
        self.stage("record-2025", self.record_2025)
        self.stage("record-2026", self.record_2026)
        data = synthetic_documents(self.out / "data", *((12_000_000, 2_200_000) if self.args.device == "cuda" else (200_000, 20_000)))
        for recipe in recipes.names():
            self.stage(f"train-{recipe}", lambda recipe=recipe: self.train_recipe(recipe, data))
        result = self.summary()
        (self.out / "summary.json").write_text(json.dumps(result, indent=1) + "\n")


def main(argv=None) -> None:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("proof-out"), help="a directory for the results (default ./proof-out)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--steps", type=int_arg(minimum=4), default=8, help="training steps per recipe (default 8; the speedrun's stages need 4)")
    p.add_argument("--budget", type=int_arg(minimum=1), default=480, help="seconds for all stages (default 480)")
    p.add_argument("--compile", choices=("on", "off"), default=None, help="torch.compile (default: on for cuda, off for cpu)")
    p.add_argument("--record-2025", default=os.environ.get("RECORD_2025") or None, help="the 2025-05-24 record's log (RECORD_2025)")
    p.add_argument("--record-2026", default=os.environ.get("RECORD_2026") or None, help="the 2026-07-17 record's log (RECORD_2026)")
    args = p.parse_args(argv)
    args.compile = args.compile or ("on" if args.device == "cuda" else "off")
    for name in ("record_2025", "record_2026"):
        path = getattr(args, name)
        if path and not Path(path).is_file():
            raise UserError(f"--{name.replace('_', '-')} {path}: no such file: pass the record's log (its .txt), or leave it out")
    check_output_path(args.out, "--out", directory=True)
    args.out.mkdir(parents=True, exist_ok=True)
    Proof(args).run()


if __name__ == "__main__":
    cli_main(main)()
