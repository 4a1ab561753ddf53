"""Tokenize documents into build-nanogpt shards.

    python -m job.prepare text FILES... --out DIR        # .txt (one document per file), .jsonl/.json/.parquet (one per row)
    python -m job.prepare fineweb-edu --out DIR          # streams HuggingFaceFW/fineweb-edu sample-10BT, like fineweb.py

The shards are exactly what karpathy's build-nanogpt fineweb.py writes: flat uint16 .npy files, every
document preceded by <|endoftext|>, documents packed in order into shards of `shard_size` tokens (a
document that overflows finishes the shard and its remainder starts the next), the first shard is val,
the rest are train, and the last, partial shard is written too. Same input, same bytes.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from job.errors import UserError, cli_main
from job.tokenizer import EOT, get_encoding

SHARD_SIZE = 100_000_000  # build-nanogpt's: 100M tokens, 200 MB per shard
LOADERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # extension -> datasets builder
FINEWEB = "HuggingFaceFW/fineweb-edu"
PREFIXES = {"text": "data", "fineweb-edu": "edufineweb"}  # edufineweb_train_000001.npy, as build-nanogpt names them


def tokenize(text: str) -> np.ndarray:
    # EOT goes *before* each document, as in build-nanogpt: it tells the model where one document ends and the next begins
    tokens = np.array([EOT, *get_encoding().encode_ordinary(text)], dtype=np.int64)
    assert (0 <= tokens).all() and (tokens < 2**16).all(), "token dictionary too large for uint16"
    return tokens.astype(np.uint16)


def _reason(e: BaseException) -> str:
    # datasets/pyarrow errors can be pages long; the first line says what went wrong
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300]}" if lines else type(e).__name__


def check_out_dir(out_dir, overwrite: bool = False) -> list[Path]:
    """Existing shards in out_dir (those the trainer would read); refuse to mix with them unless overwrite."""
    from job.data import list_shards  # here, not at the top: job.data imports torch (~1.5 s), which preparing data never needs

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory: choose another --out")
    old = list_shards(out, "val") + list_shards(out, "train") if out.is_dir() else []
    if old and not overwrite:
        raise UserError(
            f"--out {out} already has {len(old)} shards ({old[0].name}, ...): pass --overwrite or choose another --out"
        )
    return old


def prepare_documents(
    docs: Iterable[str],
    out_dir,
    shard_size: int = SHARD_SIZE,
    prefix: str = "data",
    workers: int | None = None,
    overwrite: bool = False,
    source: str = "the input",
) -> list[Path]:
    """Tokenize strings into shards `{prefix}_{val|train}_{index:06d}.npy` in out_dir; returns their paths, val first."""
    from job.data import write_shard

    if shard_size < 1:
        raise UserError(f"--shard-size must be at least 1 token, got {shard_size}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", prefix) or "train" in prefix or "val" in prefix:
        # the trainer tells splits apart by `train`/`val` anywhere in the file name (data.list_shards)
        raise UserError(f"--prefix {prefix!r} must be letters, digits, '._-' and not contain 'train' or 'val'")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    out = Path(out_dir)
    old = check_out_dir(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    get_encoding()  # verify the tokenizer files here, once, before forked workers inherit the cached Encoding
    t0 = time.time()
    names, ndocs, ntok = [], 0, 0
    buf = np.empty(shard_size, dtype=np.uint16)  # the shard being filled, reused (fineweb.py's all_tokens_np)
    n = 0  # tokens in buf
    bar = tqdm(unit="tok", unit_scale=True, desc="shard 0", disable=None)  # disable=None: no bar when stderr is not a terminal

    def flush(tokens: np.ndarray) -> None:
        name = f"{prefix}_{'val' if not names else 'train'}_{len(names):06d}.npy"
        write_shard(Path(tmp) / name, tokens)
        names.append(name)
        bar.set_description(f"shard {len(names)}")

    # Shards are staged in a hidden dir and move into out_dir only when every document is done: a failed or
    # interrupted run leaves out_dir as it was, never a partial dataset the trainer would take for a whole one.
    with tempfile.TemporaryDirectory(dir=out, prefix=".prepare-") as tmp:
        # pool first, before the input starts reader threads; workers leave Ctrl-C to the main process, which stops them
        pool = mp.Pool(workers, initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN)) if workers > 1 else None
        try:
            # imap keeps document order; chunksize amortizes the pickling round trip over many small documents
            for tokens in pool.imap(tokenize, docs, chunksize=16) if pool else map(tokenize, docs):
                ndocs += 1
                ntok += len(tokens)
                bar.update(len(tokens))
                while len(tokens):  # a loop, not fineweb.py's single split, so one document may span several shards
                    take = min(shard_size - n, len(tokens))
                    buf[n : n + take] = tokens[:take]
                    n, tokens = n + take, tokens[take:]
                    if n == shard_size:
                        flush(buf)
                        n = 0
        finally:
            bar.close()
            if pool:
                pool.terminate()
            if hasattr(docs, "close"):
                docs.close()  # a stream stopped early (--max-docs) must shut its reader down before exit
        if ndocs == 0:
            raise UserError(f"{source} has no documents: nothing to tokenize")
        if ntok == ndocs:
            raise UserError(f"{source} has only empty documents ({ndocs}): nothing to tokenize")
        if n:
            flush(buf[:n])
        for name in names:
            os.replace(Path(tmp) / name, out / name)
    for p in old:  # --overwrite: stale shards of an earlier run would otherwise be mixed into this one
        if p.name not in names:
            p.unlink()
    dt = time.time() - t0
    print(
        f"wrote {len(names)} shards to {out} (1 val, {len(names) - 1} train): {ntok:,} tokens from {ndocs:,} documents "
        f"in {dt:.1f}s ({ntok / max(dt, 1e-9) / 1e6:.2f}M tok/s)" + (f", replaced {len(old)} old shards" if old else "")
    )
    if len(names) == 1:
        print(f"warning: all {ntok:,} tokens fit in the val shard, no train shards: use a smaller --shard-size", file=sys.stderr)
    return [out / name for name in names]


def _rows(ds, what: str) -> Iterator[dict]:
    # datasets raises all sorts of types for a malformed file or a dropped stream; name the source in one line
    it = iter(ds)
    try:
        while True:
            try:
                row = next(it)
            except StopIteration:
                return
            except Exception as e:
                raise UserError(f"cannot read {what}: {_reason(e)}") from e
            yield row
    finally:
        if hasattr(it, "close"):
            it.close()  # an abandoned datasets iterator can abort the interpreter at exit (pyarrow threads)


def _text(row: dict, field: str, where: str) -> str:
    text = row.get(field)
    if not isinstance(text, str):
        raise UserError(f"{where} has no text field {field!r} (fields: {', '.join(row) or 'none'}): pass --text-field NAME")
    return text


def file_documents(paths: Iterable, text_field: str = "text") -> Iterator[str]:
    """Documents of local files, in order: a whole .txt file is one document; .jsonl/.json/.parquet rows give `text_field`."""
    paths = [Path(p) for p in paths]
    for p in paths:  # check every file up front, not after tokenizing the ones before it
        if not p.is_file():
            raise UserError(f"input file {p} does not exist" if not p.exists() else f"input {p} is not a file")
        if p.suffix.lower() not in LOADERS:
            raise UserError(f"{p}: unsupported file type '{p.suffix}': use .txt (one document per file), .jsonl/.json/.parquet")
    return _file_documents(paths, text_field)


def _datasets():
    import datasets  # imported late: ~1 s that --help and argument errors should not pay

    # we turn datasets' failures into one `error:` line; its own logger would print them a second time, longer
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    return datasets


def _file_documents(paths: list[Path], text_field: str) -> Iterator[str]:
    datasets = _datasets()

    for p in paths:
        kind = LOADERS[p.suffix.lower()]
        if kind == "json" and p.stat().st_size == 0:
            continue  # no rows; datasets would fail on it with a bare StopIteration
        kw = {"sample_by": "document"} if kind == "text" else {}  # the text builder would otherwise make one row per line
        try:
            ds = datasets.load_dataset(kind, data_files=str(p), split="train", streaming=True, **kw)
        except Exception as e:
            raise UserError(f"cannot read {p} as {kind}: {_reason(e)}") from e
        field = "text" if kind == "text" else text_field
        for i, row in enumerate(_rows(ds, str(p))):
            yield _text(row, field, f"{p} row {i + 1}")


def fineweb_documents(dataset: str = FINEWEB, name: str = "sample-10BT", max_docs: int | None = None) -> Iterator[str]:
    """Stream the `text` of a hub dataset's train split (or a local dataset dir laid out like the hub repo)."""
    datasets = _datasets()

    local = Path(dataset).is_dir()
    try:
        ds = datasets.load_dataset(dataset, name=name, split="train", streaming=True)
    except Exception as e:
        what = f"load {dataset} ({name})" if local else f"reach the Hugging Face hub to stream {dataset} ({name})"
        fix = "check --name" if local else "check network access, --dataset and --name, or pass --dataset LOCAL_DIR"
        raise UserError(f"cannot {what}: {_reason(e)}; {fix}") from e

    def docs():
        rows = _rows(ds, f"{dataset} ({name})")
        try:
            for i, row in enumerate(rows):
                if max_docs is not None and i >= max_docs:
                    break
                yield _text(row, "text", f"{dataset} ({name}) row {i + 1}")
        finally:
            rows.close()

    return docs()


@cli_main
def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="python -m job.prepare", description=__doc__.split("\n\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="output directory for the .npy shards")
    common.add_argument("--shard-size", type=int, default=SHARD_SIZE, help=f"tokens per shard (default {SHARD_SIZE:,})")
    common.add_argument("--prefix", help="shard file name prefix (default: data for text, edufineweb for fineweb-edu)")
    common.add_argument("--workers", type=int, default=os.cpu_count(), help="tokenizer processes (default: all cores)")
    common.add_argument("--overwrite", action="store_true", help="replace the shards already in --out")
    sub = parser.add_subparsers(dest="source", required=True)
    t = sub.add_parser("text", parents=[common], help="local .txt/.jsonl/.json/.parquet files")
    t.add_argument("files", nargs="+", help=".txt: one document per file; .jsonl/.json/.parquet: one per row")
    t.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.json/.parquet rows (default: text)")
    f = sub.add_parser("fineweb-edu", parents=[common], help="stream FineWeb-Edu from the Hugging Face hub")
    f.add_argument("--dataset", default=FINEWEB, help="hub dataset id or local dataset dir")
    f.add_argument("--name", default="sample-10BT", help="dataset config (default: sample-10BT)")
    f.add_argument("--max-docs", type=int, help="stop after this many documents")
    args = parser.parse_args(argv)

    if args.source == "text":
        docs = file_documents(args.files, args.text_field)
        source = args.files[0] if len(args.files) == 1 else f"the {len(args.files)} input files"
    else:
        if args.max_docs is not None and args.max_docs < 1:
            raise UserError(f"--max-docs must be at least 1, got {args.max_docs}")
        check_out_dir(args.out, args.overwrite)  # fail before the (slow) dataset resolution, not after
        docs, source = fineweb_documents(args.dataset, args.name, args.max_docs), f"{args.dataset} ({args.name})"
    prefix = args.prefix or PREFIXES[args.source]
    return prepare_documents(docs, args.out, args.shard_size, prefix, args.workers, args.overwrite, source)


if __name__ == "__main__":
    main()
