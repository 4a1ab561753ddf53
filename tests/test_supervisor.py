"""`python -m job.supervisor` with several processes (NPROC=2 on the CPU): torchrun's agent in a child of the supervisor.

What the plain `torchrun` command got wrong, each reproduced: a user mistake came out as our line plus torchrun's
ChildFailedError traceback and exit 1; SIGTERM killed the workers 30 s (TORCH_ELASTIC_SHUTDOWN_TIMEOUT) into
their final save and exited 1 with a traceback.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from conftest import ROOT, assert_one_line_error, env, events, losses, one, run_cli, train_cmd
from job import checkpoint as ckpt_lib
from job import compile_cache, contract
from job.errors import RankLost, UserError
from job.supervisor import children, first_failure, torchrun_args
from sshd import free_port

pytestmark = pytest.mark.slow  # no Docker engine and no fixed port: any worker may run them


def launch_cmd(shards, log, *extra) -> list[str]:
    return ["-m", "job.supervisor", *train_cmd(shards, log, *extra)[2:]]


def start(args, **env_extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, env=env(NPROC=2, **env_extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def own_tmpdir(tmp_path):
    """A $TMPDIR of the test's own, to see what a run leaves there (the compile cache stays pinned by conftest.env)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    return tmp


def wait_until(predicate, proc, timeout=120):
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"the trainer exited or hung ({proc.returncode}):\n" + "".join(proc.communicate()))
        time.sleep(0.05)


def test_user_mistake_is_one_line_and_the_workers_exit_status(shards, tmp_path):
    proc = run_cli(*launch_cmd(shards, tmp_path / "log", "--max-lr", 5), NPROC=2)
    assert_one_line_error(proc, "--max-lr must be in (0, 1)")
    assert proc.returncode == 2 and "--nproc_per_node=2" in proc.stdout
    assert "Traceback" not in proc.stdout and "ChildFailedError" not in proc.stdout + proc.stderr


def test_a_mistake_only_rank_0_finds_is_its_line_alone(shards, tmp_path):
    """Rank 0 alone asks the W&B server, after the ranks met: rank 1 is stopped or loses it, and neither that nor
    torchrun's ChildFailedError traceback (what plain torchrun prints after the line, exiting 1) reaches the output."""
    url = f"http://127.0.0.1:{free_port()}"
    key_file = tmp_path / "wandb-api-key"
    key_file.write_text("0123456789abcdef" * 3 + "\n")
    cmd = launch_cmd(shards, tmp_path / "log", "--max-steps", 1, "--wandb", "proj")
    # The ranks end by os._exit (job/train.py's entry), past the finalizers that remove the temporary directories
    # wandb makes when it is imported: the rank removes them itself, from the test's own $TMPDIR here.
    tmp = own_tmpdir(tmp_path)
    proc = run_cli(*cmd, NPROC=2, WANDB_MODE="online", WANDB_BASE_URL=url, NANOGPT_WANDB_KEY_FILE=key_file, TMPDIR=tmp)
    assert_one_line_error(proc, f"the W&B server {url} does not answer")
    assert proc.returncode == 2 and "--nproc_per_node=2" in proc.stdout
    assert sorted(p.name for p in tmp.iterdir()) == []
    assert "Traceback" not in proc.stdout and "ChildFailedError" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["docker-stop", "ctrl-c"])
def test_a_stop_reaches_each_worker_once_and_they_save_however_long_it_takes_then_exit_0(shards, tmp_path, sig):
    """One Ctrl-C is a clean stop and a second aborts, so a signal passed on twice would abort: this one stops."""
    log, tmp = tmp_path / "log", own_tmpdir(tmp_path)
    # torchrun would SIGKILL the workers 1 s after passing SIGTERM on; the final save here takes 4 s.
    proc = start(launch_cmd(shards, log, "--max-steps", 10_000, "--checkpoint-every", 0), TORCH_ELASTIC_SHUTDOWN_TIMEOUT=1,
                 NANOGPT_TEST_SAVE_DELAY=4, TMPDIR=tmp)
    wait_until(lambda: len(losses(log)) >= 3, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out + err
    assert "Traceback" not in out + err and err.count(f"received {sig.name}") == 1  # local rank 0 says it
    stopped = events(log, "end")
    assert [e["reason"] for e in stopped] == ["stopped"]
    assert [s for s, _ in ckpt_lib.list_checkpoints(log)] == [stopped[0]["step"]]
    assert ckpt_lib.load(log / f"model_{stopped[0]['step']:05d}.pt")["step"] == stopped[0]["step"]
    assert not list(tmp.iterdir())  # the directory torchrun kept its per-rank files in went with the run


def test_a_killed_worker_is_one_line_naming_it_and_its_signal_and_the_survivor_says_what_to_resume(shards, tmp_path):
    log, tmp = tmp_path / "log", own_tmpdir(tmp_path)
    proc = start(launch_cmd(shards, log, "--max-steps", 10_000, "--checkpoint-every", 2), TMPDIR=tmp)

    def workers() -> dict[int, int]:  # rank -> pid; the launcher runs torchrun's agent in a child, the trainers are its
        found = {}
        for pid in (w for agent in children(proc.pid) for w in children(agent)):
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
            if b"RANK" in environ:  # not yet exec'd with the worker's environment
                found[int(environ[b"RANK"])] = pid
        return found

    wait_until(lambda: len(workers()) == 2 and len(losses(log)) >= 4 and ckpt_lib.list_checkpoints(log), proc)
    os.kill(workers()[1], signal.SIGKILL)  # as the kernel's out-of-memory killer would
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGKILL
    # Rank 0's collective fails (gloo: connection closed by peer): one line instead of its traceback, naming the
    # checkpoint to resume from; no "saving a checkpoint" promise when the agent then stops it; the launcher's
    # line (not torchrun's ChildFailedError report) names the rank, its signal and what that signal usually means.
    assert "Traceback" not in out + err and "ChildFailedError" not in err and "received SIGTERM" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 2, err
    last = ckpt_lib.list_checkpoints(log)[-1]
    step = one(r"^error: rank 0: another rank is gone \(a collective failed at step (\d+): [^()]*(?:closed|reset) by peer[^()]*\): "
               r"this one stops too, without a checkpoint; the launcher's line names the rank that failed first; "
               rf"{last[1].name} \(step {last[0]}\) is the last checkpoint: run the same command to resume from it$", lines[0]).group(1)
    assert last[0] <= int(step) + 1
    assert not list(tmp.iterdir())  # a failed start leaves no directory of torchrun's either
    one(r"^error: training failed: rank 1 on \S+ exited with signal SIGKILL: killed outright, most often by the kernel's "
        r"out-of-memory killer: .* \(its output is above\)$", lines[1])


def test_a_stop_while_waiting_for_the_other_machines_exits_at_once(shards, tmp_path):
    port, tmp = free_port(), own_tmpdir(tmp_path)
    proc = start(launch_cmd(shards, tmp_path / "log"), NNODES=2, NODE_RANK=0, MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                 TMPDIR=tmp)

    def store_listening() -> bool:  # node 0's agent serves the rendezvous: it runs, and the launcher waits on it
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_until(store_listening, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "received SIGTERM before training started: exiting" in err
    assert not list(tmp.iterdir())  # the directory torchrun's agent was given went with the launcher, not the agent


def test_the_failure_reported_is_the_cause_not_a_survivor_that_lost_it():
    # The agent finds a killed rank and the rank that lost it in one poll: their timestamps tie to the second, and
    # torchrun's get_first_failure would then name the lower rank, here the survivor.
    failures = {r: ProcessFailure(local_rank=r, pid=100 + r, exitcode=code, error_file="") for r, code in
                [(0, RankLost.exit_code), (1, -signal.SIGKILL), (2, RankLost.exit_code)]}
    for f in failures.values():
        f.timestamp = 1_700_000_000
    assert first_failure(failures)[0] == 1
    failures[3] = ProcessFailure(local_rank=3, pid=103, exitcode=UserError.exit_code, error_file="")
    failures[3].timestamp = 1_699_999_999  # earlier: the first cause
    assert first_failure(failures)[0] == 3
    only_lost = {r: failures[r] for r in (0, 2)}  # the rank that went away is on another machine
    assert first_failure(only_lost)[0] == 0
    # A mistake every rank makes: rank 1 said nothing and left first, the agent stopped rank 0 in the same second.
    mistake = {0: ProcessFailure(local_rank=0, pid=100, exitcode=-signal.SIGTERM, error_file=""),
               1: ProcessFailure(local_rank=1, pid=101, exitcode=UserError.exit_code, error_file="")}
    for f in mistake.values():
        f.timestamp = 1_700_000_000
    assert first_failure(mistake)[0] == 1


def test_torchrun_arguments_per_machine():
    assert torchrun_args(["--preset", "gpt2"], gpus=1, nproc_env=None) is None  # one process: no torchrun at all
    assert torchrun_args(["--x"], gpus=8, nproc_env=None) == ["--standalone", "--nproc_per_node=8", "-m", "job.train", "--x"]
    assert torchrun_args([], gpus=8, nproc_env="2")[1] == "--nproc_per_node=2"
    two = torchrun_args([], gpus=8, nproc_env=None, env={"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1",
                                                         "MASTER_PORT": "29500"})
    assert two[:4] == ["--nnodes=2", "--node-rank=1", "--master-addr=10.0.0.1", "--master-port=29500"]


# ---- --runs N: the same run for several seeds, one after another -----------------------------------------------
def runs_cmd(shards, log, runs, *extra) -> list[str]:
    return [*launch_cmd(shards, log, *extra), "--runs", runs]


def test_runs_train_each_seed_in_its_own_log_dir_with_one_compile_cache(shards, tmp_path):
    log, fs = tmp_path / "log", tmp_path / "persistent"
    # TORCHINDUCTOR_CACHE_DIR="": as in the image, where nothing sets it (the tests' default shares one per machine).
    # No validation: the training step's graphs show the cache, and each graph is a cold compile in a cache of its own.
    proc = run_cli(*runs_cmd(shards, log, 2, "--compile", "on", "--max-steps", 2, "--eval-every", 0), check=True,
                   TORCHINDUCTOR_CACHE_DIR="", NANOGPT_COMPILE_CACHE=fs)
    cache = fs / compile_cache.dir_name(compile_cache.cache_key("gpt2", "cpu"))
    for i, seed in enumerate((1337, 1338), 1):
        run = log / f"seed-{seed}"
        one(rf"^run {i} of 2: seed {seed}, log dir {run}$", proc.stdout)
        assert events(run, "start")[0]["config"]["seed"] == seed and [e["reason"] for e in events(run, "end")] == ["done"]
    one(rf"^2 runs done, in {log}/seed-\*: `python -m job.stats {log}` gives their statistics$", proc.stdout)
    # Both runs compile into the one directory for their key on the persistent file system (never in /tmp or a log
    # dir: another box, with its own, starts from it), and the second takes every graph from it.
    key = compile_cache.cache_key("gpt2", "cpu")  # its fields: tests/test_compile_cache.py
    assert json.loads((cache / compile_cache.KEY_FILE).read_text()) == key
    counts = re.findall(rf"step +0 \| first step [\d.]+ s with torch\.compile: (\d+) of (\d+) graphs from the cache in {re.escape(str(cache))}$",
                        proc.stdout, re.M)
    assert len(counts) == 2 and counts[0][0] == "0" and counts[1][0] == counts[1][1] == counts[0][1] != "0", proc.stdout
    assert sorted(p.name for p in fs.iterdir()) == [cache.name]
    assert not any((log / d / contract.COMPILE_CACHE_DIR).exists() for d in (".", "seed-1337", "seed-1338"))
    first, second = (events(log / f"seed-{s}", "compile")[0] for s in (1337, 1338))
    assert first["cache_misses"] > 0 and second["cache_misses"] == 0 and second["cache_hits"] > 0, (first, second)
    assert events(log / "seed-1337", "train")[0]["loss"] != events(log / "seed-1338", "train")[0]["loss"]  # other weights


def test_a_stop_ends_the_runs_and_the_same_command_trains_the_rest(shards, tmp_path):
    log = tmp_path / "log"
    proc = subprocess.Popen([sys.executable, *map(str, runs_cmd(shards, log, 2, "--max-steps", 10_000, "--log-every", 1))], cwd=ROOT,
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: len(losses(log / "seed-1337")) >= 3, proc)
    proc.send_signal(signal.SIGTERM)  # docker stop, as fab stop sends it
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in out + err, out + err
    assert err.count("received SIGTERM") == 1 and "stopped at run 1 of 2 (seed 1337): the same command resumes it" in out
    assert [e["reason"] for e in events(log / "seed-1337", "end")] == ["stopped"] and not (log / "seed-1338").exists()

    again = runs_cmd(shards, log, 2, "--max-steps", 12, "--log-every", 1)
    proc = run_cli(*again, check=True)
    assert "resumed from" in proc.stdout and proc.stdout.count("done: 12 steps") == 2
    proc = run_cli(*again, check=True)  # nothing left to train: each run says so, and both still count
    assert proc.stdout.count("already trained to step 12") == 2
    got = json.loads(run_cli("-m", "job.stats", log, "--json", check=True).stdout)
    assert [r["seed"] for r in got["runs"]] == [1337, 1338] and got["skipped"] == []
    assert [r["val_loss"] for r in got["runs"]] == [events(log / f"seed-{s}", "val")[-1]["loss"] for s in (1337, 1338)]


def test_runs_share_the_log_dirs_cache_and_a_refused_first_run_leaves_none(shards, tmp_path):
    """The trainer refuses a mistake in the files before it makes its compile cache; --runs shares one cache between
    its runs, under the --log-dir they share (with no persistent file system), and makes none for a refused run."""
    log = tmp_path / "log"
    good = runs_cmd(shards, log, 2, "--max-steps", 1)
    bad = [str(tmp_path / "no-data") if a == str(shards) else a for a in good]
    # One process (which the launcher then says nothing about); TORCHINDUCTOR_CACHE_DIR unset, as in the image.
    proc = run_cli(*bad, NPROC=1, TORCHINDUCTOR_CACHE_DIR="")
    assert_one_line_error(proc, "no-data does not exist")
    assert proc.returncode == 2 and not log.exists()
    run_cli(*good, NPROC=1, TORCHINDUCTOR_CACHE_DIR="", check=True)
    key = compile_cache.dir_name(compile_cache.cache_key("gpt2", "cpu"))
    assert [p.name for p in (log / contract.COMPILE_CACHE_DIR).iterdir()] == [key]
    assert not any((log / f"seed-{s}" / contract.COMPILE_CACHE_DIR).exists() for s in (1337, 1338))


def test_runs_must_be_a_whole_number_of_at_least_one(shards, tmp_path):
    for bad in ("0", "two"):
        proc = run_cli(*runs_cmd(shards, tmp_path / "log", bad))
        assert_one_line_error(proc, "--runs", repr(bad))
        assert proc.returncode == 2 and not (tmp_path / "log").exists()
