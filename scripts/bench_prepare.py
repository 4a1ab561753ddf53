"""How fast does job.prepare tokenize, against tiktoken's own batch encoder on the same documents?

    python scripts/bench_prepare.py [--workers N] [--mb 40] [--repeat 3] [--shard-size 1000000]

Writes a FineWeb-edu-shaped parquet corpus (text + metadata columns, ~1,000 tokens per document on average,
cut from the bundled tinyshakespeare.txt; no network) and times, in one run, interleaved and `--repeat` times:

  tiktoken batch   Encoding.encode_ordinary_batch(docs, num_threads=N): tiktoken's parallel encoder, documents
                   already in memory, nothing written (the reference rate)
  job.prepare      `python -m job.prepare fineweb-edu --data-files CORPUS --workers N` end to end, in-process:
                   worker start-up, reading parquet through datasets, tokenizing, packing, writing and fsyncing
                   the shards and the manifest (a fresh process's interpreter and import start-up is timed once
                   and reported apart)
  single loop      [encode_ordinary(d) for d in docs] in one process, the naive baseline
  reader only      job.prepare's main process without tokenizing (parquet through datasets, packing the batches):
                   the rate no number of workers can exceed

All three count the same tokens (the documents' own; the EOT separators prepare adds are left out), so the
rates compare directly. The goal: job.prepare >= 90% of tiktoken batch with the same N.

--shard-size matters to job.prepare's figure: the val shard is sized to the corpus (job/prepare/split.py), so with
shards over 100,000 tokens prepare stages the stream until ten shards' worth of tokens have come or the corpus ends.
At the defaults (about 12M tokens in 1M-token shards) the ten staged shards then become the first shards as they are
(hard links); a corpus of fewer than ten shards has all its shards copied out of the staged ones once it ends, which
the figure then includes. --shard-size 100000 or less writes the shards themselves from the start.
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from job import prepare  # noqa: E402
from job.errors import ArgumentParser, UserError, check_output_path, cli_main, float_arg, int_arg  # noqa: E402
from job.tokenizer import get_encoding  # noqa: E402

CORPUS = ROOT / "job" / "assets" / "tinyshakespeare.txt"


def make_corpus(d: Path, mb: float, files: int, seed: int = 0) -> list[str]:
    """Documents of log-normal length (median ~2,500 characters, mean ~3,400, about 1,000 GPT-2 tokens of this text,
    like FineWeb-edu's ~1,040 tokens per document), written as `files` parquet files with FineWeb-edu's columns."""
    text = CORPUS.read_text(encoding="utf-8")
    rng = random.Random(seed)
    docs, size = [], 0
    while size < mb * 1e6:
        n = int(min(len(text) // 2, rng.lognormvariate(7.8, 0.8)))
        start = rng.randrange(0, len(text) - n)
        docs.append(text[start : start + n])
        size += n
    d.mkdir(parents=True, exist_ok=True)
    per = -(-len(docs) // files)
    for k in range(files):
        rows = docs[k * per : (k + 1) * per]
        table = pa.table({
            "text": rows, "id": [f"<urn:uuid:{k}-{i}>" for i in range(len(rows))], "dump": ["CC-MAIN-2024-10"] * len(rows),
            "url": [f"https://example.org/{k}/{i}" for i in range(len(rows))], "language": ["en"] * len(rows),
            "token_count": [len(r) // 3 for r in rows], "score": [3.0] * len(rows), "int_score": [3] * len(rows),
        })
        pq.write_table(table, d / f"{k:03d}_00000.parquet", row_group_size=2000)  # FineWeb's files use row groups too
    return docs


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its children that have exited (prepare's workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@cli_main
def check_work_dir(d: Path) -> None:
    """--dir gets corpus/ and out/ rewritten: it must be new, empty, or an earlier run's (nothing else is touched)."""
    check_output_path(d / "corpus", "--dir")
    if d.exists() and not d.is_dir():
        raise UserError(f"--dir {d} is a file: pass a new or empty directory")
    other = sorted(p.name for p in d.iterdir() if p.name not in ("corpus", "out")) if d.is_dir() else []
    if other:
        raise UserError(f"--dir {d} holds other files ({', '.join(other[:3])}): pass a new or empty directory, whose "
                        "corpus/ and out/ this benchmark rewrites")


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int_arg(1), default=prepare.default_workers(), help="processes/threads for both (default: all cores)")
    p.add_argument("--mb", type=float_arg(above=0), default=40.0, help="corpus size in MB of text (default 40)")
    p.add_argument("--files", type=int_arg(1), default=4, help="parquet files (default 4)")
    p.add_argument("--repeat", type=int_arg(1), default=3, help="interleaved repetitions; medians are reported (default 3)")
    p.add_argument("--shard-size", type=int_arg(1), default=1_000_000, help="tokens per shard for job.prepare (default 1M: ~10 commits)")
    p.add_argument("--batch-docs", type=int_arg(1), default=prepare.BATCH_DOCS)
    p.add_argument("--dir", help="work dir (default: a temp dir, removed at the end)")
    args = p.parse_args(argv)
    if args.dir:
        check_work_dir(Path(args.dir))

    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    enc = get_encoding()
    try:
        docs = make_corpus(work / "corpus", args.mb, args.files)
        chars = sum(map(len, docs))
        ntok = sum(len(t) for t in enc.encode_ordinary_batch(docs, num_threads=args.workers))  # also warms tiktoken up
        print(f"corpus: {len(docs):,} documents, {chars / 1e6:.1f}M characters, {ntok:,} tokens "
              f"({ntok / len(docs):,.0f} per document) in {args.files} parquet files", flush=True)

        def tiktoken_batch():
            enc.encode_ordinary_batch(docs, num_threads=args.workers)

        def single_loop():
            for d in docs:
                enc.encode_ordinary(d)

        def job_prepare():
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)
            cmd = ["fineweb-edu", "--data-files", str(work / "corpus"), "--out", str(out), "--workers", str(args.workers),
                   "--shard-size", str(args.shard_size), "--batch-docs", str(args.batch_docs)]
            with contextlib.redirect_stdout(io.StringIO()):
                paths = prepare.main(cmd)
            written = sum(os.path.getsize(p) for p in paths)
            assert written > 2 * (ntok + len(docs)), "prepare wrote fewer tokens than the corpus holds"

        def reader_only():
            # job.prepare's main process alone: read the parquet files through datasets and pack the batches for the
            # workers. Its rate is the ceiling of job.prepare however many workers a box has.
            source = prepare.file_source(prepare.parquet_files([str(work / "corpus")]), "text")
            for _ in source.batches(0, [], args.batch_docs):
                pass

        # A fresh `python -m job.prepare` process first pays for the interpreter and its imports (datasets is the big
        # one); timed once here and reported apart, then paid before the repeats so that each repeat measures the same.
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "from job import prepare; prepare._datasets()"], cwd=ROOT, check=True)
        startup = time.perf_counter() - t0
        prepare._datasets()

        runs = {"tiktoken batch": (tiktoken_batch, f"{args.workers} threads"),
                "job.prepare": (job_prepare, f"{args.workers} workers + main"),
                "single loop": (single_loop, "1"),
                "reader only": (reader_only, "1 (prepare's main)")}
        times: dict[str, list[float]] = {k: [] for k in runs}
        cpu: dict[str, list[float]] = {k: [] for k in runs}
        for r in range(args.repeat):
            for name, (fn, _) in runs.items():
                c0, t0 = cpu_seconds(), time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(cpu_seconds() - c0)
            print(f"repeat {r + 1}/{args.repeat}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    base = ntok / med["tiktoken batch"]
    print(f"\nmachine: {cpu_name()}, {prepare.default_workers()} CPUs usable; Python {platform.python_version()}; "
          f"tiktoken {__import__('tiktoken').__version__}; median of {args.repeat}")
    print(f"{'method':<16} {'processes':<22} {'seconds':>8} {'tokens/s':>12} {'vs tiktoken batch':>18} {'CPU s':>7}")
    for name, (_, procs) in runs.items():
        rate = ntok / med[name]
        print(f"{name:<16} {procs:<22} {med[name]:>8.2f} {rate:>12,.0f} {rate / base:>17.1%} {statistics.median(cpu[name]):>7.2f}")
    print("(CPU s: user + system seconds of all its threads and processes; unlike the wall time, other load on the machine "
          "hardly changes it)")
    print(f"(a fresh job.prepare process adds {startup:.2f} s of start-up: interpreter and imports, datasets included)")
    ratio = med["tiktoken batch"] / med["job.prepare"]
    print(f"\njob.prepare end to end / tiktoken batch encode = {ratio:.3f} (goal >= 0.90: {'met' if ratio >= 0.9 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
