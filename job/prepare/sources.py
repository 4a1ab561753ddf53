"""Where documents come from: local text files (.txt/.jsonl/.json/.parquet), local parquet given as --data-files, and
a hub dataset (FineWeb-Edu) streamed file by file through `datasets`.

A Source yields its documents in a fixed order as packed batches (offsets and UTF-8 bytes) for the tokenizer
workers, and can start again at any document: that is how a resume skips what the committed shards hold.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from job.errors import UserError
from job.prepare.common import reason

PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")  # a blank line (spaces allowed) between paragraphs
LOADERS = {".txt": "txt", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # extension -> reader
FINEWEB = "HuggingFaceFW/fineweb-edu"
FINEWEB_ALL = "HuggingFaceFW/fineweb"  # the corpus modded-nanogpt's speedrun trains on (its sample-10BT)


def _datasets():
    import datasets  # imported late: a heavy import that --help and argument errors should not pay
    import tqdm

    # we turn datasets' failures into one `error:` line; its own logger would print them a second time, longer
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    datasets.disable_progress_bars()  # ours says more
    # The first tqdm object (datasets makes some even with bars off) starts tqdm's monitor thread, which would rule out
    # forking the workers (see encode.pool); it only tunes the refresh rate of stalled bars.
    tqdm.tqdm.monitor_interval = 0
    # Every IterableDataset imports torch when it is installed (for DataLoader workers, which we do not use): seconds
    # and hundreds of MB per process for nothing. Nothing else in job.prepare's process uses datasets with torch.
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
                raise UserError(f"cannot read {what}: {reason(e)}") from e
            yield item
    finally:
        if hasattr(it, "close"):
            it.close()  # an abandoned datasets iterator can abort the interpreter at exit (pyarrow threads)


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
                 max_docs: int | None = None, paragraphs: bool = False):
        self.label, self.units, self.field, self.max_docs = label, units, field, max_docs
        self.paragraphs = paragraphs  # a .txt file is one document per paragraph, not one in all
        self.identity = identity or {"files": [u.ident() for u in units], "field": field}
        if paragraphs:  # another cut of the same files: a prepare run of the other kind does not resume this one
            self.identity["paragraphs"] = True
        # Known to hold far more than ten shards (a whole hub corpus): the val split is a full shard from the start, and
        # the pipeline need not stage the first shards until it knows (job/prepare/split.py).
        self.large = False

    def total_docs(self) -> int | None:
        """Documents in the whole source, for the ETA; None when that costs more than reading parquet footers."""
        n = 0
        for u in self.units:
            if u.kind == "txt":
                n += len(self._txt_documents(u)) if self.paragraphs else 1
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

    def _txt_documents(self, u: Unit) -> list[str]:
        """A .txt file's documents: the whole file, or with `paragraphs` each run of lines between blank lines."""
        try:
            text = Path(u.path).read_text(encoding="utf-8")  # universal newlines, as datasets' text loader reads it
        except UnicodeDecodeError as e:
            raise UserError(f"cannot read {u.path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
        except OSError as e:
            raise UserError(f"cannot read {u.path}: {e.strerror}") from e
        if not self.paragraphs:
            return [text]
        return [p for p in PARAGRAPH_BREAK.split(text) if p.strip()]

    def _read(self, u: Unit, batch_docs: int) -> Iterator:
        """The text column of one file, as pyarrow string arrays of up to batch_docs rows."""
        import pyarrow as pa

        if u.kind == "txt":
            docs = self._txt_documents(u)
            for s in range(0, len(docs), batch_docs):
                yield pa.array(docs[s : s + batch_docs], pa.large_string())
            return
        if u.kind == "json" and u.local and os.path.getsize(u.path) == 0:
            return  # no rows; datasets would fail on it with a bare StopIteration
        datasets = _datasets()
        try:
            ds = datasets.load_dataset(u.kind, data_files=[u.path], split="train", streaming=True)
        except Exception as e:
            raise UserError(f"cannot read {u.path} as {u.kind}: {reason(e)}") from e
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


def file_source(paths: Iterable, text_field: str = "text", label: str | None = None, paragraphs: bool = False) -> Source:
    """Local files in the order given: a whole .txt file is one document (with `paragraphs`, each of its paragraphs is
    one); .jsonl/.json/.parquet rows give `text_field`."""
    paths = [Path(p) for p in paths]
    for p in paths:  # check every file up front, not after tokenizing the ones before it
        if not p.is_file():
            raise UserError(f"input file {p} does not exist" if not p.exists() else f"input {p} is not a file")
        if p.suffix.lower() not in LOADERS:
            raise UserError(f"{p}: unsupported file type '{p.suffix}': use .txt (one document per file), .jsonl/.json/.parquet")
    if label is None:
        label = str(paths[0]) if len(paths) == 1 else f"the {len(paths)} input files"
    return Source(label, [Unit(LOADERS[p.suffix.lower()], str(p)) for p in paths], text_field, paragraphs=paragraphs)


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
        raise UserError(f"cannot {what}: {reason(e)}; {fix}") from e
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
    source = Source(f"{dataset} ({name})", units, "text", identity, max_docs)
    source.large = not local and max_docs is None  # the hub's FineWeb(-edu) subsets are billions of tokens
    return source
