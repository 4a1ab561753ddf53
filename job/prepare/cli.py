"""The command line: `python -m job.prepare text|fineweb-edu|fineweb|fineweb-gpt2|finewebedu-gpt2|verify ...` (see
job/prepare/__init__.py)."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

from job import contract
from job.errors import ArgumentParser, UserError, cli_main, float_arg, int_arg
from job.prepare.common import BATCH_DOCS, PREFIXES, SHARD_SIZE
from job.prepare.hub import WORKERS, download
from job.prepare.manifest import check_out_dir
from job.prepare.pipeline import prepare
from job.prepare.sources import FINEWEB, FINEWEB_ALL, Source, file_source, fineweb_source, parquet_files
from job.prepare.split import VAL_MIN
from job.prepare.verify import verify

DESCRIPTION = "Tokenize documents into build-nanogpt shards, on all cores, resumably."


def _parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m job.prepare", description=DESCRIPTION)
    common = ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="output directory for the .npy shards and manifest.json")
    common.add_argument("--shard-size", type=int, default=SHARD_SIZE,
                        help=f"tokens per shard (default {SHARD_SIZE:,}); the first shard, val, takes a tenth of the corpus "
                             f"but at least {VAL_MIN:,} tokens and at most one shard")
    common.add_argument("--prefix", help="shard file name prefix (default: data for text, edufineweb for fineweb-edu)")
    common.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    common.add_argument("--batch-docs", type=int, default=BATCH_DOCS, help=f"documents per tokenizer task (default {BATCH_DOCS})")
    common.add_argument("--progress-every", type=float_arg(minimum=0), default=30.0, metavar="SECONDS",
                        help="when stderr is not a terminal, print a progress line this often (default 30; 0: every batch)")
    common.add_argument("--overwrite", action="store_true", help="delete the shards already in --out and start over")
    sub = parser.add_subparsers(dest="source", required=True)
    t = sub.add_parser("text", parents=[common], help="local .txt/.jsonl/.json/.parquet files")
    t.add_argument("files", nargs="+", help=".txt: one document per file; .jsonl/.json/.parquet: one per row")
    t.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.json/.parquet rows (default: text)")
    t.add_argument("--paragraphs", action="store_true",
                   help="a .txt file is one document per paragraph (text between blank lines), each after <|endoftext|>")
    for name, dataset in (("fineweb-edu", FINEWEB), ("fineweb", FINEWEB_ALL)):
        f = sub.add_parser(name, parents=[common], help=f"{dataset} tokenized here, streamed from the Hugging Face hub or local parquet")
        f.add_argument("--dataset", default=None, help=f"hub dataset id or local dataset dir (default {dataset})")
        f.add_argument("--name", default="sample-10BT", help="dataset config (default: sample-10BT)")
        f.add_argument("--data-files", nargs="+", metavar="PATH",
                       help="read these local parquet files (files, dirs or globs, in order) instead of the hub")
        f.add_argument("--max-docs", type=int, help="stop after this many documents")
    for name, spec in contract.HUB_SHARDS.items():
        h = sub.add_parser(name, help=f"download {spec.repo}: {spec.tokenize} already tokenized for GPT-2 (.bin shards)")
        h.add_argument("--out", required=True, help="output directory for the .bin shards and manifest.json")
        h.add_argument("--train-tokens", type=int_arg(minimum=1), default=None, metavar="N",
                       help="download train shards until they hold N tokens (default: all of them)")
        h.add_argument("--workers", type=int_arg(minimum=1), default=WORKERS, help=f"files downloaded at once (default {WORKERS})")
        h.add_argument("--overwrite", action="store_true", help="delete the shards already in --out and start over")
    v = sub.add_parser("verify", help="check every shard of a prepared directory")
    v.add_argument("dir", help="the --out of a prepare run (or any directory of build-nanogpt shards)")
    return parser


def _fineweb(args) -> Source:
    if args.max_docs is not None and args.max_docs < 1:
        raise UserError(f"--max-docs must be at least 1, got {args.max_docs}")
    if args.data_files and args.dataset:
        raise UserError("--data-files and --dataset are two different sources: pass one of them")
    check_out_dir(args.out, args.overwrite)  # fail before the (slow) dataset resolution, not after
    if args.data_files:
        source = file_source(parquet_files(args.data_files), "text", label="the --data-files")
        source.max_docs = args.max_docs
        return source
    return fineweb_source(args.dataset or (FINEWEB if args.source == "fineweb-edu" else FINEWEB_ALL), args.name, args.max_docs)


def _stop_on_sigterm(signum, frame):
    # `docker stop` sends SIGTERM: stop like Ctrl-C, so the shards already handed to the writer are committed
    raise KeyboardInterrupt


@cli_main
def main(argv: list[str] | None = None) -> list[Path] | bool:
    args = _parser().parse_args(argv)
    if args.source == "verify":
        good = verify(args.dir)
        if not good:
            sys.exit(1)
        return good
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
    if args.source in contract.HUB_SHARDS:
        return download(args.source, args.out, args.train_tokens, args.overwrite, args.workers)
    source = file_source(args.files, args.text_field, paragraphs=args.paragraphs) if args.source == "text" else _fineweb(args)
    prefix = args.prefix or PREFIXES[args.source]
    return prepare(source, args.out, args.shard_size, prefix, args.workers, args.overwrite, args.batch_docs, args.progress_every)
