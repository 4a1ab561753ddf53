"""scripts/compare_recipes.py: the three recipes train the same tokens, are evaluated on the same validation tokens,
and come out as one table; its mistakes are one line each. Timings are never asserted, only that they are there."""

import json
import re

import pytest

from conftest import ROOT, assert_one_line_error, events, run_cli, script_module
from job.config import from_dict

SCRIPT = str(ROOT / "scripts" / "compare_recipes.py")
RECIPES = ("gpt2", "speedrun", "speedrun-2025-05-24")
# Each tiny preset narrowed so that a step takes a fraction of a second: gpt2 and the 2025-05-24 speedrun at 256 tokens a
# step, the 2026-07-17 speedrun's stages at 128, 256 and 384 tokens a step.
NARROW = {
    "gpt2": "--n-layer 2 --n-head 2 --n-embd 64 --block-size 64 --seq-len 32 --micro-batch 4 --total-batch-tokens 256 "
            "--warmup-steps 2",
    "speedrun": "--n-embd 32 --block-size 256 --batch-divisor 1024 --seq-len 48 --total-batch-tokens 384 --val-seq-len 128",
    "speedrun-2025-05-24": "--n-head 1 --n-embd 64 --block-size 256 --seq-len 128 --total-batch-tokens 256 --val-seq-len 256",
}
TOKENS, VAL_TOKENS = 1536, 512
NUM = r"[\d,]+(?:\.\d+)?"


def extra_flags() -> list[str]:
    return [a for name, flags in NARROW.items() for a in ("--extra", f"{name}={flags}")]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    proc = run_cli(SCRIPT, "--tokens", TOKENS, "--val-tokens", VAL_TOKENS, "--evals", 2, "--sample-tokens", 6,
                   "--out", out / "runs", "--json", out / "cmp.json", *extra_flags(), check=True, timeout=900)
    return proc.stdout, json.loads((out / "cmp.json").read_text()), out / "runs"


@pytest.mark.slow  # three training runs
def test_the_table_has_a_row_per_recipe_and_a_column_per_figure(compared):
    text, res, _ = compared
    marks = res["marks"]
    head = next(line for line in text.splitlines() if line.startswith("recipe"))
    assert head.split() == ["recipe", "tokens", "steps", *[f"val@{m:,}" for m in marks], "final", "val", "wall", "s", "train",
                            "s", "tok/s"]
    row = re.compile(rf"^(\S+)\s+({NUM})\s+(\d+)" + rf"\s+({NUM})" * (len(marks) + 4) + "$")
    rows = {m.group(1): m.groups()[1:] for line in text.splitlines() if (m := row.match(line))}
    assert set(rows) == set(RECIPES), text
    for name, cells in rows.items():
        r = res["runs"][name]
        assert int(cells[0].replace(",", "")) == r["trained_tokens"] == r["train_tokens"]
        assert int(cells[1]) == r["steps"]["max_steps"]
        assert float(cells[-4]) == pytest.approx(r["final_val"], abs=1e-4)
        assert all(float(c.replace(",", "")) > 0 for c in cells[-3:])  # wall, train seconds, tok/s: there, not judged
        assert r["final_val"] < r["evals"][0]["loss"]  # it learned something
    # Marks at a quarter, half and three quarters of the fewest tokens trained; each recipe's loss there lies between
    # its evaluations around the mark.
    fewest = min(r["trained_tokens"] for r in res["runs"].values())
    assert marks == [round(f * fewest) for f in (0.25, 0.5, 0.75)]
    for r in res["runs"].values():
        for mark, loss in zip(marks, r["at_marks"], strict=True):
            before = max((e for e in r["evals"] if e["tokens"] <= mark), key=lambda e: e["tokens"])
            after = min((e for e in r["evals"] if e["tokens"] >= mark), key=lambda e: e["tokens"])
            assert min(before["loss"], after["loss"]) <= loss <= max(before["loss"], after["loss"])


@pytest.mark.slow
def test_every_recipe_trains_the_tokens_closest_to_the_request(compared):
    _, res, out = compared
    for name in ("gpt2", "speedrun-2025-05-24"):  # 256 tokens a step: six steps
        assert res["runs"][name]["steps"] == {"max_steps": 6} and res["runs"][name]["trained_tokens"] == TOKENS
    run = res["runs"]["speedrun"]
    base = from_dict({"recipe": "speedrun", "preset": "tiny", "batch_divisor": 1024, "n_embd": 32, "block_size": 256,
                      "seq_len": 48, "total_batch_tokens": 384})
    card = base.card
    closest = min(abs(card.train_tokens(base.replace(scheduled_steps=s, extension_steps=e, max_steps=s + e)) - TOKENS)
                  for s in range(3, 20) for e in range(1, 20))
    assert abs(run["trained_tokens"] - TOKENS) == closest
    steps = run["steps"]
    assert steps["max_steps"] == steps["scheduled_steps"] + steps["extension_steps"]
    # What the trainer logged is what was planned.
    for name, r in res["runs"].items():
        train = events(out / name, "train")
        assert len(train) == r["steps"]["max_steps"] and sum(e["tokens"] for e in train) == r["trained_tokens"]


@pytest.mark.slow
def test_every_recipe_is_evaluated_on_the_same_validation_tokens(compared):
    text, res, out = compared
    data = {events(out / name, "start")[0]["config"]["data_dir"] for name in RECIPES}
    assert len(data) == 1  # the same shards...
    for name in RECIPES:
        cfg = from_dict({k: v for k, v in events(out / name, "start")[0]["config"].items()})
        seq = cfg.val_seq_len or cfg.seq_len
        batches = cfg.val_tokens // (cfg.micro_batch * seq) if cfg.val_tokens else cfg.val_steps
        assert batches * cfg.micro_batch * seq == VAL_TOKENS  # ...and the first VAL_TOKENS of their val shard
        assert res["runs"][name]["val_seq_len"] == seq
        # One evaluation before training, then every eval_every steps and at the end.
        r = res["runs"][name]
        every, last = r["eval_every"], r["steps"]["max_steps"]
        assert [e["step"] for e in r["evals"]] == sorted({*range(0, last, every), last})
    assert f"validation: the first {VAL_TOKENS} tokens of the val shard for every recipe, in sequences of 32 (gpt2, across " \
           "documents), 128 (speedrun, within each document), 256 (speedrun-2025-05-24, within each document)" in text


@pytest.mark.slow
def test_each_final_checkpoint_gives_two_samples_of_the_prompt(compared):
    text, res, _ = compared
    for name in RECIPES:
        r = res["runs"][name]
        if "samples_error" in r:  # a model that cannot sample says so in the report, and costs only its samples
            assert f"{name}: sampling failed: {r['samples_error']}" in text
            continue
        assert len(r["samples"]) == 2 and all(s.startswith("ROMEO:") for s in r["samples"]), r["samples"]
        assert r["samples"][0] != r["samples"][1]
        for i, s in enumerate(r["samples"]):
            assert f"{name} {i}: {s!r}" in text
    assert {"samples"} <= set(res["runs"]["gpt2"]) and {"samples"} <= set(res["runs"]["speedrun-2025-05-24"])


@pytest.mark.parametrize("args, needle", [
    (["--tokens", "0"], "argument --tokens: must be at least 1, got '0'"),
    (["--tokens", "lots"], "argument --tokens: takes a whole number, got 'lots'"),
    (["--val-tokens", "1000"], "--val-tokens 1000 is not a whole number of the gpt2 recipe's validation batches"),
    (["--recipes", "gpt2,gpt3"], "--recipes 'gpt2,gpt3': choose from"),
    (["--extra", "gpt3=--n-layer 2"], "--extra 'gpt3=--n-layer 2': expected RECIPE=FLAGS"),
    (["--extra", "speedrun=--max-lr 0.1"], "the speedrun run: --max-lr is a setting of the gpt2 recipe"),
])
def test_mistakes_are_one_clear_line(tmp_path, args, needle):
    proc = run_cli(SCRIPT, "--out", tmp_path / "runs", *args)
    assert proc.returncode == 2
    assert needle in assert_one_line_error(proc)
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_an_unwritable_or_used_out_is_one_line_and_nothing_is_overwritten(tmp_path):
    (tmp_path / "file").write_text("kept")
    proc = run_cli(SCRIPT, "--out", tmp_path / "file" / "runs")
    assert proc.returncode == 2
    assert "--out" in assert_one_line_error(proc, "is a file, not a directory")
    assert (tmp_path / "file").read_text() == "kept"

    used = tmp_path / "used"
    (used / "speedrun").mkdir(parents=True)
    (used / "speedrun" / "train.log").write_text("an earlier run")
    proc = run_cli(SCRIPT, "--out", used)
    assert proc.returncode == 2
    assert_one_line_error(proc, f"--out {used} already holds a run of speedrun", "choose another --out")
    assert (used / "speedrun" / "train.log").read_text() == "an earlier run"
    assert sorted(p.name for p in used.iterdir()) == ["speedrun"]


def test_the_staged_split_is_the_closest_and_nearest_the_presets_ratio():
    compare = script_module("compare_recipes")
    cfg = compare.recipe_config("speedrun", [])
    steps, tokens = compare.staged_steps(cfg, 20_000)
    card = cfg.card
    assert card.train_tokens(cfg.replace(**steps)) == tokens
    off = {(s, e): abs(card.train_tokens(cfg.replace(scheduled_steps=s, extension_steps=e, max_steps=s + e)) - 20_000)
           for s in range(3, 20_000 // 256 + 2) for e in range(1, 20_000 // 768 + 2)}
    assert abs(tokens - 20_000) == min(off.values())
    ratio = cfg.hp.extension_steps / cfg.hp.scheduled_steps
    ties = [s_e for s_e, d in off.items() if d == min(off.values())]
    assert abs(steps["extension_steps"] / steps["scheduled_steps"] - ratio) == min(abs(e / s - ratio) for s, e in ties)
