"""Tokenize documents into build-nanogpt shards, on all cores, resumably; or download shards already tokenized.

    python -m job.prepare finewebedu-gpt2 --out DIR [--train-tokens N]  # downloads kjj0/finewebedu10B-gpt2 (.bin; also fineweb-gpt2)
    python -m job.prepare fineweb --out DIR            # HuggingFaceFW/fineweb, tokenized here like fineweb-edu
    python -m job.prepare fineweb-edu --out DIR [--name sample-10BT]   # streams HuggingFaceFW/fineweb-edu from the hub
    python -m job.prepare fineweb-edu --data-files PARQUET... --out DIR  # the same from local parquet files (a downloaded copy)
    python -m job.prepare text FILES... --out DIR      # .txt (one document per file), .jsonl/.json/.parquet (one per row)
    python -m job.prepare verify DIR                   # check every shard (dtype, size, EOT structure, manifest hashes)

The shards are what karpathy's build-nanogpt fineweb.py writes: flat uint16 .npy files, every document preceded
by <|endoftext|>, documents packed in order into shards of `shard_size` tokens (a document that overflows finishes
the shard and its remainder starts the next), the first shard is val, the rest are train, and the last, partial
shard is written too. Same input, same bytes, whatever --workers. The val shard is sized to the corpus (split.py):
a full shard for a large corpus, as fineweb.py, but never so much of a small one that nothing is left to train on.

Every shard is committed on its own (temp name, fsync, rename) and recorded in DIR/manifest.json with
its token count, sha256 and the document range it covers. Until the val split is decided, the tokens are
committed the same way as staged shards (`{prefix}_pending_*.npy`), which the shards are then cut from: memory
holds the shard being filled and the one being written, never the corpus. Running the same command again after an
interruption keeps the committed shards and restarts at the first missing one; a finished run is left
as it is. A file whose name the manifest does not list is never a shard the run vouches for.

One module per concern:
    sources   the documents: text files, local parquet, a hub dataset streamed through `datasets`
    encode    the tokenizer worker pool
    split     how many tokens the val shard takes
    pipeline  prepare(): source -> pool -> shards, in order, resumable
    staged    the staged shards read back, and where a position lies in the documents, to cut shards from them
    writer    committing a shard (atomic write, then the manifest)
    manifest  the output directory and its manifest, and what a resume keeps of it
    progress  the progress bar or log lines
    verify    `verify DIR`
    hub       downloading llm.c .bin shards from the Hugging Face hub (fineweb-gpt2, finewebedu-gpt2)
    cli       the command line (`python -m job.prepare`)
"""

from job.prepare.cli import main
from job.prepare.common import BATCH_DOCS, MANIFEST, PREFIXES, SHARD_SIZE, default_workers
from job.prepare.manifest import check_out_dir, read_manifest
from job.prepare.pipeline import prepare, prepare_documents
from job.prepare.sources import FINEWEB, MemorySource, Source, _datasets, file_source, fineweb_source, parquet_files
from job.prepare.split import val_size
from job.prepare.verify import verify
from job.prepare.writer import DELAY_ENV

__all__ = ["BATCH_DOCS", "DELAY_ENV", "FINEWEB", "MANIFEST", "PREFIXES", "SHARD_SIZE", "MemorySource", "Source", "_datasets",
           "check_out_dir", "default_workers", "file_source", "fineweb_source", "main", "parquet_files", "prepare",
           "prepare_documents", "read_manifest", "val_size", "verify"]
