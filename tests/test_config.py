"""Config defaults, overrides, and every bad input of the trainer giving one clear line (real CLI runs)."""

import shutil

import numpy as np
import pytest

from conftest import assert_one_line_error, run_cli, train_cmd
from job.config import TrainConfig, parse_args
from job.data import write_shard
from job.errors import UserError


def test_defaults_are_build_nanogpt_gpt2_run():
    c = parse_args([])
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size) == (12, 12, 768, 1024, 50304)
    assert (c.hp.max_lr, c.hp.min_lr_ratio, c.hp.warmup_steps, c.max_steps) == (6e-4, 0.1, 715, 19073)
    assert (c.hp.weight_decay, c.hp.beta1, c.hp.beta2, c.hp.eps, c.hp.grad_clip) == (0.1, 0.9, 0.95, 1e-8, 1.0)
    assert (c.micro_batch, c.seq_len, c.total_batch_tokens) == (64, 1024, 524288)
    assert c.data_dir == "/persistent/edu_fineweb10B"


def test_cli_overrides_beat_preset_defaults():
    c = parse_args(["--preset", "tiny", "--max-steps", "7", "--max-lr", "1e-3", "--data-dir", "/d", "--log-dir", "/l"])
    assert (c.n_layer, c.n_embd, c.max_steps, c.hp.max_lr, c.data_dir, c.log_dir) == (4, 128, 7, 1e-3, "/d", "/l")
    assert parse_args(["--preset", "gpt2-xl"]).n_embd == 1600
    assert isinstance(c, TrainConfig)


@pytest.mark.parametrize("argv, needle", [
    (["--bogus-knob", "1"], "--bogus-knob"),
    (["--max-steps", "ten"], "--max-steps"),
    (["--max-lr", "2"], "--max-lr"),
    (["--preset", "gpt5"], "gpt5"),
    (["--n-head", "5"], "divisible"),
    (["--seq-len", "2048"], "block size"),
    (["--total-batch-tokens", "500000"], "not divisible"),
    (["--device", "tpu"], "--device"),
    (["--recipe", "nope"], "--recipe"),
    (["--checkpoint-minutes", "nan"], "--checkpoint-minutes"),
    (["--max-lr", "inf"], "--max-lr"),
    (["--min-lr-ratio", "-inf"], "--min-lr-ratio"),
    # values the run would take and fail on only at its end (the samples after the last step) or hang on at its start
    (["--seed", str(2**64)], "--seed"),
    (["--seed", "-1"], "--seed"),
    (["--sample-seed", str(2**63)], "--sample-seed"),
    (["--sample-prompt", ""], "--sample-prompt"),
    (["--sample-tokens", "100001"], "--sample-tokens"),
    (["--sample-num", "1025"], "--sample-num"),
    (["--prefetch", "100000000"], "--prefetch"),
    (["--max-steps", str(10**20)], "--max-steps"),
    (["--n-layer", "100000000"], "--n-layer"),
    (["--log-dir", ""], "--log-dir"),
    (["--data-dir", ""], "--data-dir"),
])
def test_bad_values_raise_clear_errors(argv, needle, capsys):
    # Usage mistakes argparse finds (unknown flag, malformed value, a choice not offered) exit 2 after one error line;
    # the rest are UserErrors from validate(), which cli_main prints the same way.
    with pytest.raises((UserError, SystemExit)) as e:
        parse_args(argv)
    if isinstance(e.value, SystemExit):
        assert e.value.code == 2
        said = capsys.readouterr().err
        assert said.startswith("error: ") and len(said.strip().splitlines()) == 1
    else:
        said = str(e.value)
    assert needle in said


def test_the_limits_themselves_are_taken():
    c = parse_args(["--seed", str(2**63 - 1), "--sample-seed", "0", "--sample-tokens", "100000", "--prefetch", "64",
                    "--max-steps", "10000000", "--sample-num", "0", "--sample-prompt", ""])
    assert (c.seed, c.sample_tokens, c.prefetch, c.max_steps, c.sample_prompt) == (2**63 - 1, 100000, 64, 10**7, "")


def test_total_batch_must_divide_by_world_size():
    parse_args(["--micro-batch", "16", "--total-batch-tokens", "16384"], world_size=1)
    with pytest.raises(UserError, match="16 x 1024 x 3"):
        parse_args(["--micro-batch", "16", "--total-batch-tokens", "16384"], world_size=3)


@pytest.mark.parametrize("extra, needles", [
    (["--nonsense", "3"], ["--nonsense"]),
    (["--max-steps", "abc"], ["--max-steps", "whole number"]),
    (["--total-batch-tokens", "1000"], ["not divisible"]),
    (["--resume", "/no/such/model_00100.pt"], ["--resume", "does not exist"]),
    (["--resume", "/"], ["--resume / is a directory", "model_*.pt"]),
    (["--sdpa-backend", "cudnn"], ["--sdpa-backend cudnn needs a CUDA GPU", "use --sdpa-backend auto"]),
    (["--sdpa-backend", "efficient"], ["--sdpa-backend efficient needs a CUDA GPU"]),
    (["--sdpa-backend", "fast"], ["--sdpa-backend", "invalid choice"]),
    (["--compile-mode", "reduce-overhead"], ["--compile-mode", "invalid choice"]),
    (["--residual-dtype", "bfloat16"], ["--residual-dtype bfloat16 needs bf16 autocast", "--dtype bfloat16"]),
])
def test_trainer_cli_bad_input_is_one_line(tmp_path, shards, extra, needles):
    assert_one_line_error(run_cli(*train_cmd(shards, tmp_path / "log"), *extra), *needles)
    assert not (tmp_path / "log").exists()  # nothing written on bad input


def test_trainer_cli_missing_or_empty_data_dir(tmp_path):
    assert_one_line_error(run_cli(*train_cmd(tmp_path / "nope", tmp_path / "log")), "does not exist", "job.prepare")
    (tmp_path / "empty").mkdir()
    write_shard(tmp_path / "empty" / "a_train_000001.npy", np.arange(1000))
    assert_one_line_error(run_cli(*train_cmd(tmp_path / "empty", tmp_path / "log")), "no val shards", "job.prepare")


def test_trainer_cli_damaged_checkpoint_is_one_line(tmp_path, shards):
    bad = tmp_path / "model_00005.pt"
    bad.write_bytes(b"not a checkpoint")
    assert_one_line_error(run_cli(*train_cmd(shards, tmp_path / "log", "--resume", bad)), "cannot be read", "--resume")
    assert bad.read_bytes() == b"not a checkpoint"


def test_trainer_cli_truncated_or_foreign_shard_and_a_file_as_log_dir(tmp_path, shards):
    """A shard cut short by an interrupted copy (np.load would only say "mmap length is greater than file size"),
    a file that is no .npy at all, and --log-dir naming a file: each one line, before anything is written."""
    data = tmp_path / "data"
    shutil.copytree(shards, data)
    victim = sorted(data.glob("*train*.npy"))[0]
    full = victim.stat().st_size
    victim.write_bytes(victim.read_bytes()[: full // 2])
    assert_one_line_error(run_cli(*train_cmd(data, tmp_path / "log")), f"shard {victim} cannot be read: truncated "
                          f"({full // 2:,} bytes on disk, its header describes {full:,})", "job.prepare verify DIR")
    victim.write_text("not tokens")
    assert_one_line_error(run_cli(*train_cmd(data, tmp_path / "log")), f"shard {victim} cannot be read: not a .npy file (10 bytes)")
    assert not (tmp_path / "log").exists()
    (tmp_path / "file").write_text("notes")
    afile = tmp_path / "file"
    assert_one_line_error(run_cli(*train_cmd(shards, afile)), f"--log-dir {afile}: {afile} is a file, not a directory")
    assert (tmp_path / "file").read_text() == "notes"


def test_an_unknown_recipe_is_named_before_any_flag_is_judged_against_another():
    for argv in (["--recipe", "nope", "--muon-lr", "1"], ["--recipe=nope", "--max-lr", "1"]):
        with pytest.raises(UserError, match=r"^--recipe must be one of gpt2, speedrun, speedrun-2025-05-24, got 'nope'$"):
            parse_args(argv)
