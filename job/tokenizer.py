"""GPT-2 BPE through tiktoken, built from files shipped in the package (no network).

tiktoken's own `get_encoding("gpt2")` downloads vocab.bpe/encoder.json from OpenAI's blob store on
first use; the box and CI cannot reach it, so we build the identical Encoding from local copies and
check the same sha256 digests tiktoken checks.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

from job.errors import UserError

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "gpt2-tokenizer"
FILES = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
EOT = 50256  # <|endoftext|>; build-nanogpt puts it *before* every document
VOCAB_SIZE = 50257


def verify_files(directory: Path = ASSET_DIR) -> None:
    for name, digest in FILES.items():
        path = directory / name
        if not path.is_file():
            raise UserError(f"tokenizer file {path} is missing: reinstall the package (it ships job/assets/gpt2-tokenizer)")
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != digest:
            raise UserError(f"tokenizer file {path} is corrupt (sha256 {actual[:12]}..., expected {digest[:12]}...): restore it from the repository")


@functools.lru_cache(maxsize=1)
def get_encoding() -> tiktoken.Encoding:
    verify_files()
    # An empty TIKTOKEN_CACHE_DIR makes tiktoken read our files directly instead of copying them
    # into /tmp/data-gym-cache (the container's filesystem may be read-only).
    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(ASSET_DIR / "vocab.bpe"),
            encoder_json_file=str(ASSET_DIR / "encoder.json"),
            vocab_bpe_hash=FILES["vocab.bpe"],
            encoder_json_hash=FILES["encoder.json"],
        )
    finally:
        if saved is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = saved
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=VOCAB_SIZE,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT},
    )


def encode(text: str) -> list[int]:
    return get_encoding().encode_ordinary(text)


def decode(tokens) -> str:
    return get_encoding().decode(list(tokens))
