"""The 2026-07-17 record as a recipe: its tiny preset trains through the real entry point across a batch stage, its
checkpoints load with the state of their step, it is planned by the launcher, and it refuses the other speedrun's
checkpoints. That a killed or stopped run resumes exactly, on one rank or two, is tests/test_promises.py's (the recipe
is one of conftest's RECIPE_ARGS)."""

import shutil
from pathlib import Path

import pytest
import torch

from conftest import CORPUS, ROOT, SPEEDRUN_SMALL, events, run_cli, train_in_process
from job.checkpoint import load_model
from job.recipes import get
from job.tokenizer import encode

RECIPE = "speedrun"
# The tiny preset narrowed further: sequences of 32, 64 and 96 tokens, four scheduled steps and two of extension.
ARGS = ["--recipe", RECIPE, "--preset", "tiny", "--n-embd", "32", "--block-size", "256", "--batch-divisor", "512",
        "--scheduled-steps", "4", "--extension-steps", "2", "--max-steps", "6", "--val-seq-len", "128", "--val-tokens", "256",
        "--seq-len", "96", "--total-batch-tokens", "768", "--eval-every", "3", "--checkpoint-every", "3", "--sample-num", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def trained(doc_shards, tmp_path_factory):
    """The run's Trainer, whose model is the one that saved the last checkpoint."""
    return train_in_process([*ARGS, "--data-dir", doc_shards, "--log-dir", tmp_path_factory.mktemp("reference")])


@pytest.fixture(scope="module")
def reference(trained):
    return Path(trained.cfg.log_dir)


@pytest.mark.slow  # trains (its module fixture, or a run of the older port)
def test_the_tiny_preset_trains_across_a_batch_stage_and_its_loss_falls(reference):
    train = {e["step"]: e for e in events(reference, "train")}
    assert sorted(train) == list(range(6))
    assert [train[s]["stage"] for s in range(6)] == [0, 1, 1, 2, 3, 3]  # 4 scheduled steps: stages end at 1, 3, 4
    layouts = [get(RECIPE).step_layout(s, _cfg()).tokens for s in range(6)]
    assert layouts == [256, 512, 512, 768, 768, 768]  # the record's 8 sequences of 16K, 32K, 48K tokens / 512
    val = [e["loss"] for e in events(reference, "val")]
    assert len(val) == 3 and val[-1] < val[0]
    assert [e["adam"] for e in train.values()] == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]  # Adam on odd steps only
    # The first line says which attention ran: nothing is downloaded, a CPU takes torch's dense path.
    head = (reference / "train.log").read_text().splitlines()[0]
    assert "attention scaled_dot_product_attention over a dense mask" in head and "bf16 (no FP8 on this device)" in head


@pytest.mark.slow  # trains (its module fixture, or a run of the older port)
def test_a_checkpoint_loads_with_its_steps_windows_and_rotary_scaling(trained, reference):
    """load_model gives the model that saved the checkpoint, logits for logits: the last step's windows (the final
    validation's long window) and the rotary tables YaRN-scaled at every stage change, which are not in the weights."""
    saver = trained.model
    loaded, ck = load_model(reference / "model_00006.pt", "cpu")
    assert ck["step"] == 6 and loaded.forward_schedule.ws_long == saver.forward_schedule.ws_long == 20 * 128
    idx = torch.tensor(encode(CORPUS.read_text()[:2000])[:160]).view(2, 80)
    saver.eval()
    loaded.eval()
    with torch.no_grad():
        want = saver(idx)[0]
        assert torch.equal(loaded(idx)[0], want)
        get(RECIPE).model_schedule(loaded, 0, trained.cfg)  # the first step's windows and unscaled tables instead
        assert not torch.equal(loaded(idx)[0], want)


@pytest.mark.slow  # trains (its module fixture, or a run of the older port)
def test_each_speedrun_refuses_the_others_checkpoint_in_one_line(reference, doc_shards, tmp_path):
    log = tmp_path / "other"
    log.mkdir()
    shutil.copy(reference / "model_00006.pt", log)
    argv = ["--recipe", "speedrun-2025-05-24", "--preset", "tiny", "--data-dir", str(doc_shards), "--log-dir", str(log), "--device", "cpu"]
    p = run_cli("-m", "job.train", *argv)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), p.stderr
    assert f"--recipe {RECIPE}" in lines[0]


@pytest.mark.slow  # trains (its module fixture, or a run of the older port)
def test_a_checkpoint_of_the_older_port_is_refused_naming_its_recipe_even_under_its_old_name(doc_shards, tmp_path):
    """The 2025-05-24 port was `--recipe speedrun` before the current record took the name: its checkpoints of then say
    "speedrun", and `--recipe speedrun` must still send them to `--recipe speedrun-2025-05-24`."""
    log = tmp_path / "older"
    train_in_process([*SPEEDRUN_SMALL, "--max-steps", "1", "--checkpoint-every", "1", "--eval-every", "0", "--data-dir", doc_shards,
                      "--log-dir", log])
    path = log / "model_00001.pt"
    ck = torch.load(path, map_location="cpu", weights_only=True)
    assert ck["train_config"]["recipe"] == "speedrun-2025-05-24"
    ck["train_config"]["recipe"] = "speedrun"  # as that port wrote it under its old name
    torch.save(ck, path)
    before = path.read_bytes()
    argv = ["--recipe", RECIPE, "--preset", "tiny", "--data-dir", str(doc_shards), "--log-dir", str(log), "--device", "cpu"]
    p = run_cli("-m", "job.train", *argv)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), p.stderr
    assert "--recipe speedrun-2025-05-24" in lines[0] and path.read_bytes() == before


def test_the_launcher_reads_the_records_run_from_its_card():
    from infra.container import Job

    job = Job(recipe=RECIPE)
    assert job.preset == "gpt2" and job.run_steps() == 1390
    assert job.cfg.hp.scheduled_steps == 1380 and job.cfg.hp.batch_divisor == 1
    published = get(RECIPE).published
    assert published.on == "gpu_8x_h100_sxm5" and published.step_seconds * 1390 == pytest.approx(79.7)
    tokens = get(RECIPE).train_tokens(job.cfg)
    assert tokens == 8 * (460 * 16384 + 460 * 32768 + 470 * 49152)  # stages end at 460, 920, 1380, then 10 more


def _cfg():
    from job.config import parse_args

    return parse_args(ARGS + ["--data-dir", str(ROOT)], files=False)



