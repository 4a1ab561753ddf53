"""How fast does job.prepare download and verify hub shards, with the network taken out of the figure?

    python scripts/bench_hub.py [--shards 4] [--mtok 25] [--workers 1,4] [--repeat 2]

Writes `--shards` llm.c .bin files of `--mtok` million random GPT-2 tokens (the hub's are 100M), serves them with the
tests' local stand-in for the Hugging Face hub (tests/hub_server.py: the hub's HTTP protocol on loopback, in this
process) and times, interleaved and `--repeat` times:

  download+verify  `python -m job.prepare finewebedu-gpt2 --out DIR --workers N` in a fresh process: resolving the
                   commit, HEAD and GET of every file through huggingface_hub, writing it, reading it back for the
                   header, vocabulary and sha256 checks, and the manifest. The rate is the bytes over the command's own
                   "ready in" time; the wall time with the interpreter's start-up is reported too
  verify only      job.prepare.hub.scan() over the same files, warm in the page cache: the checks alone
  sha256 only      hashlib over the same files: the floor under the checks

The server, the client and the checks share this machine's CPUs, so on a small VM the figure is a lower bound of
what the fetcher does when the bytes come from a network link.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402

from hub_server import HubServer  # noqa: E402
from job import binshard, contract  # noqa: E402
from job.errors import ArgumentParser, UserError, cli_main, int_arg  # noqa: E402
from job.prepare.hub import scan  # noqa: E402

SPEC = contract.HUB_SHARDS["finewebedu-gpt2"]


def make_repo(d: Path, shards: int, tokens: int) -> int:
    rng = np.random.default_rng(0)
    d.mkdir(parents=True, exist_ok=True)
    for i in range(shards):
        binshard.write(d / f"{SPEC.prefix}_{'val' if i == 0 else 'train'}_{i:06d}.bin", rng.integers(0, 50257, tokens, dtype=np.uint16))
    return sum(p.stat().st_size for p in d.iterdir())


def download(url: str, out: Path, workers: int) -> tuple[float, float]:
    """(seconds the command reports for the download, wall seconds of the process)."""
    shutil.rmtree(out, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=url, HF_HOME=str(out.parent / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "job.prepare", "finewebedu-gpt2", "--out", str(out), "--workers", str(workers)],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise UserError(f"the download failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    return float(re.search(r"ready in ([\d.]+)s", proc.stdout)[1]), wall


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def sha_only(files) -> None:
    for p in files:
        with open(p, "rb") as f:
            hashlib.file_digest(f, "sha256")


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python scripts/bench_hub.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int_arg(minimum=2), default=4, help="files served: the val shard and train shards (default 4)")
    p.add_argument("--mtok", type=int_arg(minimum=1, maximum=100), default=25, help="million tokens per file (default 25)")
    p.add_argument("--workers", default="1,4", help="comma-separated --workers values to time (default 1,4)")
    p.add_argument("--repeat", type=int_arg(minimum=1), default=2)
    args = p.parse_args(argv)
    try:
        workers = [int(w) for w in args.workers.split(",")]
    except ValueError:
        raise UserError(f"--workers takes comma-separated whole numbers, got {args.workers!r}") from None
    tmp = Path(tempfile.mkdtemp(prefix="bench-hub-"))
    server = None
    try:
        repo = tmp / "repo"
        total = make_repo(repo, args.shards, args.mtok * 1_000_000)
        files = sorted(repo.iterdir())
        server = HubServer({SPEC.repo: repo})
        print(f"{args.shards} files x {args.mtok}M tokens = {total / 1e6:,.0f} MB; {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs, Python {platform.python_version()}")
        rates: dict[str, list[float]] = {}
        for _ in range(args.repeat):
            for w in workers:
                took, wall = download(server.url, tmp / "out", w)
                rates.setdefault(f"download+verify, --workers {w}", []).append(total / took / 1e6)
                rates.setdefault(f"  the same with process start-up (wall), --workers {w}", []).append(total / wall / 1e6)
            rates.setdefault("verify only (scan, page cache warm)", []).append(total / timed(lambda: [scan(f) for f in files]) / 1e6)
            rates.setdefault("sha256 only", []).append(total / timed(lambda: sha_only(files)) / 1e6)
        for name, r in rates.items():
            print(f"{name:55s} {statistics.median(r):8,.0f} MB/s  (runs: {', '.join(f'{x:,.0f}' for x in r)})")
    finally:
        if server:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
