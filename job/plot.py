"""Plot a run: train/val loss and HellaSwag accuracy against steps and tokens, with the reference lines.

    python -m job.plot LOGDIR [--out PNG] [--tokens-per-step N] [--smooth N]     (or: make plot LOGDIR=...)

Reads LOGDIR/metrics.jsonl (this trainer) or, failing that, LOGDIR/log.txt in build-nanogpt's format
("{step} train {loss}", "{step} val {loss}", "{step} hella {acc}"), so runs of the original code plot too;
LOGDIR may also be either file. The reference lines are those of build-nanogpt's play.ipynb: OpenAI's GPT-2
124M checkpoint's val loss on FineWeb-edu (3.2924) and HellaSwag accuracy (0.2955), and GPT-3 124M's
HellaSwag accuracy (0.337, from the GPT-3 paper).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from job import contract
from job.config import UPPER_LIMITS
from job.errors import ArgumentParser, UserError, check_output_path, cli_main, int_arg

GPT2_VAL_LOSS = 3.2924  # OpenAI GPT-2 (124M) on the FineWeb-edu val shard, measured in build-nanogpt
GPT2_HELLASWAG = 0.2955  # OpenAI GPT-2 (124M) acc_norm
GPT3_HELLASWAG = 0.337  # GPT-3 (124M) acc_norm, GPT-3 paper
LOG_TXT_TOKENS_PER_STEP = 524288  # build-nanogpt's batch: 2**19 tokens per step
LEGACY_TAGS = {"train": "train", "val": "val", "hella": "hellaswag"}


@dataclass
class Run:
    """The series of one run, step -> value; a step logged twice (re-run after a resume) keeps its last value."""

    train: dict[int, float] = field(default_factory=dict)
    val: dict[int, float] = field(default_factory=dict)
    hellaswag: dict[int, float] = field(default_factory=dict)
    tokens_per_step: int | None = None
    source: str = ""
    skipped: int = 0  # lines that could not be read (a crash can cut the last one short)


def _step(value) -> int:
    """A step as the trainer writes it: a whole number from 0 to the trainer's step limit. Anything else (a hand-edited
    or damaged line) is an unreadable line, not a point far past the end of the axis."""
    step = int(value)
    if step != value or not 0 <= step <= UPPER_LIMITS["max_steps"]:
        raise ValueError(f"step {value!r} is not a step of a run")
    return step


def read_metrics(path: Path) -> Run:
    run = Run(source=str(path))
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            e = json.loads(line)
            kind = e["event"]
            if kind in ("train", "val"):
                getattr(run, kind)[_step(e["step"])] = float(e["loss"])
            elif kind == "hellaswag":
                run.hellaswag[_step(e["step"])] = float(e["acc_norm"])
            elif kind == "start":
                run.tokens_per_step = int(e["config"]["total_batch_tokens"])
        except (ValueError, KeyError, TypeError, OverflowError):  # OverflowError: int() of an Infinity
            run.skipped += 1
    return run


def read_log_txt(path: Path) -> Run:
    run = Run(source=str(path))
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split()
        if not parts:
            continue
        try:
            step, tag, value = parts
            getattr(run, LEGACY_TAGS[tag])[_step(int(step))] = float(value)
        except (ValueError, KeyError):
            run.skipped += 1
    return run


def read_run(path) -> Run:
    """A log dir (metrics.jsonl preferred, else log.txt) or one of those files."""
    p = Path(path)
    if p.is_dir():
        for name in (contract.METRICS_FILE, contract.NANOGPT_LOG_FILE):
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise UserError(f"{path} has neither {contract.METRICS_FILE} nor {contract.NANOGPT_LOG_FILE}: pass a training log dir")
    elif not p.is_file():
        raise UserError(f"{path} does not exist: pass a training log dir, a {contract.METRICS_FILE} or a {contract.NANOGPT_LOG_FILE}")
    run = read_metrics(p) if p.suffix == ".jsonl" else read_log_txt(p)
    if not (run.train or run.val or run.hellaswag):
        raise UserError(f"{p} holds no train, val or HellaSwag entries ({run.skipped} unreadable lines): nothing to plot")
    return run


def _smooth(values: list[float], window: int) -> list[float]:
    if window <= 1:
        return values
    out, acc = [], 0.0
    for i, v in enumerate(values):  # trailing moving average: no look-ahead, so the curve never moves left
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot(run: Run, out, tokens_per_step: int, smooth: int = 0, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed (the box, CI, ssh)
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_hs) = plt.subplots(1, 2, figsize=(14, 5), constrained_layout=True)
    _plot_loss(ax_loss, run, smooth)
    _plot_hellaswag(ax_hs, run)
    last_step = max([*run.train, *run.val, *run.hellaswag])
    for ax in (ax_loss, ax_hs):
        ax.set_xlabel("step")
        ax.set_xlim(0, max(last_step, 1))
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right" if ax is ax_loss else "lower right", fontsize=9)
        # the same axis in tokens, on top: runs with different batch sizes compare by tokens seen
        tokens = ax.secondary_xaxis("top", functions=(lambda s: s * tokens_per_step / 1e9, lambda t: t * 1e9 / tokens_per_step))
        tokens.set_xlabel(f"tokens (billions; {tokens_per_step:,} per step)")
    fig.suptitle(title or run.source)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _plot_loss(ax, run: Run, smooth: int) -> None:
    if run.train:
        steps = sorted(run.train)
        ys = [run.train[s] for s in steps]
        ax.plot(steps, _smooth(ys, smooth), lw=0.8, alpha=0.8, label="train loss" + (f" (mean of {smooth})" if smooth > 1 else ""))
    if run.val:
        steps = sorted(run.val)
        ax.plot(steps, [run.val[s] for s in steps], lw=1.8, marker="." if len(steps) < 60 else None, label="val loss")
    ax.axhline(GPT2_VAL_LOSS, color="red", ls="--", lw=1, label=f"OpenAI GPT-2 (124M) val loss {GPT2_VAL_LOSS}")
    # a diverged run logs NaN or inf: the frame is set by the finite points
    finite = {s: v for s, v in {**run.train, **run.val}.items() if math.isfinite(v)}
    if finite:
        # The first steps sit near ln(50257) ~ 10.8; the interesting part is far below: frame the last 90% of the run.
        last = sorted(finite)
        tail = [v for s, v in finite.items() if s >= last[len(last) // 10]]
        top = max(sorted(tail)[int(0.98 * (len(tail) - 1))], GPT2_VAL_LOSS + 0.5)
        bottom = min(min(finite.values()), GPT2_VAL_LOSS) - 0.1
        ax.set_ylim(bottom, top * 1.02)
    ax.set_ylabel("loss")
    ax.set_title("loss")


def _plot_hellaswag(ax, run: Run) -> None:
    if run.hellaswag:
        steps = sorted(run.hellaswag)
        ax.plot(steps, [run.hellaswag[s] for s in steps], lw=1.8, marker="." if len(steps) < 60 else None, label="HellaSwag acc_norm")
    else:
        ax.text(0.5, 0.5, "no HellaSwag evaluations in this run", ha="center", va="center", transform=ax.transAxes)
    ax.axhline(GPT2_HELLASWAG, color="red", ls="--", lw=1, label=f"OpenAI GPT-2 (124M) {GPT2_HELLASWAG}")
    ax.axhline(GPT3_HELLASWAG, color="green", ls="--", lw=1, label=f"OpenAI GPT-3 (124M) {GPT3_HELLASWAG}")
    ax.set_ylabel("accuracy")
    ax.set_title("HellaSwag")


def _last(series: dict[int, float]) -> str:
    if not series:
        return "none"
    s = max(series)
    return f"{series[s]:.4f} at step {s}"


def _tokens(n: float) -> str:
    """1.2M, 10.0B: the unit that fits a tiny demo run as well as a 10B-token one."""
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n:,.0f}"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m job.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("logdir", help=f"training log dir (its {contract.METRICS_FILE} or {contract.NANOGPT_LOG_FILE}), or either file")
    p.add_argument("--out", help="PNG to write (default: plot.png next to the log)")
    p.add_argument("--tokens-per-step", type=int_arg(1), help="tokens per optimizer step for the token axis (default: the run's "
                   f"--total-batch-tokens from {contract.METRICS_FILE}, or {LOG_TXT_TOKENS_PER_STEP:,} for a log.txt)")
    p.add_argument("--smooth", type=int_arg(0), default=0, help="plot the train loss as a moving average over N steps (default: raw)")
    p.add_argument("--title", help="figure title (default: the log file)")
    return p


def output_path(out, run: Run) -> Path:
    """--out, or plot.png next to the log; refused before plotting when it is not a writable .png path."""
    out = Path(out) if out else Path(run.source).parent / "plot.png"
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out} must end in .png")
    if out.is_dir():
        raise UserError(f"--out {out} is a directory: pass a file name ending in .png")
    check_output_path(out, "--out")
    return out


@cli_main
def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    run = read_run(args.logdir)
    tps = args.tokens_per_step or run.tokens_per_step or LOG_TXT_TOKENS_PER_STEP
    out = output_path(args.out, run)
    plot(run, out, tps, args.smooth, args.title)
    last = max([*run.train, *run.val, *run.hellaswag])
    print(f"wrote {out}: {len(run.train)} train, {len(run.val)} val, {len(run.hellaswag)} HellaSwag points from {run.source}; "
          f"last step {last} ({_tokens(last * tps)} tokens), val loss {_last(run.val)}, HellaSwag {_last(run.hellaswag)}"
          + (f"; skipped {run.skipped} unreadable lines" if run.skipped else ""))
    if not math.isfinite(sum(run.train.values())):
        print("warning: the train loss has non-finite values", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
