"""job.plot: the series parsed from metrics.jsonl and from build-nanogpt's log.txt are what the run logged; the PNG is made."""

import json
import math

import pytest

from conftest import assert_one_line_error, run_cli
from job.errors import UserError
from job.metrics import MetricsLogger
from job.plot import LOG_TXT_TOKENS_PER_STEP, main, read_run

PNG = b"\x89PNG\r\n\x1a\n"


def fake_run(log_dir, resume_at=None):
    """A run logged by the trainer's own MetricsLogger (metrics.jsonl + log.txt), optionally crashed and resumed."""
    log = MetricsLogger(log_dir)
    want = {"train": {}, "val": {}, "hellaswag": {}}

    def segment(first, last, bump):
        for step in range(first, last):
            loss = 10.8 * math.exp(-step / 40) + 3.1 + bump + step % 3 * 1e-7
            log.event("train", step=step, loss=loss, lr=6e-4, norm=0.9, ms=12.5, tok_s=42_000.0)
            want["train"][step] = loss
            if step % 10 == 0:
                log.event("val", step=step, loss=loss + 0.05)
                log.event("hellaswag", step=step, acc_norm=0.25 + step / 4000, correct=step, total=4000)
                want["val"][step], want["hellaswag"][step] = loss + 0.05, 0.25 + step / 4000

    log.event("start", config={"total_batch_tokens": 4096, "max_steps": 100}, world=1)
    if resume_at is None:
        segment(0, 100, 0.0)
    else:
        segment(0, resume_at + 7, 0.5)  # these later steps are re-run after the resume: their new values win
        log.event("resume", step=resume_at, path="model_00040.pt")
        segment(resume_at, 100, 0.0)
    return want


def test_metrics_jsonl_series_match_the_log(tmp_path):
    want = fake_run(tmp_path, resume_at=40)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"event": "train", "step": 100, "lo')  # a crash mid-write cuts the last line short
    run = read_run(tmp_path)
    assert run.source == str(tmp_path / "metrics.jsonl")
    assert (run.train, run.val, run.hellaswag) == (want["train"], want["val"], want["hellaswag"])
    assert run.tokens_per_step == 4096 and run.skipped == 1


def test_log_txt_series_match_the_log(tmp_path):
    want = fake_run(tmp_path)
    run = read_run(tmp_path / "log.txt")
    assert run.tokens_per_step is None
    # log.txt keeps build-nanogpt's precision: 6 decimals for train loss, 4 for val loss and HellaSwag
    assert run.train == {s: round(v, 6) for s, v in want["train"].items()}
    assert run.val == {s: round(v, 4) for s, v in want["val"].items()}
    assert run.hellaswag == {s: round(v, 4) for s, v in want["hellaswag"].items()}


def test_build_nanogpt_log_txt(tmp_path):
    # verbatim in the format of karpathy/build-nanogpt's train_gpt2.py, including a "hella" line
    (tmp_path / "log.txt").write_text("0 val 10.9507\n0 hella 0.2498\n0 train 10.955029\n1 train 10.403372\n"
                                      "250 val 6.0983\n250 hella 0.2565\n250 train 6.081431\n")
    run = read_run(tmp_path)
    assert run.train == {0: 10.955029, 1: 10.403372, 250: 6.081431}
    assert run.val == {0: 10.9507, 250: 6.0983} and run.hellaswag == {0: 0.2498, 250: 0.2565}
    out = main([str(tmp_path)])
    assert out == tmp_path / "plot.png" and out.read_bytes().startswith(PNG)


def test_png_from_cli(tmp_path):
    fake_run(tmp_path / "log")
    proc = run_cli("-m", "job.plot", tmp_path / "log", "--out", tmp_path / "curves.png", "--smooth", 5, check=True)
    assert "100 train, 10 val, 10 HellaSwag points" in proc.stdout
    assert "last step 99 (405,504 tokens)" in proc.stdout
    png = (tmp_path / "curves.png").read_bytes()
    assert png.startswith(PNG) and len(png) > 20_000
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(tmp_path / "curves.png").shape
    assert (width, height) == (14 * 110, 5 * 110)
    # a log.txt gets build-nanogpt's 2**19 tokens per step unless told otherwise
    proc = run_cli("-m", "job.plot", tmp_path / "log" / "log.txt", check=True)
    assert f"({99 * LOG_TXT_TOKENS_PER_STEP / 1e6:.3g}M tokens)" in proc.stdout
    assert_one_line_error(run_cli("-m", "job.plot", tmp_path / "nowhere"), "does not exist")


def test_bad_input(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither metrics.jsonl nor log.txt"):
        read_run(tmp_path / "empty")
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"event": "sample", "step": 0}) + "\nnot json\n")
    with pytest.raises(UserError, match=r"no train, val or HellaSwag entries \(1 unreadable lines\)"):
        read_run(tmp_path)
    fake_run(tmp_path / "ok")
    with pytest.raises(SystemExit) as exit_:  # main() is the CLI: the error is one line on stderr and exit 2
        main([str(tmp_path / "ok"), "--out", str(tmp_path / "plot.jpg")])
    assert exit_.value.code == 2 and "must end in .png" in capsys.readouterr().err
    assert not (tmp_path / "plot.jpg").exists()


def test_a_step_no_run_writes_is_an_unreadable_line_not_a_point(tmp_path):
    """A hand-edited or damaged line with a step of 1e308 once reached matplotlib (a traceback); a step that is
    negative, fractional or past the trainer's step limit is skipped like any unreadable line."""
    want = fake_run(tmp_path)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        for step in (1e308, float("inf"), -3, 2.5, 10**30):
            f.write(json.dumps({"event": "train", "step": step, "loss": 2.0}) + "\n")
        f.write(json.dumps({"event": "start", "config": {"total_batch_tokens": float("inf")}}) + "\n")
    with open(tmp_path / "log.txt", "a") as f:
        f.write("1e400 train 2.0\n-7 val 2.0\n")
    for source in (tmp_path, tmp_path / "log.txt"):
        run = read_run(source)
        assert set(run.train) == set(want["train"]) and run.skipped == (6 if source == tmp_path else 2)
    assert main([str(tmp_path)]).read_bytes().startswith(PNG)
    (tmp_path / "alone").mkdir()
    (tmp_path / "alone" / "metrics.jsonl").write_text(json.dumps({"event": "train", "step": 1e308, "loss": 3.0}) + "\n")
    assert_one_line_error(run_cli("-m", "job.plot", tmp_path / "alone"), "no train, val or HellaSwag entries (1 unreadable lines)")
