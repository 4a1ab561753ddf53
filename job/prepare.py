"""Tokenize documents into build-nanogpt shards, on all cores, resumably.

    python -m job.prepare fineweb-edu --out DIR [--name sample-10BT]   # streams HuggingFaceFW/fineweb-edu from the hub
    python -m job.prepare fineweb-edu --data-files PARQUET... --out DIR  # the same from local parquet files (a downloaded copy)
    python -m job.prepare text FILES... --out DIR      # .txt (one document per file), .jsonl/.json/.parquet (one per row)
    python -m job.prepare verify DIR                   # check every shard (dtype, size, EOT structure, manifest hashes)

The shards are exactly what karpathy's build-nanogpt fineweb.py writes: flat uint16 .npy files, every
document preceded by <|endoftext|>, documents packed in order into shards of `shard_size` tokens (a
document that overflows finishes the shard and its remainder starts the next), the first shard is val,
the rest are train, and the last, partial shard is written too. Same input, same bytes, whatever --workers.

Every shard is committed on its own (temp name, fsync, rename) and recorded in DIR/manifest.json with
its token count, sha256 and the document range it covers. Running the same command again after an
interruption keeps the committed shards and restarts at the first missing one; a finished run is left
as it is. A file whose name the manifest does not list is never a shard the run vouches for.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import glob
import hashlib
import io
import json
import multiprocessing as mp
import os
import queue
import re
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from job.errors import UserError, cli_main
from job.fsutil import fsync_dir, write_failure
from job.metrics import format_eta
from job.tokenizer import EOT, VOCAB_SIZE, get_encoding

SHARD_SIZE = 100_000_000  # build-nanogpt's: 100M tokens, 200 MB per shard
BATCH_DOCS = 128  # documents per tokenizer task (~600 KB of FineWeb text): the hand-off cost is amortized, and a task fits the pipe twice
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
LOADERS = {".txt": "txt", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # extension -> reader
FINEWEB = "HuggingFaceFW/fineweb-edu"
PREFIXES = {"text": "data", "fineweb-edu": "edufineweb"}  # edufineweb_train_000001.npy, as build-nanogpt names them
SHARD_NAME = re.compile(r"^(?P<prefix>.+)_(?P<split>val|train)_(?P<index>\d{6})\.npy$")
# Fault injection for the interruption test: seconds to hold a half-written temp shard open before finishing it.
DELAY_ENV = "NANOGPT_TEST_PREPARE_DELAY"


def _reason(e: BaseException) -> str:
    # datasets/pyarrow errors can be pages long; the first line says what went wrong
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300]}" if lines else type(e).__name__


def default_workers() -> int:
    # the CPUs this process may use (a container's cpuset), not every core of the host
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# --- tokenizing (runs in the worker processes) -----------------------------------------------------------

def _pack(arr) -> tuple[np.ndarray, bytes]:
    """A pyarrow string array as (offsets, utf-8 bytes) holding only its own rows.

    Pickling a sliced pyarrow array ships its whole parent buffer; these two plain objects cost one memcpy.
    """
    import pyarrow as pa

    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        arr = arr.cast(pa.large_string())
    _, offsets_buf, data_buf = arr.buffers()
    dtype = np.int64 if pa.types.is_large_string(arr.type) else np.int32
    offsets = np.frombuffer(offsets_buf, dtype=dtype)[arr.offset : arr.offset + len(arr) + 1].astype(np.int64)
    start, end = int(offsets[0]), int(offsets[-1])
    data = data_buf.slice(start, end - start).to_pybytes() if data_buf is not None and end > start else b""
    return offsets - start, data


def _encode_batch(batch: tuple[np.ndarray, bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of a batch of documents, each preceded by EOT as in build-nanogpt, and each document's length."""
    offsets, data = batch
    enc = get_encoding()
    # encode_to_numpy with no special tokens is encode_ordinary (a literal "<|endoftext|>" in a document stays text),
    # but hands back a numpy buffer instead of a list of Python ints
    parts = [enc.encode_to_numpy(data[a:b].decode("utf-8"), disallowed_special=()) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    lengths = np.fromiter((len(p) + 1 for p in parts), dtype=np.int64, count=len(parts))
    ends = np.cumsum(lengths)
    tokens = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.uint16)  # GPT-2 ids < 50257 fit uint16
    tokens[ends - lengths] = EOT
    for start, part in zip(ends - lengths + 1, parts, strict=True):
        tokens[start : start + len(part)] = part
    return tokens, lengths


def _worker_init(parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle: it stops the pool
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked worker inherits main()'s handler; Pool.terminate needs the default
    if sys.platform.startswith("linux"):
        # Die with the main process: a pool worker whose parent was SIGKILLed would otherwise wait forever.
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
    get_encoding()


# --- document sources ------------------------------------------------------------------------------------

def _datasets():
    import datasets  # imported late: ~1 s that --help and argument errors should not pay
    import tqdm

    # we turn datasets' failures into one `error:` line; its own logger would print them a second time, longer
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    datasets.disable_progress_bars()  # ours says more
    # The first tqdm object (datasets makes some even with bars off) starts tqdm's monitor thread, which would rule out
    # forking the workers (see _pool); it only tunes the refresh rate of stalled bars.
    tqdm.tqdm.monitor_interval = 0
    # Every IterableDataset imports torch when it is installed (for DataLoader workers, which we do not use): ~2 s and
    # ~300 MB per process for nothing. Nothing else in job.prepare's process uses datasets with torch.
    datasets.config.TORCH_AVAILABLE = False
    return datasets


def _guard(it: Iterator, what: str) -> Iterator:
    # datasets raises all sorts of types for a malformed file or a dropped stream; name the source in one line
    try:
        while True:
            try:
                item = next(it)
            except StopIteration:
                return
            except UserError:
                raise
            except Exception as e:
                raise UserError(f"cannot read {what}: {_reason(e)}") from e
            yield item
    finally:
        if hasattr(it, "close"):
            it.close()  # an abandoned datasets iterator can abort the interpreter at exit (pyarrow threads)


@dataclass(frozen=True)
class Unit:
    """One file of a source: a local path, or a URL (hf://datasets/...@revision/...) that datasets can stream."""

    kind: str  # txt | json | parquet
    path: str

    @property
    def local(self) -> bool:
        return "://" not in self.path

    def ident(self) -> str:
        # Local files by name and size, so a dataset copied elsewhere still resumes; remote ones by URL (it pins the revision).
        return f"{Path(self.path).name}:{os.path.getsize(self.path)}" if self.local else self.path


class Source:
    """An ordered stream of documents: the rows of `units`, one after the other."""

    def __init__(self, label: str, units: list[Unit], field: str = "text", identity: dict | None = None,
                 max_docs: int | None = None):
        self.label, self.units, self.field, self.max_docs = label, units, field, max_docs
        self.identity = identity or {"files": [u.ident() for u in units], "field": field}

    def total_docs(self) -> int | None:
        """Documents in the whole source, for the ETA; None when that costs more than reading parquet footers."""
        n = 0
        for u in self.units:
            if u.kind == "txt":
                n += 1
            elif u.kind == "parquet":
                import pyarrow.parquet as pq

                try:
                    if u.local:
                        n += pq.read_metadata(u.path).num_rows
                    else:
                        import fsspec

                        with fsspec.open(u.path, "rb") as f:
                            n += pq.ParquetFile(f).metadata.num_rows
                except Exception:
                    return None  # reading it for real will report the problem properly
            else:
                return None
        return n if self.max_docs is None else min(n, self.max_docs)

    def _column(self, table, u: Unit, row: int):
        import pyarrow as pa

        if self.field not in table.column_names:
            raise UserError(f"{u.path} row {row + 1} has no text field {self.field!r} "
                            f"(fields: {', '.join(table.column_names) or 'none'}): pass --text-field NAME")
        col = table[self.field].combine_chunks()
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_string_view(col.type)):
            raise UserError(f"{u.path}: field {self.field!r} holds {col.type}, not text: pass --text-field NAME")
        if col.null_count:
            first = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise UserError(f"{u.path} row {row + first + 1} has no text field {self.field!r}: pass --text-field NAME")
        return col

    def _read(self, u: Unit, batch_docs: int) -> Iterator:
        """The text column of one file, as pyarrow string arrays of up to batch_docs rows."""
        import pyarrow as pa

        if u.kind == "txt":
            try:
                text = Path(u.path).read_text(encoding="utf-8")  # universal newlines, as datasets' text loader reads it
            except UnicodeDecodeError as e:
                raise UserError(f"cannot read {u.path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
            except OSError as e:
                raise UserError(f"cannot read {u.path}: {e.strerror}") from e
            yield pa.array([text], pa.large_string())
            return
        if u.kind == "json" and u.local and os.path.getsize(u.path) == 0:
            return  # no rows; datasets would fail on it with a bare StopIteration
        datasets = _datasets()
        try:
            ds = datasets.load_dataset(u.kind, data_files=[u.path], split="train", streaming=True)
        except Exception as e:
            raise UserError(f"cannot read {u.path} as {u.kind}: {_reason(e)}") from e
        row = 0
        # Arrow batches, never per-row dicts: the main process only moves bytes, the workers make the strings.
        for table in _guard(ds.with_format("arrow").iter(batch_size=batch_docs), u.path):
            col = self._column(table, u, row)
            row += len(col)
            yield col

    def batches(self, skip: int, unit_rows: list[int], batch_docs: int) -> Iterator[tuple[np.ndarray, bytes]]:
        """Packed batches of documents from document `skip` on (up to max_docs), in order.

        unit_rows holds the row counts of the files read to the end, appended here as files finish; on a resume
        it comes from the manifest, and files wholly before `skip` are not even opened.
        """
        done = 0  # documents in the files before the current one
        for i, u in enumerate(self.units):
            if self.max_docs is not None and done >= self.max_docs:
                return
            if i < len(unit_rows) and done + unit_rows[i] <= skip:
                done += unit_rows[i]
                continue
            rows = 0
            for arr in self._read(u, batch_docs):
                n = len(arr)
                lo = min(max(skip - done - rows, 0), n)
                hi = n if self.max_docs is None else min(n, self.max_docs - done - rows)
                for s in range(lo, hi, batch_docs):
                    yield _pack(arr.slice(s, min(batch_docs, hi - s)))
                rows += n
                if hi < n:
                    return  # --max-docs reached
            if i >= len(unit_rows):
                unit_rows.append(rows)
            elif unit_rows[i] != rows:
                raise UserError(f"{u.path} now has {rows:,} rows, {unit_rows[i]:,} when this prepare run started: the source "
                                "changed, so the shards already written no longer match it; pass --overwrite to start over")
            done += rows


class MemorySource(Source):
    """Documents given as Python strings (tests, and callers that build documents themselves)."""

    def __init__(self, docs: Iterable[str], label: str = "the input"):
        self.docs = list(docs)
        digest = hashlib.sha256()
        for d in self.docs:
            digest.update(hashlib.sha256(d.encode("utf-8", "surrogatepass")).digest())
        super().__init__(label, [], identity={"memory": digest.hexdigest(), "documents": len(self.docs)})

    def total_docs(self) -> int:
        return len(self.docs)

    def batches(self, skip, unit_rows, batch_docs):
        import pyarrow as pa

        for s in range(skip, len(self.docs), batch_docs):
            yield _pack(pa.array(self.docs[s : s + batch_docs], pa.large_string()))


def file_source(paths: Iterable, text_field: str = "text", label: str | None = None) -> Source:
    """Local files in the order given: a whole .txt file is one document; .jsonl/.json/.parquet rows give `text_field`."""
    paths = [Path(p) for p in paths]
    for p in paths:  # check every file up front, not after tokenizing the ones before it
        if not p.is_file():
            raise UserError(f"input file {p} does not exist" if not p.exists() else f"input {p} is not a file")
        if p.suffix.lower() not in LOADERS:
            raise UserError(f"{p}: unsupported file type '{p.suffix}': use .txt (one document per file), .jsonl/.json/.parquet")
    if label is None:
        label = str(paths[0]) if len(paths) == 1 else f"the {len(paths)} input files"
    return Source(label, [Unit(LOADERS[p.suffix.lower()], str(p)) for p in paths], text_field)


def parquet_files(specs: list[str]) -> list[Path]:
    """--data-files: parquet files, directories (their *.parquet, recursively) and globs, each sorted, in the order given."""
    files: list[Path] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found = sorted(p.rglob("*.parquet"))
        elif p.is_file():
            found = [p]
        else:
            found = sorted(Path(f) for f in glob.glob(spec, recursive=True) if Path(f).is_file())
        if not found:
            raise UserError(f"--data-files {spec}: no parquet files there")
        files += found
    for f in files:
        if f.suffix.lower() != ".parquet":
            raise UserError(f"--data-files {f}: not a .parquet file (use `job.prepare text` for .txt/.jsonl)")
    return files


def fineweb_source(dataset: str = FINEWEB, name: str = "sample-10BT", max_docs: int | None = None) -> Source:
    """The train split of a hub dataset (or a local dataset dir laid out like the hub repo), file by file."""
    datasets = _datasets()
    local = Path(dataset).is_dir()
    try:
        # Resolving the data files pins them: on the hub their URLs carry the revision, so a resume reads the same bytes.
        builder = datasets.load_dataset_builder(dataset, name=name)
        files = [str(f) for f in (builder.config.data_files or {}).get("train", [])]
    except Exception as e:
        what = f"load {dataset} ({name})" if local else f"reach the Hugging Face hub to stream {dataset} ({name})"
        fix = "check --name" if local else "check network access, --dataset and --name, or pass --data-files with local parquet files"
        raise UserError(f"cannot {what}: {_reason(e)}; {fix}") from e
    if not files:
        raise UserError(f"{dataset} ({name}) has no train split files: check --name")
    units = []
    for f in files:
        kind = LOADERS.get(Path(f.split("::")[0]).suffix.lower())
        if kind is None or kind == "txt":
            raise UserError(f"{dataset} ({name}): unsupported data file {f} (parquet or json expected)")
        units.append(Unit(kind, f))
    identity = {"dataset": dataset if not local else Path(dataset).name, "name": name, "files": [u.ident() for u in units],
                "field": "text"}
    return Source(f"{dataset} ({name})", units, "text", identity, max_docs)


# --- the output directory and its manifest -------------------------------------------------------------

def _npy_header(n: int) -> bytes:
    """The .npy header np.save writes for n uint16 tokens (so the shard is byte-identical to build-nanogpt's)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint16)),
                                               "fortran_order": False, "shape": (n,)})
    return buf.getvalue()


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    # one line per key and per shard: small, and readable with `cat` even for a hundred shards
    head = ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in obj.items() if k != "shards")
    shards = ",\n".join(f"  {json.dumps(s)}" for s in obj.get("shards", []))
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(f"{{\n{head},\n \"shards\": [\n{shards}\n ]\n}}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(out: Path) -> dict | None:
    path = Path(out) / MANIFEST
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
        if m.get("version") != MANIFEST_VERSION or not isinstance(m.get("shards"), list):
            raise ValueError(f"version {m.get('version')!r}")
        return m
    except (ValueError, AttributeError) as e:
        raise UserError(f"{path} is damaged or not job.prepare's ({_reason(e)}): pass --overwrite to start over") from e


def _trainer_shards(out: Path) -> list[Path]:
    # what job.data.list_shards would feed the trainer (not imported: job.data pulls in torch, ~1.5 s)
    return sorted(p for p in out.iterdir() if p.suffix == ".npy" and ("train" in p.name or "val" in p.name) and p.is_file())


def _temps(out: Path) -> list[Path]:
    return sorted(p for p in out.glob(".*.tmp") if p.is_file())


def check_out_dir(out_dir, overwrite: bool = False) -> None:
    """The refusals that need no knowledge of the source (cheap: run them before resolving a hub dataset)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory: choose another --out")
    if out.is_dir() and not overwrite and read_manifest(out) is None:
        old = _trainer_shards(out)
        if old:
            raise UserError(f"--out {out} already has {len(old)} shards ({old[0].name}, ...) not made by a resumable "
                            "job.prepare run: pass --overwrite or choose another --out")


def open_out(out: Path, identity: dict, prefix: str, overwrite: bool) -> dict:
    """The manifest to continue from: a fresh one, or the earlier run's, cut at its first missing or damaged shard."""
    check_out_dir(out, overwrite)
    fresh = {"version": MANIFEST_VERSION, "identity": identity, "complete": False, "units": [], "shards": []}
    if not out.is_dir():
        return fresh
    manifest = None if overwrite else read_manifest(out)
    if overwrite:
        stale = _trainer_shards(out) + _temps(out) + ([out / MANIFEST] if (out / MANIFEST).exists() else [])
        for p in stale:  # stale shards of an earlier run would otherwise be mixed into this one
            p.unlink()
        if stale:
            print(f"--overwrite: removed {len(stale)} files of an earlier run from {out}")
        return fresh
    if manifest is None:
        return fresh
    if manifest.get("identity") != identity:
        theirs = manifest.get("identity") or {}
        diffs = [k for k in sorted(set(identity) | set(theirs)) if identity.get(k) != theirs.get(k)]
        raise UserError(f"--out {out} holds shards of a different prepare run (differs in: {', '.join(diffs)}): run that "
                        "command again to resume it, pass --overwrite to replace it, or choose another --out")
    kept = []
    for i, entry in enumerate(manifest["shards"]):
        p = out / entry["name"]
        last = manifest["complete"] and i == len(manifest["shards"]) - 1
        full = entry["tokens"] == identity["shard_size"] or last
        if not (p.is_file() and full and p.stat().st_size == len(_npy_header(entry["tokens"])) + 2 * entry["tokens"]):
            print(f"{p.name} is missing or damaged: redoing the dataset from there", file=sys.stderr)
            manifest["complete"] = False
            break
        kept.append(entry)
    manifest["shards"] = kept
    names = {e["name"] for e in kept}
    for p in _trainer_shards(out):
        if p.name in names:
            continue
        m = SHARD_NAME.match(p.name)
        if not (m and m["prefix"] == prefix):
            raise UserError(f"--out {out} has a shard {p.name} that its prepare run did not write: move it away or pass --overwrite")
        p.unlink()  # ours but unlisted: written before a crash could record it; it is redone identically
    for p in _temps(out):
        p.unlink()  # a shard or manifest interrupted mid-write
    return manifest


class ShardWriter:
    """Commits shards from a background thread, in order: temp file, fsync, rename, then the manifest.

    At ~200 workers a 100M-token shard fills in about a second; hashing and fsyncing 200 MB in the main loop
    would stall the pool, so that happens here while the next shard fills.
    """

    def __init__(self, out: Path, manifest: dict, prefix: str):
        self.out, self.manifest, self.prefix = out, manifest, prefix
        self.index = len(manifest["shards"])
        self.error: BaseException | None = None
        self.why = ""  # the error in a few words, worked out where it happened
        self.q: queue.Queue = queue.Queue(maxsize=1)
        self.delay = float(os.environ.get(DELAY_ENV, "0") or 0)
        self.thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self.thread.start()

    def _put(self, item) -> None:
        while True:
            if self.error is not None:
                raise self._failure()
            try:
                self.q.put(item, timeout=0.5)
                return
            except queue.Full:
                pass

    def submit(self, tokens: np.ndarray, start: tuple[int, int], end: tuple[int, int], units: list[int],
               final: dict | None = None) -> None:
        name = f"{self.prefix}_{'val' if self.index == 0 else 'train'}_{self.index:06d}.npy"
        self.index += 1
        self._put((name, tokens, start, end, units, final))

    def finish(self, final: dict) -> None:
        """Mark the manifest complete (after the last shard, if any, is committed) and wait for the thread."""
        self._put((None, None, None, None, None, final))
        self.close()

    def close(self) -> None:
        """Let the shards already handed over finish, then stop; raise what went wrong in the thread."""
        if self.thread.is_alive():
            self._put(StopIteration)
            self.thread.join()
        if self.error is not None:
            raise self._failure()

    def _run(self) -> None:
        while (item := self.q.get()) is not StopIteration:
            if self.error is None:
                try:
                    self._commit(*item)
                except BaseException as e:
                    self.why = write_failure(e, self.out, 0 if item[1] is None else item[1].nbytes)
                    self.error = e

    def _failure(self) -> UserError:
        err = UserError(f"cannot write shards to {self.out}: {self.why}; the shards already written stay: make room, then run "
                        "the same command to go on from them")
        err.__cause__ = self.error
        return err

    def _commit(self, name, tokens, start, end, units, final) -> None:
        if name is not None:
            header = _npy_header(len(tokens))
            digest = hashlib.sha256(header)
            tmp = self.out / f".{name}.tmp"
            try:
                self._write_shard(tmp, header, tokens, digest)
            except BaseException:
                tmp.unlink(missing_ok=True)  # give the space back: the error message reports what is free
                raise
            os.replace(tmp, self.out / name)
            self.manifest["shards"].append({"name": name, "split": "val" if name.split("_")[-2] == "val" else "train",
                                            "tokens": int(len(tokens)), "sha256": digest.hexdigest(),
                                            "start": [int(x) for x in start], "end": [int(x) for x in end]})
            self.manifest["units"] = units
        if final is not None:
            self.manifest.update(final, complete=True)
        _write_json(self.out / MANIFEST, self.manifest)
        fsync_dir(self.out)

    def _write_shard(self, tmp: Path, header: bytes, tokens: np.ndarray, digest) -> None:
        with open(tmp, "wb") as f:
            f.write(header)
            data = memoryview(tokens).cast("B")
            if self.delay:
                half = len(data) // 4 * 2
                f.write(data[:half])
                f.flush()
                time.sleep(self.delay)
                data = data[half:]
                digest.update(memoryview(tokens).cast("B")[:half])
            f.write(data)
            digest.update(data)
            f.flush()
            os.fsync(f.fileno())


class Progress:
    """Documents, tokens, tokens/s and ETA: a tqdm bar on a terminal, else one line every `every` seconds (logs)."""

    def __init__(self, docs: int, tokens: int, every: float = 30.0):
        self.docs0 = self.docs = docs
        self.tokens0 = self.tokens = tokens
        self.total: int | None = None
        self.every, self.t0, self.last = every, time.time(), time.time()
        self.printed: tuple | None = None  # (docs, total) of the last line printed
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            tqdm.monitor_interval = 0  # no monitor thread: a later prepare() in this process can still fork its workers
            self.bar = tqdm(initial=docs, unit="doc", unit_scale=True, dynamic_ncols=True, file=sys.stderr, mininterval=0.5)

    def set_total(self, total: int | None) -> None:
        self.total = total
        if self.bar is not None and total:
            self.bar.total = total
            self.bar.refresh()

    def rate(self) -> float:
        return (self.tokens - self.tokens0) / max(time.time() - self.t0, 1e-9)

    def line(self) -> str:
        dt = max(time.time() - self.t0, 1e-9)
        total = f"/{self.total:,} ({100 * self.docs / max(self.total, 1):.1f}%)" if self.total else ""
        eta = "?"
        if self.total and self.docs > self.docs0:
            eta = format_eta((self.total - self.docs) * dt / (self.docs - self.docs0))
        return f"{self.docs:,}{total} docs | {self.tokens:,} tokens | {self.rate() / 1e6:.2f}M tok/s | ETA {eta}"

    def update(self, docs: int, tokens: int) -> None:
        self.tokens += tokens
        self.docs += docs
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.tokens / 1e6:,.1f}M tok, {self.rate() / 1e6:.2f}M tok/s", refresh=False)
            self.bar.update(docs)
        elif time.time() - self.last >= self.every:
            self._print()

    def _print(self) -> None:
        self.last, self.printed = time.time(), (self.docs, self.total)
        print(f"prepare: {self.line()}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.docs > self.docs0 and self.printed != (self.docs, self.total):
            self._print()  # the final count, with the total if it arrived after the last line


# --- the pipeline ------------------------------------------------------------------------------------------

def _pool(workers: int):
    # fork: workers start in milliseconds with the tokenizer already built (spawn costs each ~0.5 s of imports and BPE
    # parsing, which is most of a small run). But a fork copies locks held by other threads, so it is used only while
    # this process runs no other thread; otherwise spawn.
    method = "fork" if "fork" in mp.get_all_start_methods() and threading.active_count() == 1 else "spawn"
    pool = mp.get_context(method).Pool(workers, _worker_init, (os.getpid(),))
    _widen_pipes(pool)
    return pool


def _widen_pipes(pool) -> None:
    """Give the pool's task and result pipes 1 MiB instead of 64 KiB (Linux).

    A task (a few hundred KB of text) through a 64 KiB pipe needs the main process on a CPU for as long as the worker
    reads it, so on a busy machine idle workers wait for it to be scheduled. With room for several tasks in the pipe
    the main process fills it ahead and the workers read at their own pace.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        size = min(int(Path("/proc/sys/fs/pipe-max-size").read_text()), 1 << 20)
        for q in (pool._inqueue, pool._outqueue):  # multiprocessing's SimpleQueues: a pipe each, the size is the pipe's
            fcntl.fcntl(q._writer.fileno(), 1031, size)  # F_SETPIPE_SZ
    except (OSError, ValueError, AttributeError):
        pass  # an optimization only: the default pipes work, just with less slack


def prepare(source: Source, out_dir, shard_size: int = SHARD_SIZE, prefix: str = "data", workers: int | None = None,
            overwrite: bool = False, batch_docs: int = BATCH_DOCS, progress_every: float = 30.0) -> list[Path]:
    """Tokenize `source` into shards `{prefix}_{val|train}_{index:06d}.npy` in out_dir; returns their paths, val first.

    Resumes the run recorded in out_dir's manifest if it is the same source and settings.
    """
    if shard_size < 1:
        raise UserError(f"--shard-size must be at least 1 token, got {shard_size}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", prefix) or "train" in prefix or "val" in prefix:
        # the trainer tells splits apart by `train`/`val` anywhere in the file name (data.list_shards)
        raise UserError(f"--prefix {prefix!r} must be letters, digits, '._-' and not contain 'train' or 'val'")
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if batch_docs < 1:
        raise UserError(f"--batch-docs must be at least 1, got {batch_docs}")
    out = Path(out_dir)
    identity = {**source.identity, "max_docs": source.max_docs, "shard_size": shard_size, "prefix": prefix, "tokenizer": "gpt2"}
    manifest = open_out(out, identity, prefix, overwrite)
    shards = manifest["shards"]
    if manifest["complete"]:
        print(f"{out} is already complete: {len(shards)} shards, {manifest['tokens']:,} tokens from {manifest['documents']:,} "
              f"documents (pass --overwrite to redo it; `python -m job.prepare verify {out}` checks it)")
        return [out / s["name"] for s in shards]
    out.mkdir(parents=True, exist_ok=True)
    get_encoding()  # verify the tokenizer files here, once, before the workers load them
    resumed = len(shards)
    g = sum(s["tokens"] for s in shards)  # tokens in the committed shards = global position of the next shard
    doc, off = shards[-1]["end"] if shards else (0, 0)  # where that shard starts: document `doc`, token `off` of it
    if shards:
        print(f"resuming {out}: {len(shards)} shards ({g:,} tokens) already complete, restarting at document {doc:,}")
    unit_rows = list(manifest["units"])
    t0 = time.time()
    pool = _pool(workers) if workers > 1 else None  # first: before this function starts any thread of its own
    progress = Progress(doc, g, progress_every)
    counting = threading.Thread(target=lambda: progress.set_total(source.total_docs()), daemon=True)
    counting.start()
    writer = ShardWriter(out, manifest, prefix)
    batches = source.batches(doc, unit_rows, batch_docs)
    ok = False
    try:
        # imap keeps document order; each task is a whole batch, so the hand-off cost is paid per --batch-docs documents
        results = pool.imap(_encode_batch, batches) if pool else map(_encode_batch, batches)
        buf, n = np.empty(shard_size, dtype=np.uint16), 0  # the shard being filled (fineweb.py's all_tokens_np)
        start = (doc, off)
        pos, d0 = g - off, doc  # global token position and index of the next batch's first document
        for tokens, lengths in results:
            ends = pos + np.cumsum(lengths)
            drop = g + n - pos  # the resumed document's tokens that the committed shards already hold
            t = tokens[drop:] if drop > 0 else tokens
            while len(t):  # a loop, not fineweb.py's single split, so one document may span several shards
                take = min(shard_size - n, len(t))
                buf[n : n + take] = t[:take]
                n, t = n + take, t[take:]
                if n == shard_size:
                    g += shard_size
                    k = int(np.searchsorted(ends, g, side="right"))  # the document the next shard starts in
                    end = (d0 + k, g - int(ends[k - 1] if k else pos)) if k < len(lengths) else (d0 + len(lengths), 0)
                    writer.submit(buf, start, end, list(unit_rows))
                    buf, n, start = np.empty(shard_size, dtype=np.uint16), 0, end
            pos, d0 = int(ends[-1]), d0 + len(lengths)
            progress.update(len(lengths), len(tokens) - max(drop, 0))
        if d0 == 0:
            raise UserError(f"{source.label} has no documents: nothing to tokenize")
        if g + n == d0:
            raise UserError(f"{source.label} has only empty documents ({d0:,}): nothing to tokenize")
        final = {"documents": d0, "tokens": g + n, "units": list(unit_rows)}
        if n:
            writer.submit(buf[:n], start, (d0, 0), list(unit_rows), final)
        writer.finish(final)
        ok = True
    except KeyboardInterrupt:
        if pool:
            pool.terminate()
            pool = None
        writer.close()  # the shards handed over are complete: commit them, they save work on the resume
        print(f"interrupted: {len(manifest['shards'])} complete shards kept in {out}; run the same command to resume",
              file=sys.stderr)
        raise
    finally:
        counting.join(timeout=5)  # the last progress line shows the total when counting was nearly done (short runs)
        progress.close()
        if pool:
            pool.terminate()
        if not ok and writer.thread.is_alive():
            try:
                writer.close()
            except UserError:
                pass  # the error being raised already says what went wrong first
        batches.close()  # stop the readers (the pool's feeder thread is gone, so nobody runs the generator now)
    dt = time.time() - t0
    kept = f" ({resumed} of them kept from the interrupted run)" if resumed else ""
    shards = manifest["shards"]
    print(
        f"wrote {len(shards)} shards to {out} (1 val, {len(shards) - 1} train): {g + n:,} tokens from {d0:,} documents "
        f"in {dt:.1f}s ({progress.rate() / 1e6:.2f}M tok/s this run){kept}"
    )
    if len(shards) == 1:
        print(f"warning: all {g + n:,} tokens fit in the val shard, no train shards: use a smaller --shard-size", file=sys.stderr)
    return [out / s["name"] for s in shards]


def prepare_documents(docs: Iterable[str], out_dir, shard_size: int = SHARD_SIZE, prefix: str = "data", workers: int | None = None,
                      overwrite: bool = False, batch_docs: int = BATCH_DOCS) -> list[Path]:
    """prepare() for documents held in memory as strings."""
    return prepare(MemorySource(docs), out_dir, shard_size, prefix, workers, overwrite, batch_docs)


# --- verify ------------------------------------------------------------------------------------------------

def _scan(path: Path) -> dict:
    """One pass over a shard file: its sha256, length, dtype, first token, EOT count and largest token."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        header_len = f.tell()
        f.seek(0)
        digest.update(f.read(header_len))
        info = {"shape": shape, "dtype": dtype, "fortran": fortran, "tokens": 0, "eot": 0, "max": -1, "first": None}
        if dtype != np.dtype("<u2") or len(shape) != 1:
            return info
        while chunk := f.read(1 << 24):
            digest.update(chunk)
            arr = np.frombuffer(chunk[: len(chunk) // 2 * 2], dtype="<u2")
            if info["first"] is None and len(arr):
                info["first"] = int(arr[0])
            info["tokens"] += len(arr)
            info["eot"] += int(np.count_nonzero(arr == EOT))
            info["max"] = max(info["max"], int(arr.max()) if len(arr) else -1)
            info["odd"] = len(chunk) % 2
    info["sha256"] = digest.hexdigest()
    return info


def _check(path: Path, entry: dict | None, shard_size: int | None, last: bool) -> str | None:
    """What is wrong with one shard, or None."""
    if not path.is_file():
        return "missing"
    try:
        info = _scan(path)
    except (ValueError, OSError) as e:
        return f"not a .npy file ({_reason(e)})"
    if info["dtype"] != np.dtype("<u2") or len(info["shape"]) != 1:
        return f"not a flat uint16 array (dtype {info['dtype']}, shape {info['shape']})"
    if info.get("odd") or info["tokens"] != info["shape"][0]:
        return f"truncated: the header says {info['shape'][0]:,} tokens, the file holds {info['tokens']:,}"
    if info["max"] >= VOCAB_SIZE:
        return f"token id {info['max']} is outside GPT-2's vocabulary"
    if info["tokens"] == 0:
        return "empty"
    if shard_size is not None and (info["tokens"] > shard_size or (not last and info["tokens"] != shard_size)):
        return f"{info['tokens']:,} tokens, expected {'at most ' if last else ''}{shard_size:,}"
    if entry is None:
        return None
    if info["tokens"] != entry["tokens"]:
        return f"{info['tokens']:,} tokens, the manifest says {entry['tokens']:,}"
    if info["sha256"] != entry["sha256"]:
        return f"sha256 {info['sha256'][:12]}... differs from the manifest's {entry['sha256'][:12]}..."
    # Every document starts with EOT and no text encodes to EOT, so the EOTs count the documents starting here.
    (d0, o0), (d1, o1) = entry["start"], entry["end"]
    docs = d1 - d0 + (o1 > 0) - (o0 > 0)
    if info["eot"] != docs or (info["first"] == EOT) != (o0 == 0):
        return f"EOT structure broken: {info['eot']:,} EOT tokens, {docs:,} documents start in it per the manifest"
    return None


def _index_key(p: Path):
    m = SHARD_NAME.match(p.name)
    return (0, int(m["index"]), p.name) if m else (1, 0, p.name)


def _open_shard(p: Path):
    try:
        return np.load(p, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError):
        return None


def verify(out_dir) -> bool:
    """Check every shard of out_dir and print one line each; True if all are good and the run is complete."""
    out = Path(out_dir)
    if not out.is_dir():
        raise UserError(f"{out} is not a directory: pass the --out of a prepare run")
    manifest = read_manifest(out)
    on_disk = _trainer_shards(out)
    if manifest is None:
        # build-nanogpt's own shards (no manifest): names, dtype, sizes and the val shard's leading EOT
        if not on_disk:
            raise UserError(f"{out} has no shards (*train*.npy / *val*.npy) to verify")
        paths = sorted(on_disk, key=_index_key)
        entries = [None] * len(paths)
        shard_size = max((len(a) for a in map(_open_shard, paths) if a is not None and a.ndim == 1), default=None)
        print(f"{out}: no {MANIFEST} (not made by job.prepare): checking dtype, sizes and EOT structure, no hashes")
    else:
        entries = manifest["shards"]
        paths = [out / e["name"] for e in entries]
        shard_size = manifest["identity"].get("shard_size")
    problems: dict[str, str] = {}
    with ThreadPoolExecutor(min(8, default_workers())) as ex:  # hashing and reading release the GIL
        last = len(paths) - 1
        results = ex.map(lambda i: _check(paths[i], entries[i], shard_size,
                                          i == last and (manifest is None or manifest["complete"])), range(len(paths)))
        for p, problem in zip(paths, results, strict=True):
            print(f"{p.name}: {'ok' if problem is None else 'BAD: ' + problem}", flush=True)
            if problem:
                problems[p.name] = problem
    if manifest is None:
        first = _open_shard(paths[0]) if paths[0].name not in problems else None
        if first is not None and "val" in paths[0].name and len(first) and first[0] != EOT:
            problems[paths[0].name] = "does not start with EOT"
            print(f"{paths[0].name}: BAD: does not start with EOT (every document is preceded by EOT)")
    else:
        listed = {p.name for p in paths}
        for p in on_disk:
            if p.name not in listed:
                problems[p.name] = "not in the manifest"
                print(f"{p.name}: BAD: not in the manifest (written just before an interruption, or not ours); the "
                      "prepare command removes or redoes it")
    for p in _temps(out):
        print(f"{p.name}: temp file of an interrupted write (not a shard; the prepare command removes it)")
    incomplete = manifest is not None and not manifest["complete"]
    good = len(paths) - len([p for p in paths if p.name in problems])
    summary = f"{out}: {good} of {len(paths)} shards ok"
    if manifest is not None and manifest["complete"]:
        summary += f", {manifest['tokens']:,} tokens from {manifest['documents']:,} documents"
    if problems:
        first_bad = min(problems)
        summary += f"; bad: {', '.join(sorted(problems))}. Delete {first_bad} and run the prepare command again: it redoes the dataset from there"
    if incomplete:
        summary += "; INCOMPLETE: the prepare run was interrupted, run the same command again to finish it"
    print(summary)
    return not problems and not incomplete


# --- command line ------------------------------------------------------------------------------------------

def _stop_on_sigterm(signum, frame):
    # `docker stop` sends SIGTERM: stop like Ctrl-C, so the shards already handed to the writer are committed
    raise KeyboardInterrupt


@cli_main
def main(argv: list[str] | None = None) -> list[Path] | bool:
    parser = argparse.ArgumentParser(prog="python -m job.prepare", description=__doc__.split("\n\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="output directory for the .npy shards and manifest.json")
    common.add_argument("--shard-size", type=int, default=SHARD_SIZE, help=f"tokens per shard (default {SHARD_SIZE:,})")
    common.add_argument("--prefix", help="shard file name prefix (default: data for text, edufineweb for fineweb-edu)")
    common.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    common.add_argument("--batch-docs", type=int, default=BATCH_DOCS, help=f"documents per tokenizer task (default {BATCH_DOCS})")
    common.add_argument("--progress-every", type=float, default=30.0, metavar="SECONDS",
                        help="when stderr is not a terminal, print a progress line this often (default 30)")
    common.add_argument("--overwrite", action="store_true", help="delete the shards already in --out and start over")
    sub = parser.add_subparsers(dest="source", required=True)
    t = sub.add_parser("text", parents=[common], help="local .txt/.jsonl/.json/.parquet files")
    t.add_argument("files", nargs="+", help=".txt: one document per file; .jsonl/.json/.parquet: one per row")
    t.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.json/.parquet rows (default: text)")
    f = sub.add_parser("fineweb-edu", parents=[common], help="FineWeb-Edu, streamed from the Hugging Face hub or local parquet")
    f.add_argument("--dataset", default=None, help=f"hub dataset id or local dataset dir (default {FINEWEB})")
    f.add_argument("--name", default="sample-10BT", help="dataset config (default: sample-10BT)")
    f.add_argument("--data-files", nargs="+", metavar="PATH",
                   help="read these local parquet files (files, dirs or globs, in order) instead of the hub")
    f.add_argument("--max-docs", type=int, help="stop after this many documents")
    v = sub.add_parser("verify", help="check every shard of a prepared directory")
    v.add_argument("dir", help="the --out of a prepare run (or any directory of build-nanogpt shards)")
    args = parser.parse_args(argv)

    if args.source == "verify":
        good = verify(args.dir)
        if not good:
            sys.exit(1)
        return good
    if args.source == "text":
        source = file_source(args.files, args.text_field)
    else:
        if args.max_docs is not None and args.max_docs < 1:
            raise UserError(f"--max-docs must be at least 1, got {args.max_docs}")
        if args.data_files and args.dataset:
            raise UserError("--data-files and --dataset are two different sources: pass one of them")
        check_out_dir(args.out, args.overwrite)  # fail before the (slow) dataset resolution, not after
        if args.data_files:
            source = file_source(parquet_files(args.data_files), "text", label="the --data-files")
            source.max_docs = args.max_docs
        else:
            source = fineweb_source(args.dataset or FINEWEB, args.name, args.max_docs)
    prefix = args.prefix or PREFIXES[args.source]
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
    return prepare(source, args.out, args.shard_size, prefix, args.workers, args.overwrite, args.batch_docs, args.progress_every)


if __name__ == "__main__":
    main()
