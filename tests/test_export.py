"""job.export: a checkpoint becomes a Hugging Face GPT-2 directory that transformers loads offline with the same logits
and the same token ids; --init-from hf:DIR trains on from such a directory."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers/huggingface_hub read these at import: never reach for the hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from conftest import assert_one_line_error, events, run_cli, train_cmd  # noqa: E402
from job.config import parse_args  # noqa: E402
from job.data import ShardLoader  # noqa: E402
from job.errors import UserError  # noqa: E402
from job.export import export  # noqa: E402
from job.hf import OUTPUT_FILES, gpt2_vocab_and_merges  # noqa: E402
from job.model import GPT, GPTConfig  # noqa: E402
from job.tokenizer import ASSET_DIR, encode  # noqa: E402

transformers = pytest.importorskip("transformers", reason="transformers (requirements-dev.txt) loads the exported directory")

TEXTS = [
    "Hello, I'm a language model,",
    "naïve café — 日本語 🚀\n\n\ttabs and   three spaces, numbers 12345 and 3.14159",
    "Don't we'll you're THEY'VE it's; CamelCase snake_case http://example.org/?q=1&x=2",
    "   leading spaces and trailing newlines\n\n",
]


def test_tokenizer_files_are_openais():
    # derived from tiktoken's rank table, they must be byte for byte OpenAI's encoder.json and vocab.bpe
    vocab, merges = gpt2_vocab_and_merges()
    assert vocab == json.loads((ASSET_DIR / "encoder.json").read_text(encoding="utf-8"))
    assert ["#version: 0.2", *merges, ""] == (ASSET_DIR / "vocab.bpe").read_text(encoding="utf-8").split("\n")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small random GPT saved as the trainer saves checkpoints, and its export."""
    d = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64))
    torch.save({"model": model.state_dict(), "config": model.config.to_dict(), "step": 10, "val_loss": 7.5}, d / "model_00010.pt")
    out = export(d, d / "hf")  # a log dir stands for its newest checkpoint
    return model.eval(), out


def test_transformers_loads_it_with_the_same_logits(exported):
    model, out = exported
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES)
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert hf.config.n_positions == 64 and hf.config.vocab_size == 50257
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied, as in GPT-2
    idx = torch.tensor([encode(TEXTS[0] + " " + TEXTS[2])[:64]])
    with torch.no_grad():
        ours = model(idx)[0][..., :50257]  # our vocabulary is padded to 50304; the export keeps GPT-2's 50257
        theirs = hf(idx).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_autotokenizer_gives_our_ids(exported):
    _, out = exported
    tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert tok(text)["input_ids"] == encode(text), text
        assert tok.decode(encode(text)) == text
    assert tok.eos_token_id == tok.bos_token_id == 50256 and tok.convert_ids_to_tokens(50256) == "<|endoftext|>"


def test_bfloat16_export(exported, tmp_path):
    model, _ = exported
    torch.save({"model": model.state_dict(), "config": model.config.to_dict(), "step": 1}, tmp_path / "model_00001.pt")
    out = export(tmp_path / "model_00001.pt", tmp_path / "bf16", dtype="bfloat16")
    hf = transformers.GPT2LMHeadModel.from_pretrained(out, dtype="auto")
    assert hf.transformer.wte.weight.dtype == torch.bfloat16
    torch.testing.assert_close(hf.transformer.h[1].mlp.c_fc.weight.float(), model.transformer.h[1].mlp.c_fc.weight.t().bfloat16().float())


def test_existing_export_needs_overwrite(exported, tmp_path):
    _, out = exported
    target = tmp_path / "target"
    target.mkdir()
    (target / "config.json").write_text("mine")
    (target / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="already holds config.json: pass --overwrite"):
        export(out.parent, target)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "notes.txt"] and (target / "config.json").read_text() == "mine"
    export(out.parent, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == sorted([*OUTPUT_FILES, "notes.txt"])
    assert json.loads((target / "config.json").read_text())["model_type"] == "gpt2"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind


def test_init_from_validation(exported, tmp_path):
    _, out = exported
    small = ["--preset", "tiny", "--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--block-size", "64", "--seq-len", "32",
             "--micro-batch", "4", "--total-batch-tokens", "128"]
    assert parse_args([*small, "--init-from", f"hf:{out}"]).hp.init_from == f"hf:{out}"
    for args, want in [
        ([*small, "--init-from", str(out)], "--init-from must be hf:DIR"),
        ([*small, "--init-from", f"hf:{tmp_path}/nowhere"], "is not a local directory"),
        ([*small, "--init-from", f"hf:{tmp_path}"], "has no config.json"),
        (["--preset", "tiny", "--init-from", f"hf:{out}"], "pass --n-layer 2 --n-head 2 --n-embd 64"),
        ([*small[:-6], "--block-size", "128", "--seq-len", "32", "--micro-batch", "4", "--total-batch-tokens", "128",
          "--init-from", f"hf:{out}"], "pass --block-size 64 or less"),
    ]:
        with pytest.raises(UserError, match=want):
            parse_args(args)


@pytest.mark.slow
def test_export_cli_then_init_from_continues_the_model(shards, tmp_path):
    # Train 10 steps, export the final checkpoint with the CLI, start a new run from the export: its val loss before any
    # step is the loss of the first run's final weights on the same val batches.
    first = tmp_path / "first"
    run_cli(*train_cmd(shards, first, "--max-steps", 10, "--checkpoint-every", 10), check=True)
    model = GPT(GPTConfig(**torch.load(first / "model_00010.pt", weights_only=True)["config"]))
    model.load_state_dict(torch.load(first / "model_00010.pt", weights_only=True)["model"])
    with torch.no_grad():
        # The export keeps GPT-2's 50257 rows; the import zeroes the padding rows up to 50304. Their logits still enter
        # our loss's softmax, so the loss to expect is that of the final weights with zero padding rows.
        model.transformer.wte.weight[50257:] = 0
        val = ShardLoader(shards, "val", 4, 32)  # conftest's SMALL: micro-batch 4, seq-len 32, val-steps 2
        want = sum(model(*val.next_batch())[1].item() for _ in range(2)) / 2
    hf = tmp_path / "hf"
    proc = run_cli("-m", "job.export", "--checkpoint", first, "--out", hf, check=True)
    assert f"to {hf}" in proc.stdout and "step 10" in proc.stdout
    second = tmp_path / "second"
    proc = run_cli(*train_cmd(shards, second, "--max-steps", 1, "--init-from", f"hf:{hf}"), check=True)
    assert f"initialized the weights from hf:{hf}" in proc.stdout
    assert events(second, "val")[0]["step"] == 0
    assert events(second, "val")[0]["loss"] == pytest.approx(want, abs=1e-5)
    # a mistake is one line and nothing runs
    assert_one_line_error(run_cli(*train_cmd(shards, tmp_path / "third", "--init-from", f"hf:{tmp_path}/nowhere")),
                          "--init-from", "not a local directory")
    assert not (tmp_path / "third").exists()
    assert_one_line_error(run_cli("-m", "job.export", "--checkpoint", first, "--out", hf), "already holds", "--overwrite")


def test_init_from_hub_id_only_from_the_local_cache(exported, tmp_path):
    # hf:ORG/NAME resolves through the Hugging Face cache (as `hf download` leaves it) and never downloads
    _, out = exported
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "cache" / "models--ours--tiny" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for p in out.iterdir():
        (snapshot / p.name).write_bytes(p.read_bytes())
    (tmp_path / "cache" / "models--ours--tiny" / "refs").mkdir()
    (tmp_path / "cache" / "models--ours--tiny" / "refs" / "main").write_text(commit)
    code = "from job.hf import resolve_hf_dir; print(resolve_hf_dir('hf:ours/tiny'))"
    proc = run_cli("-c", code, check=True, HF_HUB_CACHE=tmp_path / "cache", HF_HUB_OFFLINE=1)
    assert proc.stdout.strip() == str(snapshot)
    proc = run_cli("-c", code.replace("ours/tiny", "gpt2"), HF_HUB_CACHE=tmp_path / "cache", HF_HUB_OFFLINE=1)
    assert proc.returncode != 0 and "gpt2 is not a local directory (and not in the Hugging Face cache)" in proc.stderr
