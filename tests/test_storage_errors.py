"""File systems that refuse writes, for real: size-limited tmpfs mounts that run out of space while the trainer
checkpoints, the preparer writes shards or the exporter writes weights; a mount turned read-only under a running
trainer; a log file it may not append to. Each tool must say so in one line, keep every complete file it wrote
before, and carry on from them once the cause is fixed."""

import hashlib
import subprocess
import sys
import time

import pytest
import torch

from conftest import CORPUS, ROOT, SMALL, assert_one_line_error, env, events, grow, losses, run_cli, train_cmd
from job import checkpoint as ckpt_lib
from job import contract
from job.config import parse_args
from job.errors import cli_main, file_system_error
from job.model import GPT

STEPS = 6


def small_checkpoint_bytes() -> int:
    return ckpt_lib.estimate_bytes(GPT(parse_args(SMALL).model_config()))


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """The same run on a disk with room: the losses and checkpoints the interrupted run must reproduce."""
    log = tmp_path_factory.mktemp("reference")
    run_cli(*train_cmd(shards, log, "--max-steps", STEPS, "--checkpoint-every", 2), check=True)
    return log


@pytest.mark.slow
def test_full_disk_stops_training_in_one_line_and_the_same_command_resumes(shards, reference, disk):
    size = small_checkpoint_bytes()
    # The estimate the free-space check uses is the real file's size, within a percent.
    assert (reference / "model_00002.pt").stat().st_size == pytest.approx(size, rel=0.01)
    log = disk(int(1.5 * size)) / "log"  # room for one checkpoint, not two
    args = train_cmd(shards, log, "--max-steps", STEPS, "--checkpoint-every", 2)
    proc = run_cli(*args)
    assert proc.returncode == 2
    line = assert_one_line_error(proc, "checkpoint model_00004.pt could not be written", "no space left on the device",
                                 "model_00002.pt (step 2) is the last one written and is intact",
                                 "run the same command to resume")
    assert f"about {size / 2**20:.0f} MiB" in line
    # Warned at the start: three checkpoints were planned and one fits.
    assert "will need up to" in proc.stdout and "the run stops with an error when the disk fills" in proc.stdout
    assert [s for s, _ in ckpt_lib.list_checkpoints(log)] == [2] and not list(log.glob(".*tmp*"))
    assert events(log, "end")[-1] == {**events(log, "end")[-1], "step": 4, "reason": "checkpoint-failed"}
    ck, want = ckpt_lib.load(log / "model_00002.pt"), ckpt_lib.load(reference / "model_00002.pt")
    for k, v in want["model"].items():
        assert torch.equal(ck["model"][k], v), k

    grow(log.parent, 6 * size)
    run_cli(*args, check=True)  # the same command, now with room
    assert events(log, "resume")[-1]["step"] == 2
    got, ref = losses(log), losses(reference)
    assert sorted(got) == list(range(STEPS)) == sorted(ref)
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-6), step
    assert [s for s, _ in ckpt_lib.list_checkpoints(log)] == [2, 4, 6]


@pytest.mark.slow
def test_under_ddp_every_rank_stops_at_once_in_one_line(shards, disk):
    """Only rank 0 writes: the others hear of the failure in the step's all-reduce and stop with it, rather than
    wait for it in a collective until torchrun kills them with a traceback."""
    log = disk(int(1.5 * small_checkpoint_bytes())) / "log"
    args = train_cmd(shards, log, "--max-steps", 12, "--checkpoint-every", 2)
    proc = run_cli("-m", "job.supervisor", *args[2:], NPROC=2)
    assert proc.returncode == 2
    assert_one_line_error(proc, "checkpoint model_00004.pt could not be written", "model_00002.pt (step 2) is the last one")
    assert "Traceback" not in proc.stdout and "exited with" not in proc.stdout
    assert [s for s, _ in ckpt_lib.list_checkpoints(log)] == [2]
    assert max(losses(log)) < 11  # stopped within a step or two of finding out, not at the end of the run
    assert events(log, "end")[-1]["reason"] == "checkpoint-failed"


@pytest.mark.slow
def test_no_room_for_one_checkpoint_is_refused_before_training(shards, disk):
    log = disk(small_checkpoint_bytes() // 2) / "log"
    proc = run_cli(*train_cmd(shards, log, "--max-steps", STEPS))
    assert proc.returncode == 2
    assert_one_line_error(proc, f"{log} has", "free and a checkpoint of this model takes about",
                          "pass a --log-dir on a disk with room")
    assert (log / "train.log").read_text() == ""  # refused before the first step


def test_prepare_on_a_full_disk_keeps_its_shards_and_finishes_once_there_is_room(tmp_path, disk):
    cmd = ["-m", "job.prepare", "text", CORPUS, "--shard-size", 50_000]
    run_cli(*cmd, "--out", tmp_path / "ref", check=True)
    out = disk(300 * 1024) / "shards"  # two shards of 100 KB fit, the third does not
    proc = run_cli(*cmd, "--out", out)
    assert proc.returncode == 2
    assert_one_line_error(proc, f"cannot write shards to {out}: no space left on the device", "the shards already written stay")
    kept = sorted(p.name for p in out.glob("*.npy"))
    assert kept and not list(out.glob(".*tmp*"))  # complete shards only
    grow(out.parent, 4 * 2**20)
    run_cli(*cmd, "--out", out, check=True)
    want = sorted(p.name for p in (tmp_path / "ref").glob("*.npy"))
    assert sorted(p.name for p in out.glob("*.npy")) == want and len(want) > len(kept)
    for name in want:
        assert digest(out / name) == digest(tmp_path / "ref" / name), name


@pytest.mark.slow  # seconds of real work (a kill and resume, a full export, a model trace): not the edit loop
def test_export_on_a_full_disk_leaves_the_previous_export_as_it_was(tmp_path, disk):
    model = GPT(parse_args(SMALL).model_config())
    torch.save({"model": model.state_dict(), "config": model.config.to_dict(), "step": 3, "val_loss": 9.0},
               tmp_path / "model_00003.pt")
    weights = 4 * sum(p.numel() for p in model.parameters())
    out = disk(int(1.6 * weights)) / "hf"  # one export fits, a second beside it (written before the swap) does not
    run_cli("-m", "job.export", "--checkpoint", tmp_path, "--out", out, check=True)
    before = {p.name: digest(p) for p in out.iterdir()}
    proc = run_cli("-m", "job.export", "--checkpoint", tmp_path, "--out", out, "--overwrite")
    assert proc.returncode == 2
    assert_one_line_error(proc, f"cannot write the export to {out}: no space left on the device", "--out is as it was")
    assert {p.name: digest(p) for p in out.iterdir()} == before
    assert [p.name for p in out.parent.iterdir()] == ["hf"]  # no temp dir left behind


def test_any_other_full_disk_write_is_one_line(disk, capsys):
    path = disk(64 * 1024) / "big.bin"

    @cli_main
    def writer():
        path.write_bytes(b"x" * 2**20)

    with pytest.raises(SystemExit) as exit_:
        writer()
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    # (a failed write() names no file, unlike a failed open(); the writers above name theirs)
    assert err == "error: no space left on the device: make room there (or write to another disk), then run the same command again"


@pytest.mark.slow
def test_log_dir_turning_read_only_mid_run_stops_at_the_next_checkpoint(shards, disk):
    d = disk(4 * small_checkpoint_bytes())
    log = d / "log"
    args = train_cmd(shards, log, "--max-steps", 400, "--checkpoint-every", 4, "--eval-every", 0)
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + 120
        while not ckpt_lib.list_checkpoints(log) or subprocess.run(["mount", "-o", "remount,ro", str(d)]).returncode:
            assert time.time() < deadline and proc.poll() is None, "no checkpoint, or the mount never went read-only"
            time.sleep(0.05)  # (a remount to read-only waits until no file there is open for writing)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 2, out + err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 3, err
    # The log files failed first: one warning for them and one for TensorBoard's event file (written by the
    # dashboards' thread, so in either order), and training went on to the checkpoint, which decides.
    assert all(w.startswith(f"warning: cannot append to {log}/") and "(Read-only file system)" in w for w in lines[:2])
    assert any(f"{log}/{contract.TENSORBOARD_EVENTS_PREFIX}" in w and "TensorBoard records are retried" in w for w in lines[:2])
    lines = [lines[0], lines[2]]  # the warnings said, the error decides
    step = ckpt_lib.list_checkpoints(log)[-1][0]
    assert lines[1].startswith(f"error: checkpoint model_{step + 4:05d}.pt could not be written to {log}: Read-only file "
                               f"system; model_{step:05d}.pt (step {step}) is the last one written and is intact: fix that, "
                               "then run the same command to resume from it"), lines[1]
    assert max(losses(log)) < 400 - 1


def test_unwritable_log_dir_or_log_file_is_one_line_before_training(shards, disk, tmp_path):
    d = disk(2**20)
    subprocess.run(["mount", "-o", "remount,ro", str(d)], check=True)
    proc = run_cli(*train_cmd(shards, d / "log", "--max-steps", 2))
    assert proc.returncode == 2
    assert_one_line_error(proc, f"--log-dir {d / 'log'}: {d} is on a read-only file system: choose a writable --log-dir")
    # what a write that no up-front check saw coming meets there, as cli_main words it
    with pytest.raises(OSError) as refused:
        (d / "late.txt").write_text("x")
    assert file_system_error(refused.value) == f"{d / 'late.txt'} is on a read-only file system: use a writable path (a volume mounted with :ro?)"

    log = tmp_path / "log"  # a log left by another run, whose train.log this process may not append to
    log.mkdir()
    (log / "train.log").write_text("step 0 | from another run\n")
    if subprocess.run(["chattr", "+i", str(log / "train.log")], capture_output=True).returncode != 0:
        pytest.skip(reason="this file system has no immutable attribute (chattr +i), the way to refuse root a write")
    try:
        proc = run_cli(*train_cmd(shards, log, "--max-steps", 2))
    finally:
        subprocess.run(["chattr", "-i", str(log / "train.log")], check=True)
    assert proc.returncode == 2
    assert_one_line_error(proc, f"error: permission denied: {log / 'train.log'} (Operation not permitted): this user",
                          "may not use it; fix its owner or mode")
    assert (log / "train.log").read_text() == "step 0 | from another run\n" and not ckpt_lib.list_checkpoints(log)


def test_a_write_refused_by_a_read_only_place_is_not_told_to_make_room():
    import errno
    import os

    from job.fsutil import retry_advice

    again = "run the same command to go on from them"
    assert retry_advice(OSError(errno.ENOSPC, "No space left on device"), "/d", "--out", again) == f"make room, then {again}"
    ro = retry_advice(OSError(errno.EROFS, "Read-only file system"), "/d", "--out", again)
    assert ro == f"/d is on a read-only file system: remount it read-write or choose another --out, then {again}"
    denied = retry_advice(PermissionError(errno.EACCES, "Permission denied"), "/d", "--out", again)
    assert f"uid {os.getuid()}" in denied and "make room" not in denied
