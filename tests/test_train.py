"""End-to-end runs of the real trainer: checkpoints, divergence, retention, resume's refusals, compile. Exact resume after a
kill or SIGTERM and torchrun's ranks, for every recipe, are tests/test_promises.py's."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, assert_one_line_error, env, events, losses, one, run_cli, train_cmd, train_in_process
from job import checkpoint as ckpt_lib
from job import compile_cache

pytestmark = pytest.mark.slow
STEPS = 24


@pytest.fixture(scope="module")
def reference(shards, hellaswag_rows, tmp_path_factory):
    """One uninterrupted run: the loss trajectory every interrupted run must reproduce."""
    log = tmp_path_factory.mktemp("reference")
    train_in_process(train_cmd(shards, log, "--max-steps", STEPS, "--checkpoint-every", 8, "--hellaswag-every", 12,
                               "--hellaswag-path", hellaswag_rows)[2:])
    return log


def assert_same_losses(log_dir, reference_dir):
    got, want = losses(log_dir), losses(reference_dir)
    assert sorted(got) == list(range(STEPS)) == sorted(want)
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-6), step


def test_uninterrupted_run_learns_and_writes_build_nanogpt_checkpoints(reference):
    ls = losses(reference)
    assert ls[STEPS - 1] < ls[0] - 1.0  # it learns
    vals = events(reference, "val")
    assert [v["step"] for v in vals] == [0, 5, 10, 15, 20, 24]
    assert [s for s, _ in ckpt_lib.list_checkpoints(reference)] == [8, 16, 24]
    ck = torch.load(reference / "model_00024.pt", map_location="cpu", weights_only=True)
    for key in ("model", "config", "step", "val_loss", "optimizer", "data", "rng", "train_config"):
        assert key in ck
    assert ck["step"] == 24 and ck["val_loss"] == pytest.approx(vals[-1]["loss"])
    assert ck["config"]["n_layer"] == 2 and ck["train_config"]["max_steps"] == STEPS
    legacy = (reference / "log.txt").read_text().splitlines()
    assert legacy[0].startswith("0 val ") and legacy[1].startswith("0 hella ") and legacy[2].startswith("0 train ")
    assert sum(line.split()[1] == "train" for line in legacy) == STEPS
    human = (reference / "train.log").read_text()
    assert "tok/s" in human and "ETA" in human and "norm" in human


def test_hellaswag_offline_is_one_clear_line_before_training(shards, tmp_path):
    proc = run_cli(*train_cmd(shards, tmp_path / "log", "--hellaswag-every", 5, "--hellaswag-url", "http://127.0.0.1:9/val.jsonl"))
    assert_one_line_error(proc, "cannot download HellaSwag", "--hellaswag-path")
    assert not losses(tmp_path / "log")


def poison_second_moments(src, dst) -> None:
    ck = torch.load(src, weights_only=True)
    for state in ck["optimizer"]["state"].values():
        state["exp_avg_sq"].fill_(-1.0)
    torch.save(ck, dst)


@pytest.mark.parametrize("ranks,checkpoint_every", [(1, 1), (1, 0), (2, 0)], ids=["caught-by-save", "caught-by-loss", "ddp"])
def test_nan_stops_the_run_without_saving_and_names_the_last_good_checkpoint(shards, reference, tmp_path, ranks,
                                                                             checkpoint_every):
    """Weights turn NaN mid-run: here the resumed optimizer state holds a second moment of -1, so the first update
    takes its square root. The run must stop at the next check (the save's weight check, or the loss read back;
    under DDP both ranks together), write nothing, and leave the last checkpoint as it was."""
    log = tmp_path / "log"
    log.mkdir()
    poison_second_moments(reference / "model_00016.pt", log / "model_00016.pt")
    before = (log / "model_00016.pt").read_bytes()
    args = train_cmd(shards, log, "--max-steps", STEPS, "--checkpoint-every", checkpoint_every)
    # Two ranks run under the image's launcher (torchrun's agent), which passes the workers' exit status on.
    proc = run_cli(*args) if ranks == 1 else run_cli("-m", "job.supervisor", *args[2:], NPROC=ranks)
    assert proc.returncode == 3
    line = assert_one_line_error(proc, "training diverged at step 17", "stopped without saving",
                                 f"{log / 'model_00016.pt'} (step 16)",
                                 "a lower learning rate, e.g. --max-lr 0.0015")
    assert ("weights are no longer finite" in line) == (checkpoint_every == 1)
    assert [s for s, _ in ckpt_lib.list_checkpoints(log)] == [16] and not list(log.glob("*.tmp*"))
    assert (log / "model_00016.pt").read_bytes() == before
    ls = losses(log)
    assert ls[16] == pytest.approx(losses(reference)[16], rel=1e-4)  # the step that took the square root was fine
    if checkpoint_every == 0:  # the next loss shows the NaN, in the log too
        assert sorted(ls) == [16, 17] and ls[17] != ls[17]
    assert [(e["step"], e["reason"]) for e in events(log, "end")] == [(17, "diverged")]


def test_nan_before_any_checkpoint_of_this_log_dir_says_so(shards, reference, tmp_path):
    poison_second_moments(reference / "model_00016.pt", tmp_path / "elsewhere.pt")
    log = tmp_path / "log"
    proc = run_cli(*train_cmd(shards, log, "--max-steps", STEPS, "--checkpoint-every", 0, "--resume", tmp_path / "elsewhere.pt"))
    assert proc.returncode == 3
    assert_one_line_error(proc, "training diverged at step 17",
                          f"no checkpoint was written to {log}: start again with a lower learning rate, e.g. --max-lr 0.0015")
    assert ckpt_lib.list_checkpoints(log) == []


def test_retention_keeps_last_n_plus_every_kth(shards, tmp_path):
    log = tmp_path / "log"
    run_cli(*train_cmd(shards, log, "--max-steps", 12, "--checkpoint-every", 2, "--keep-last", 2, "--keep-every", 4),
            check=True)
    assert [s for s, _ in ckpt_lib.list_checkpoints(log)] == [4, 8, 10, 12]


def test_checkpoint_by_minutes(shards, tmp_path):
    log = tmp_path / "log"
    run_cli(*train_cmd(shards, log, "--max-steps", 6, "--checkpoint-every", 0, "--checkpoint-minutes", 1e-6, "--keep-last", 0),
            check=True)
    assert [s for s, _ in ckpt_lib.list_checkpoints(log)] == [1, 2, 3, 4, 5, 6]


def test_finished_run_rerun_does_nothing(shards, reference, tmp_path):
    log = tmp_path / "log"
    args = train_cmd(shards, log, "--max-steps", 4)
    run_cli(*args, check=True)
    before = (log / "model_00004.pt").stat().st_mtime_ns
    out = run_cli(*args, check=True).stdout
    assert "nothing to do" in out and (log / "model_00004.pt").stat().st_mtime_ns == before


def test_resume_refuses_other_model_and_never_overwrites(shards, reference, tmp_path):
    proc = run_cli(*train_cmd(shards, reference, "--max-steps", STEPS, "--n-embd", "32"))
    assert_one_line_error(proc, "different model", "n_embd=64")
    before = sorted(p.name for p in reference.iterdir())
    proc = run_cli(*train_cmd(shards, reference, "--max-steps", STEPS, "--resume", "never"))
    assert_one_line_error(proc, "--resume never", "another --log-dir")
    assert sorted(p.name for p in reference.iterdir()) == before


def test_resume_from_explicit_path(shards, reference, tmp_path):
    log = tmp_path / "log"
    run_cli(*train_cmd(shards, log, "--max-steps", STEPS, "--resume", reference / "model_00016.pt"), check=True)
    got, want = losses(log), losses(reference)
    assert sorted(got) == list(range(16, STEPS))
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-6), step


def test_sample_cli_from_log_dir(reference):
    a = run_cli("-m", "job.sample", "--checkpoint", reference, "--num", 2, "--max-tokens", 8, "--seed", 7, check=True).stdout
    b = run_cli("-m", "job.sample", "--checkpoint", reference / "model_00024.pt", "--num", 2, "--max-tokens", 8, "--seed", 7,
                check=True).stdout
    assert a == b and "sample 1: Hello, I'm a language model," in a
    assert_one_line_error(run_cli("-m", "job.sample", "--checkpoint", reference / "nope.pt"), "does not exist")
    assert os.environ.get("NANOGPT_TEST_SAVE_DELAY") is None


def test_compile_on_works_with_eval_hellaswag_and_sampling(shards, hellaswag_rows, reference, tmp_path):
    """build-nanogpt had to turn compile off for eval and sampling; here the same run uses all three."""
    log = tmp_path / "log"
    run_cli(*train_cmd(shards, log, "--max-steps", 6, "--compile", "on", "--hellaswag-every", 3, "--hellaswag-path", hellaswag_rows,
                       "--sample-every", 3, "--sample-num", 2, "--sample-tokens", 5), check=True, timeout=600)
    assert [e["step"] for e in events(log, "val")] == [0, 5, 6]
    assert [e["step"] for e in events(log, "hellaswag")] == [0, 3, 6]
    assert [len(e["samples"]) for e in events(log, "sample")] == [2, 2]
    # Same model, same data: the compiled step reproduces the eager reference (first steps of the same schedule).
    want = losses(reference)
    assert all(losses(log)[s] == pytest.approx(want[s], rel=1e-4) for s in range(6))


def torchrun(shards, log, *extra, **env_extra) -> subprocess.CompletedProcess:
    # torchrun's own per-start directory (it makes one in /tmp otherwise, and leaves it) beside the log dir.
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "--log-dir", f"{log}-torchrun", *train_cmd(shards, log, *extra)], cwd=ROOT, env=env(**env_extra),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_compiled_ddp_cuts_the_graph_at_buckets_so_all_reduce_overlaps_backward(shards, tmp_path):
    # DDP wraps the compiled model; Dynamo still sees the DDP module it runs under and cuts the graph at bucket
    # boundaries (its DDPOptimizer), so each bucket's gradients are all-reduced while the rest of the backward runs
    # instead of after one monolithic backward graph. 1 MiB buckets: the tiny model's gradients fill two.
    args = ("--max-steps", 8, "--checkpoint-every", 0, "--ddp-bucket-mb", 1, "--total-batch-tokens", 512)
    compiled = torchrun(shards, tmp_path / "compiled", *args, "--compile", "on", TORCH_LOGS="ddp_graphs")
    assert "2 ranks x 2 accum" in compiled.stdout
    assert "---submod_1 graph---" in compiled.stdout + compiled.stderr
    # The eager reference in one process: the same batches as two ranks, summed in another order (that two ranks train
    # what one does is test_promises.py's), so the compiled graph's cuts are what this compares.
    eager = run_cli(*train_cmd(shards, tmp_path / "eager", *args), check=True)
    assert "1 ranks x 4 accum" in eager.stdout
    got, want = losses(tmp_path / "compiled"), losses(tmp_path / "eager")
    assert sorted(got) == sorted(want) == list(range(8))
    assert want[7] < want[0] - 0.5
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-4), step


# The address space a trainer process gets in the out-of-memory tests, the CPU's stand-in for a full GPU. A run of
# this size with chunked logits runs in 2.5 GiB of it (measured on the dev VM); the full 128 x 128 x 50304 float32
# logits need 3.1 GiB more, so their allocation fails before the output layer's matmul is computed.
ADDRESS_SPACE = 4 * 2**30


def cap_address_space():
    """preexec_fn of a trainer process (each of torchrun's workers inherits the limit and has its own)."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def test_out_of_memory_is_one_line_naming_the_micro_batch_to_use(shards, tmp_path):
    """A real allocation failure (the address space capped): the 128 x 128 x 50304 logits do not fit. The answer is a
    smaller micro-batch, not a traceback."""
    args = train_cmd(shards, tmp_path / "log", "--micro-batch", 128, "--seq-len", 128, "--block-size", 128,
                     "--total-batch-tokens", 32768, "--max-steps", 2, "--ce-chunk-tokens", 0)  # full logits
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=300, preexec_fn=cap_address_space)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert_one_line_error(proc, "out of cpu memory at step 0 with micro-batch 128 x seq-len 128: lower --micro-batch, "
                          "e.g. --micro-batch 64: gradient accumulation keeps the 32,768 tokens per step; "
                          "--ce-chunk-tokens 8192 also avoids the full 128 x 128 x 50304 logits")
    assert ckpt_lib.list_checkpoints(tmp_path / "log") == []


def test_a_foreign_compile_cache_is_ignored_with_one_line_and_the_run_trains(shards, tmp_path):
    """A directory whose recorded key is not this run's (here: another torch) is never loaded, whatever it holds."""
    fs = tmp_path / "persistent"
    key = compile_cache.cache_key("gpt2", "cpu")  # its fields: tests/test_compile_cache.py
    cache = fs / compile_cache.dir_name(key)
    cache.mkdir(parents=True)
    (cache / compile_cache.KEY_FILE).write_text(json.dumps({**key, "torch": "2.0.0"}))
    (cache / "fxgraph").write_text("kernels of another torch")
    proc = run_cli(*train_cmd(shards, tmp_path / "log", "--max-steps", 2), check=True, TORCHINDUCTOR_CACHE_DIR="", NANOGPT_COMPILE_CACHE=fs)
    one(rf"^compile cache {re.escape(str(cache))} ignored, not loaded: it was made for another key \(torch '2\.0\.0', this run "
        rf"{re.escape(repr(key['torch']))}\); compiling afresh into a new one$", proc.stdout)
    assert proc.stdout.count("compile cache") == 1 and "Traceback" not in proc.stdout + proc.stderr
    assert [e["reason"] for e in events(tmp_path / "log", "end")] == ["done"]
    assert sorted(p.name for p in cache.iterdir()) == [compile_cache.KEY_FILE] and json.loads((cache / compile_cache.KEY_FILE).read_text()) == key


def test_out_of_memory_under_ddp_names_the_rank_that_ran_out(shards, tmp_path):
    """One GPU can be short alone (another process on it), so each rank that runs out says so itself, with its
    rank; nothing else is printed (no torchrun traceback), and the status is the trainer's 2."""
    args = train_cmd(shards, tmp_path / "log", "--micro-batch", 128, "--seq-len", 128, "--block-size", 128,
                     "--total-batch-tokens", 32768, "--max-steps", 2, "--ce-chunk-tokens", 0)  # full logits
    proc = subprocess.run([sys.executable, "-m", "job.supervisor", *map(str, args[2:])], cwd=ROOT, env=env(NPROC=2),
                          capture_output=True, text=True, timeout=300, preexec_fn=cap_address_space)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    oom = r"error: rank [01] \(cpu\): out of cpu memory at step 0 with micro-batch 128 x seq-len 128: lower --micro-batch, " \
          r"e\.g\. --micro-batch 64: .*"
    lines = proc.stderr.strip().splitlines()
    assert any(re.fullmatch(oom, line) for line in lines), proc.stderr
    # The rank that ran out second may first be told to stop by torchrun's agent (it stops the others when one fails).
    assert all(re.fullmatch(oom, line) or line.startswith("received SIGTERM") for line in lines), proc.stderr


@pytest.mark.parametrize("variables, needle", [
    ({"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE='two'"),
    ({"LOCAL_RANK": "x"}, "LOCAL_RANK='x'"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "29500"}, "MASTER_ADDR"),
])
def test_malformed_distributed_variables_are_one_line(monkeypatch, variables, needle):
    from job.errors import UserError
    from job.runtime import dist_env, under_ddp

    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in variables.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(UserError, match=re.escape(needle)) as e:
        dist_env()
    assert "torchrun" in str(e.value)
    under_ddp()  # asked again on the way out: it must not raise


def test_torchrun_variables_are_read(monkeypatch):
    from job.runtime import dist_env

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert dist_env() == (1, 1, 2)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k)
    assert dist_env() == (0, 0, 1)
