"""Background checkpoint writes: training is held only for the snapshot, files appear only when complete."""

import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, env, events, losses, run_cli, train_cmd, wait_for
from job import checkpoint as ckpt_lib
from job.model import GPT, GPTConfig
from job.optim import configure_optimizer

STEPS = 24


def trained_state():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32))
    opt = configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95), 1e-8, "cpu")
    model(torch.randint(0, 100, (2, 16)), torch.randint(0, 100, (2, 16)))[1].backward()
    opt.step()  # AdamW state exists
    return model, opt


def wait_for_temp(log_dir, step):
    """The writer thread has opened its temp file (it starts a moment after save() returns)."""
    deadline = time.time() + 30
    while not list(log_dir.glob(f".model_{step:05d}.pt.tmp*")):
        assert time.time() < deadline, "the background write never started"
        time.sleep(0.005)


def test_snapshot_is_what_gets_written_even_if_training_changes_the_model_meanwhile(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOGPT_TEST_SAVE_DELAY", "2")  # the write stays in flight while we "train"
    model, opt = trained_state()
    want = {k: v.clone() for k, v in model.state_dict().items()}
    want_m = opt.state_dict()["state"][0]["exp_avg"].clone()
    saver = ckpt_lib.AsyncSaver(tmp_path)
    held = saver.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 1}, 1)
    assert held["stall_s"] >= 0
    wait_for_temp(tmp_path, 1)
    assert ckpt_lib.list_checkpoints(tmp_path) == []  # half-written: not visible
    with torch.no_grad():  # training goes on in place, as the optimizer does
        for p in model.parameters():
            p.add_(1.0)
    opt.state[next(iter(opt.state))]["exp_avg"].add_(1.0)
    assert [d["step"] for d in saver.wait()] == [1]
    ck = torch.load(tmp_path / "model_00001.pt", weights_only=True)
    for k, v in want.items():
        assert torch.equal(ck["model"][k], v), k
    assert torch.equal(ck["optimizer"]["state"][0]["exp_avg"], want_m)
    # The tied embedding / output weight is one tensor in the file, as with a plain torch.save.
    assert ck["model"]["lm_head.weight"].data_ptr() == ck["model"]["transformer.wte.weight"].data_ptr()


def test_next_save_waits_for_the_previous_write(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOGPT_TEST_SAVE_DELAY", "1")
    model, _ = trained_state()
    saver = ckpt_lib.AsyncSaver(tmp_path, keep_last=1)
    saver.save({"model": model.state_dict()}, 1)
    wait_for_temp(tmp_path, 1)
    assert not ckpt_lib.list_checkpoints(tmp_path)
    held = saver.save({"model": model.state_dict()}, 2)
    # save(2) returned only after checkpoint 1 was complete (and reported), never two writes at once.
    assert [s for s, _ in ckpt_lib.list_checkpoints(tmp_path)] == [1] and held["wait_s"] > 0
    done = saver.poll() + saver.wait()
    assert [d["step"] for d in done] == [1, 2]
    assert [p.name for p in done[1]["removed"]] == ["model_00001.pt"]  # retention runs after the write too
    assert [s for s, _ in ckpt_lib.list_checkpoints(tmp_path)] == [2] and not list(tmp_path.glob(".*tmp*"))


def test_a_failed_background_write_is_raised_on_the_training_thread(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    saver = ckpt_lib.AsyncSaver(not_a_dir)
    saver.save({"step": 1}, 1)
    with pytest.raises(ckpt_lib.CheckpointWriteError, match=r"model_00001.pt could not be written to .*file: File exists$"):
        saver.wait()
    assert saver.wait() == []  # reported once


class NotPicklable:
    def __reduce__(self):
        raise TypeError("a bug: this object cannot be pickled")


def test_a_bug_in_the_state_keeps_its_traceback_and_leaves_nothing(tmp_path):
    # A full disk or a refused write is one line (CheckpointWriteError, a UserError); a bug in what is saved is not
    # dressed up as one: its own exception reaches the training thread, traceback and all.
    with pytest.raises(TypeError, match="a bug: this object cannot be pickled") as e:
        ckpt_lib.save({"step": 1, "oops": NotPicklable()}, tmp_path, 1)  # what the writer thread runs
    assert not isinstance(e.value, ckpt_lib.CheckpointWriteError) and e.traceback
    assert list(tmp_path.iterdir()) == []  # no temp file, no checkpoint


@pytest.mark.parametrize("keep_last,keep_every,existing,every,steps", [
    (3, 0, [], 2, 20), (3, 8, [], 2, 30), (1, 0, [], 1, 5), (0, 0, [], 5, 20), (2, 0, [3, 6, 7], 4, 24), (1, 4, [2], 1, 9),
])
def test_most_on_disk_is_what_retention_leaves_on_a_real_disk(tmp_path, keep_last, keep_every, existing, every, steps):
    """The trainer's free-space check counts checkpoints with most_on_disk; count the real files instead."""
    for s in existing:
        ckpt_lib.checkpoint_path(tmp_path, s).write_bytes(b"x")
    future = [s for s in range(1, steps + 1) if s % every == 0 and s not in existing]
    most = len(existing)
    for s in future:
        ckpt_lib.save({"step": s}, tmp_path, s)
        most = max(most, len(ckpt_lib.list_checkpoints(tmp_path)))  # the new file is whole before retention runs
        ckpt_lib.apply_retention(tmp_path, keep_last, keep_every)
    assert ckpt_lib.most_on_disk(existing, future, keep_last, keep_every) == most
    assert sorted(s for s, _ in ckpt_lib.list_checkpoints(tmp_path)) == ckpt_lib.retained(existing + future, keep_last, keep_every)


@pytest.mark.slow
def test_sigkill_during_a_background_write_keeps_the_previous_checkpoint_and_resumes_exactly(shards, tmp_path):
    ref = tmp_path / "reference"
    run_cli(*train_cmd(shards, ref, "--max-steps", STEPS, "--checkpoint-every", 8), check=True)
    log = tmp_path / "log"
    args = train_cmd(shards, log, "--max-steps", STEPS, "--checkpoint-every", 8)
    # Every write holds its half-written temp file open for 4 s; training must go on meanwhile.
    proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, env=env(NANOGPT_TEST_SAVE_DELAY=4),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Checkpoint 16 is being written while steps after 16 are already trained: the write is in the background.
        wait_for(lambda: any(log.glob(".model_00016.pt.tmp*")) and 19 in losses(log), proc)
        assert any(log.glob(".model_00016.pt.tmp*"))
    finally:
        proc.kill()
        proc.wait()
    assert [s for s, _ in ckpt_lib.list_checkpoints(log)] == [8]  # the interrupted write is invisible
    ckpt_lib.load(log / "model_00008.pt")
    run_cli(*args, check=True)  # the same command resumes from 8
    assert not list(log.glob(".*tmp*"))
    assert events(log, "resume")[0]["step"] == 8
    got, want = losses(log), losses(ref)
    assert sorted(got) == list(range(STEPS)) == sorted(want)
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-6), step
    assert [e["step"] for e in events(log, "checkpoint")][-2:] == [16, 24]
