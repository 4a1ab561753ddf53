"""job.export: a checkpoint becomes a Hugging Face GPT-2 directory that transformers loads offline with the same logits
and the same token ids; --init-from hf:DIR trains on from such a directory."""

import json
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers/huggingface_hub read these at import: never reach for the hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from conftest import assert_one_line_error, events, run_cli, train_cmd  # noqa: E402
from job import recipes  # noqa: E402
from job.config import parse_args  # noqa: E402
from job.data import ShardLoader  # noqa: E402
from job.errors import UserError  # noqa: E402
from job.export import export  # noqa: E402
from job.hf import OUTPUT_FILES, gpt2_vocab_and_merges  # noqa: E402
from job.model import GPT, GPTConfig  # noqa: E402
from job.recipes.gpt2 import GPT2  # noqa: E402
from job.recipes.gpt2 import PRESETS as GPT2_PRESETS  # noqa: E402
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
        (["--preset", "tiny", "--init-from", f"hf:{out}"], "pass --n-layer 2 --n-head 2 --n-embd 64 --block-size 64 --seq-len 64 "
                                                           "--total-batch-tokens 512$"),
        ([*small[:-6], "--block-size", "128", "--seq-len", "32", "--micro-batch", "4", "--total-batch-tokens", "128",
          "--init-from", f"hf:{out}"], "fewer than this run's block size 128: pass --block-size 64$"),
    ]:
        with pytest.raises(UserError, match=want):
            parse_args(args)


def hf_config(tmp_path, name: str, exported, **sizes) -> str:
    """hf:DIR of an exported model's config.json with other sizes (what --init-from checks before it reads weights)."""
    d = tmp_path / name
    d.mkdir()
    config = json.loads((exported / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "n_positions": 1024, **sizes}))
    (d / "model.safetensors").write_bytes(b"")
    return f"hf:{d}"


def advice(args: list[str], world_size: int = 1) -> tuple[str, list[str], str | None]:
    """The line --init-from of another shape gives, the flags it says to pass, and the preset it offers instead."""
    with pytest.raises(UserError) as e:
        parse_args(args, world_size=world_size)
    line = str(e.value)
    m = re.search(r": pass (--[^(]*?)( \(or --preset (\S+), which has that shape\))?$", line)
    assert m, line
    return line, m.group(1).split(), m.group(3)


@pytest.mark.parametrize("run, world_size, sizes", [
    (["--preset", "tiny"], 1, dict(n_layer=2, n_head=2, n_embd=64, n_positions=64)),  # a smaller block: shorter sequences
    # on two ranks, with a validation set of its own length and size: shorter, and as many batches
    (["--preset", "tiny", "--total-batch-tokens", "4096", "--val-seq-len", "128", "--val-tokens", "4096"], 2,
     dict(n_positions=32, n_layer=4, n_head=4, n_embd=128)),
    (["--preset", "gpt2"], 2, dict(n_layer=24, n_head=16, n_embd=1024)),  # gpt2-medium's shape: its preset is offered too
    (["--preset", "tiny"], 1, dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50400)),
])
def test_the_init_from_advice_is_what_the_next_run_takes(exported, tmp_path, run, sizes, world_size):
    """A model of another shape is every difference in one line, and the flags it names are the next run's: the same
    command with them added is accepted, with that model's shape; a preset it names instead is accepted too."""
    spec = hf_config(tmp_path, "other", exported[1], **sizes)
    args = [*run, "--init-from", spec]
    line, flags, preset = advice(args, world_size)
    cfg = parse_args([*args, *flags], world_size=world_size)
    want = {k: v for k, v in sizes.items() if k in ("n_layer", "n_head", "n_embd")}
    assert {k: getattr(cfg, k) for k in want} == want
    assert cfg.block_size <= sizes.get("n_positions", 1024) and cfg.vocab_size >= sizes.get("vocab_size", 50257)
    if preset is not None:
        assert {k: getattr(parse_args(["--preset", preset, "--init-from", spec], world_size=world_size), k) for k in want} == want
    assert (preset == "gpt2-medium") == (sizes.get("n_embd") == 1024), line


def test_a_run_given_the_init_from_advice_trains_from_that_model(exported, shards, tmp_path):
    """Through the trainer's command line: a run of another depth and a longer block is told, in one line, what fits the
    export, and the same command with those flags added starts from its weights and trains."""
    _, out = exported
    log = tmp_path / "log"
    other = ["--n-layer", 3, "--block-size", 128, "--seq-len", 128, "--total-batch-tokens", 1024, "--init-from", f"hf:{out}"]
    line = assert_one_line_error(run_cli(*train_cmd(shards, log, *other)), "--init-from", "that model has 2 layers")
    assert line.endswith(": pass --n-layer 2 --block-size 64 --seq-len 64 --total-batch-tokens 512"), line
    assert not log.exists()
    flags = line.split(": pass ")[1].split()
    proc = run_cli(*train_cmd(shards, log, *other, *flags, "--max-steps", 1), check=True)
    assert f"initialized the weights from hf:{out}" in proc.stdout and len(events(log, "train")) == 1


class Deep(GPT2):
    """The gpt2 recipe at one depth only, with presets of its own: what it refuses and which presets it has are its card's."""

    name = "deep"
    presets = {"deep": {**GPT2_PRESETS["tiny"], "n_layer": 12}, "deep-wide": {**GPT2_PRESETS["tiny"], "n_layer": 12, "n_head": 12, "n_embd": 768}}

    def check(self, cfg, world_size):
        super().check(cfg, world_size)
        if cfg.n_layer != 12:
            raise UserError(f"--n-layer {cfg.n_layer}: the deep recipe has 12 layers: leave --n-layer out")


@pytest.fixture
def deep():
    recipes.register(Deep())
    yield
    recipes.unregister("deep")


def test_the_init_from_advice_names_only_what_the_chosen_recipe_takes(exported, tmp_path, deep):
    """Another recipe with --init-from: a shape it refuses is said to be refused, not offered as flags to pass; a shape
    it takes is offered as its flags, with its own preset of that shape (never another recipe's)."""
    two_layers = ["--recipe", "deep", "--init-from", hf_config(tmp_path, "two", exported[1], n_layer=2, n_head=2, n_embd=64)]
    with pytest.raises(UserError) as e:
        parse_args(two_layers)
    line = str(e.value)
    assert "the deep recipe cannot take that" in line and "the deep recipe has 12 layers" in line, line
    assert ": pass a model directory of this run's shape, or leave out --init-from" in line and "pass --n-layer" not in line, line
    gpt2_shape = ["--recipe", "deep", "--init-from", hf_config(tmp_path, "wide", exported[1], n_layer=12, n_head=12, n_embd=768)]
    line, flags, preset = advice(gpt2_shape)
    assert flags == ["--n-head", "12", "--n-embd", "768"] and preset == "deep-wide", line
    assert parse_args([*gpt2_shape, *flags]).n_embd == 768 and parse_args([*gpt2_shape, "--preset", preset]).n_embd == 768


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
