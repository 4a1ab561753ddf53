import shutil

import pytest

from job import tokenizer
from job.errors import UserError


def test_gpt2_encoding_matches_reference_ids():
    assert tokenizer.encode("Hello, I'm a language model,") == [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    enc = tokenizer.get_encoding()
    assert enc.n_vocab == 50257 and enc.eot_token == tokenizer.EOT == 50256
    assert tokenizer.decode(tokenizer.encode("Round trip: naïve café 123")) == "Round trip: naïve café 123"


def test_corrupt_tokenizer_file_is_refused(tmp_path):
    for name in tokenizer.FILES:
        shutil.copy(tokenizer.ASSET_DIR / name, tmp_path / name)
    tokenizer.verify_files(tmp_path)  # intact copies pass
    with open(tmp_path / "vocab.bpe", "ab") as f:
        f.write(b"x")
    with pytest.raises(UserError, match="vocab.bpe is corrupt"):
        tokenizer.verify_files(tmp_path)
    shutil.copy(tokenizer.ASSET_DIR / "vocab.bpe", tmp_path / "vocab.bpe")
    (tmp_path / "encoder.json").unlink()
    with pytest.raises(UserError, match="missing"):
        tokenizer.verify_files(tmp_path)
