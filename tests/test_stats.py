"""`python -m job.stats`: the record board's statistics over runs' metrics.jsonl, its t-test held to scipy's."""

from __future__ import annotations

import json
import math
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from scipy import stats as scipy_stats

from conftest import ROOT, assert_one_line_error, run_cli
from job import stats


def write_run(d: Path, val_loss: float, *, seed: int = 1337, steps: int = 6, ms: float = 100.0, end: str | None = "done",
              recipe: str = "speedrun-2025-05-24", extra: list[dict] = ()) -> Path:
    """A finished run's metrics.jsonl as the trainer writes it: start, a train event per step, val at the end, end."""
    d.mkdir(parents=True, exist_ok=True)
    evs = [{"event": "start", "config": {"seed": seed, "recipe": recipe, "preset": "tiny", "max_steps": steps}, "world": 1}]
    evs += [{"event": "train", "step": s, "loss": 5.0, "ms": ms, "tokens": 512} for s in range(steps)]
    evs.append({"event": "val", "step": steps, "loss": val_loss})
    if end:
        evs.append({"event": "end", "step": steps, "reason": end})
    evs += list(extra)
    (d / "metrics.jsonl").write_text("".join(json.dumps({"time": 0.0, **e}) + "\n" for e in evs))
    return d


def cli(*args) -> subprocess.CompletedProcess:
    return run_cli("-m", "job.stats", *args)


def json_stats(*args) -> dict:
    proc = cli(*args, "--json")
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    return json.loads(proc.stdout)


# ---- the t-test, against scipy ----------------------------------------------------------------------------------
SAMPLES = [  # (n, the runs' mean, their spread): both sides of 3.28, from 2 runs (df = 1) up
    (2, 3.2790, 0.0010), (2, 3.2830, 0.0020), (2, 3.2600, 0.0002), (3, 3.2770, 0.0015), (4, 3.2805, 0.0030), (5, 3.2760, 0.0008),
    (8, 3.2795, 0.0025), (10, 3.2850, 0.0040), (20, 3.2780, 0.0030), (40, 3.2799, 0.0020),
]


@pytest.mark.parametrize("n, mean, spread", SAMPLES, ids=[f"n{n}-{m}" for n, m, _ in SAMPLES])
def test_the_p_value_is_scipys_one_sided_t_test(n, mean, spread, tmp_path):
    rng = random.Random(n * 1000 + int(mean * 1e4))
    losses = [rng.gauss(mean, spread) for _ in range(n)]
    for i, v in enumerate(losses):
        write_run(tmp_path / f"seed-{i}", v, seed=i)
    got = json_stats(tmp_path)
    ref = scipy_stats.ttest_1samp(losses, 3.28, alternative="less")
    assert got["n"] == n and got["df"] == n - 1 and got["target"] == 3.28
    assert got["p"] == pytest.approx(float(ref.pvalue), rel=1e-9, abs=0)
    assert got["t"] == pytest.approx(float(ref.statistic), rel=1e-9)
    assert got["val_loss"]["mean"] == pytest.approx(statistics.fmean(losses), rel=1e-12)
    assert got["val_loss"]["std"] == pytest.approx(statistics.stdev(losses), rel=1e-12)
    assert got["meets_rule"] is bool(ref.pvalue < 0.01)


def test_the_t_distribution_in_its_tails_and_middle():
    # What a p-value can need: huge |t| with one degree of freedom, and p close to 1.
    for df in (1, 2, 3, 9, 39, 500):
        for t in (-2000.0, -60.0, -7.5, -2.0, -0.3, 0.0, 0.3, 2.0, 7.5, 60.0):
            assert stats.t_cdf(t, df) == pytest.approx(float(scipy_stats.t.cdf(t, df)), rel=1e-12, abs=0), (t, df)


def test_target_and_the_boards_verdict(tmp_path):
    low = [3.2712, 3.2731, 3.2725, 3.2708]  # clearly below 3.28: a record by the board's rule
    for i, v in enumerate(low):
        write_run(tmp_path / f"seed-{i}", v, seed=i)
    proc = cli(tmp_path)
    assert proc.returncode == 0, proc.stderr
    ref = scipy_stats.ttest_1samp(low, 3.28, alternative="less")
    assert ref.pvalue < 0.01 and "p < 0.01: meets the board's rule" in proc.stdout
    assert f"df = 3, p = {ref.pvalue:.4g}" in proc.stdout and "runs: 4" in proc.stdout

    # The same runs against a lower target: not shown to be below it.
    proc = cli(tmp_path, "--target", "3.272")
    ref = scipy_stats.ttest_1samp(low, 3.272, alternative="less")
    assert ref.pvalue >= 0.01 and "t-test (H0: mean >= 3.272, one-sided)" in proc.stdout
    assert "p >= 0.01: does not meet the board's rule (p < 0.01)" in proc.stdout
    assert json_stats(tmp_path, "--target", "3.272")["p"] == pytest.approx(float(ref.pvalue), rel=1e-9)


# ---- which runs count, and the training time ------------------------------------------------------------------
def test_unfinished_runs_are_skipped_and_say_why(tmp_path):
    write_run(tmp_path / "a", 3.275, seed=1)
    write_run(tmp_path / "b", 3.279, seed=2)
    write_run(tmp_path / "stopped", 3.5, seed=3, end="stopped")
    write_run(tmp_path / "running", 3.6, seed=4, end=None)
    write_run(tmp_path / "longer", 3.7, seed=5, extra=[{"event": "resume", "step": 6}, {"event": "train", "step": 6, "loss": 4.0, "ms": 90}])
    # A finished run started again with the same settings: the trainer logs "resume" and has nothing to do. It counts.
    write_run(tmp_path / "again", 3.281, seed=6, extra=[{"event": "resume", "step": 6}])
    got = json_stats(tmp_path)
    assert [Path(r["dir"]).name for r in got["runs"]] == ["a", "again", "b"] and got["n"] == 3
    assert got["val_loss"]["mean"] == pytest.approx(statistics.fmean([3.275, 3.281, 3.279]))
    why = {Path(s["dir"]).name: s["why"] for s in got["skipped"]}
    assert why == {"stopped": "not finished: its last end event says 'stopped' at step 6",
                   "running": "not finished: no end event (still running, or killed)",
                   "longer": "not finished: it trained on after its end event"}
    text = cli(tmp_path).stdout
    assert f"skipped {tmp_path / 'stopped'}: not finished: its last end event says 'stopped' at step 6" in text


def test_training_time_is_the_steps_time_without_evaluation_or_compiling(tmp_path):
    evs = [
        {"event": "compile", "step": 0, "seconds": 40.0},  # the first step of a compiled run: mostly compiling
        {"event": "train", "step": 0, "loss": 9.0, "ms": 40_000.0},
        {"event": "train", "step": 3, "loss": 8.0, "ms": 100.0},  # the mean of steps 1-3 (--log-every 3)
        {"event": "val", "step": 4, "loss": 7.9},  # evaluation and checkpoints happen between steps: not timed
        {"event": "train", "step": 6, "loss": 7.0, "ms": 120.0},  # steps 4-6
        {"event": "train", "step": 8, "loss": 6.5, "ms": 130.0},  # steps 7-8, then a crash; the checkpoint is step 7's
        {"event": "resume", "step": 7},
        {"event": "compile", "step": 7, "seconds": 5.0},  # the relaunch compiles again (a window of its own, 7-8)
        {"event": "train", "step": 8, "loss": 6.4, "ms": 2_560.0},  # steps 7-8: 5 s of compiling + 0.12 s
        {"event": "train", "step": 9, "loss": 6.3, "ms": 110.0},
        {"event": "val", "step": 10, "loss": 6.2},
        {"event": "end", "step": 10, "reason": "done"},
    ]
    # Steps 0-9 once each: step 0 and the compiled step 7 at the median of the other logged step times (100, 120, 110:
    # 110 ms, as a record times its steps after warming up), step 8 at what its window says without the compile.
    want = (110 + 3 * 100 + 3 * 120 + (2 * 2560 - 5000 + 110) + 110) / 1000
    assert stats.train_seconds(evs) == pytest.approx(want)
    d = tmp_path / "run"
    d.mkdir()
    (d / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in [{"event": "start", "config": {"seed": 1}}, *evs]))
    write_run(tmp_path / "other", 3.3, ms=50.0, steps=10)  # 10 x 50 ms
    got = json_stats(tmp_path)
    assert [r["train_seconds"] for r in got["runs"]] == [pytest.approx(0.5), pytest.approx(want)]
    assert got["train_seconds"]["mean"] == pytest.approx((0.5 + want) / 2)
    assert got["train_seconds"]["std"] == pytest.approx(statistics.stdev([0.5, want]))
    # An uncompiled run's first step is a step like the others.
    assert stats.train_seconds([{"event": "start"}, {"event": "train", "step": 0, "ms": 300.0},
                                {"event": "train", "step": 1, "ms": 100.0}]) == pytest.approx(0.4)


def test_one_run_has_no_spread_and_says_so(tmp_path):
    write_run(tmp_path / "only", 3.2791, ms=200.0)
    proc = cli(tmp_path / "only")
    assert proc.returncode == 0 and not proc.stderr
    assert "runs: 1" in proc.stdout and "val loss: mean 3.2791, std undefined (one run)" in proc.stdout
    assert "t-test against 3.28: not computed (one run)" in proc.stdout
    assert "note: one run: the standard deviation and the t-test need two or more" in proc.stdout
    got = json_stats(tmp_path / "only")
    assert got["val_loss"]["std"] is None and got["p"] is None and got["meets_rule"] is None and got["t"] is None
    assert got["train_seconds"] == {"mean": pytest.approx(1.2), "std": None}


def test_runs_given_one_by_one_a_directory_of_them_or_their_files(tmp_path):
    a, b = write_run(tmp_path / "w" / "seed-1", 3.27, seed=1), write_run(tmp_path / "w" / "seed-2", 3.29, seed=2)
    (tmp_path / "w" / "notes").mkdir()  # no metrics.jsonl: not a run
    for args in ([tmp_path / "w"], [a, b], [a / "metrics.jsonl", b], [tmp_path / "w", a]):  # each run once
        got = json_stats(*args)
        assert [r["seed"] for r in got["runs"]] == [1, 2], args
    write_run(tmp_path / "w2" / "seed-3", 3.28, seed=3, recipe="gpt2")
    assert "the runs differ in recipe, preset or steps" in cli(tmp_path / "w", tmp_path / "w2").stdout


def test_every_run_the_same_loss(tmp_path):
    for i in range(3):
        write_run(tmp_path / f"s{i}", 3.25, seed=i)
    got = json_stats(tmp_path)
    assert got["val_loss"]["std"] == 0 and got["p"] == 0.0 and got["meets_rule"] is True
    assert any("no spread" in n for n in got["notes"])


# ---- mistakes: one line each ------------------------------------------------------------------------------------
def test_mistakes_are_one_line(tmp_path):
    assert_one_line_error(cli(tmp_path / "nope"), f"{tmp_path / 'nope'} does not exist", "pass a run's log dir")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(cli(tmp_path / "empty"), "has no metrics.jsonl, nor any sub-directory with one")
    (tmp_path / "file.txt").write_text("x")
    assert_one_line_error(cli(tmp_path / "file.txt"), "is a file, not a log dir")
    write_run(tmp_path / "runs" / "stopped", 3.3, end="stopped")
    write_run(tmp_path / "runs" / "running", 3.3, end=None)
    line = assert_one_line_error(cli(tmp_path / "runs"), "no finished run among the 2 given",
                                 "running: not finished: no end event", "stopped: not finished: its last end event says 'stopped'",
                                 "pass the log dirs of runs that trained to the end")
    assert line.count("error:") == 1
    write_run(tmp_path / "ok", 3.3)
    for bad in ("nan", "inf", "x", "-1"):
        assert_one_line_error(cli(tmp_path / "ok", "--target", bad), "--target")
    assert_one_line_error(cli(), "logdir")
    for proc in (cli(tmp_path / "nope"), cli(tmp_path / "ok", "--target", "nan")):
        assert proc.returncode == 2


def test_importable_without_numpy_or_torch():
    """The launcher imports it (fab launch --runs prints the table), in a virtualenv without numpy or torch."""
    code = "import sys, job.stats; bad = {'numpy', 'torch', 'scipy'} & set(sys.modules); assert not bad, bad"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert math.isfinite(stats.TARGET) and stats.ALPHA == 0.01
