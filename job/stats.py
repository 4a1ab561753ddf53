"""Statistics over several runs of one recipe, as modded-nanogpt's record board judges a speedrun record.

    python -m job.stats LOGDIR [LOGDIR ...] [--target 3.28] [--json]

Each LOGDIR is a run's log dir (the one holding metrics.jsonl), or a directory whose sub-directories are runs' log
dirs (what `fab launch --runs N` brings back: one per seed). A run counts when its last "end" event says done and no
training step was logged after it; the others are listed with the reason they were left out.

What it reports, over the runs that count:

- the final validation loss of each (its last "val" event: the trainer evaluates at the last step), their mean and
  sample standard deviation (n - 1);
- the one-sided t-test of the board: H0 is "the mean is at or above the target" (3.28, --target), and a record
  needs p < 0.01. t = (mean - target) / (std / sqrt(n)) with n - 1 degrees of freedom; p is Student's t CDF at t,
  from the regularized incomplete beta function (a continued fraction), so nothing beyond the standard library is
  needed: the launcher imports this module too, and it has no numpy or scipy;
- the training time of each run, and its mean and standard deviation (train_seconds below).

The training time is the board's: the time spent in training steps, without validation. It is the sum of the step
times that the "train" events record (each event's `ms` is the mean over the steps since the previous event, so it
counts for that many steps): evaluation, HellaSwag, samples and checkpoints happen outside those steps and are left
out, as the record's clock stops for its validation. The first step of a compiled run (the step a "compile" event
names) is mostly compiling, which the record does in warm-up steps before its clock starts: it counts at the run's
median step time instead. Steps that a resume re-ran count once.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from job import contract
from job.errors import ArgumentParser, UserError, cli_main, float_arg

TARGET = 3.28  # modded-nanogpt's target: GPT-2 (124M)'s validation loss on FineWeb
ALPHA = 0.01  # the board's rule: a record's mean is below the target with p < 0.01


# ---- Student's t distribution ----------------------------------------------------------------------------------
def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz), converging for x < (a+1)/(a+b+2)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),  # the even term, then the odd one
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise ArithmeticError(f"the incomplete beta fraction did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float, y: float | None = None) -> float:
    """The regularized incomplete beta function I_x(a, b); `y` is 1 - x when the caller has it without rounding."""
    y = 1.0 - x if y is None else y
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(y)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, y) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    if math.isinf(t):
        return 0.0 if t < 0 else 1.0
    x, y = df / (df + t * t), t * t / (df + t * t)  # both without 1 - ..., which would round away a small one
    tail = 0.5 * betainc(df / 2.0, 0.5, x, y)  # P(T <= -|t|)
    return tail if t < 0 else 1.0 - tail


def ttest_below(values: list[float], target: float) -> tuple[float, float]:
    """(t, p) of the one-sided one-sample t-test of H0 "the mean is >= target" (scipy's ttest_1samp(values, target,
    alternative="less")). Every value equal: t is -inf or +inf (p 0 or 1), or nan with p 1 when they equal the target."""
    n = len(values)
    mean, std = statistics.fmean(values), statistics.stdev(values)
    if std == 0:
        t = math.nan if mean == target else math.copysign(math.inf, mean - target)
        return t, 1.0 if math.isnan(t) else t_cdf(t, n - 1)
    t = (mean - target) / (std / math.sqrt(n))
    return t, t_cdf(t, n - 1)


# ---- reading the runs -------------------------------------------------------------------------------------------
@dataclass
class Run:
    dir: str
    seed: int | None
    steps: int
    val_loss: float
    train_seconds: float
    recipe: str | None = None
    preset: str | None = None


@dataclass
class Skipped:
    dir: str
    why: str


def read_events(path: Path) -> list[dict]:
    """The events of a metrics.jsonl; a line that does not parse (a crash can cut the last one short) is left out."""
    events = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if isinstance(e, dict) and isinstance(e.get("event"), str):
            events.append(e)
    return events


def train_seconds(events: list[dict]) -> float:
    """Seconds spent in training steps (the module's docstring says which): each "train" event's mean step time
    times the steps since the previous one; a resume at step s drops what the run logged for steps s and on (it
    runs them again), and a compiled step counts at the median of the other steps' times."""
    windows: list[list] = []  # [first step, last step, ms per step]
    compiled: dict[int, float] = {}  # step -> its seconds, from a "compile" event
    last = -1
    for e in events:
        kind = e["event"]
        if kind in ("start", "resume"):
            s = int(e.get("step", 0))
            windows = [[a, min(b, s - 1), ms] for a, b, ms in windows if a < s]
            compiled = {c: sec for c, sec in compiled.items() if c < s}
            last = s - 1
        elif kind == "train":
            windows.append([last + 1, int(e["step"]), float(e["ms"])])
            last = int(e["step"])
        elif kind == "compile":
            compiled[int(e["step"])] = float(e["seconds"])
    total_ms = sum((b - a + 1) * ms for a, b, ms in windows)
    plain = [ms for a, b, ms in windows if not any(a <= c <= b for c in compiled)]
    if plain:
        for c, sec in compiled.items():
            if any(a <= c <= b for a, b, _ in windows):
                total_ms += statistics.median(plain) - 1000 * sec
    return total_ms / 1000


def read_run(log_dir: Path) -> Run | Skipped:
    """The run in `log_dir`, or why it does not count (an event without the fields the trainer writes is such a reason)."""
    try:
        return _read_run(log_dir)
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        what = f"no {e}" if isinstance(e, KeyError) else str(e).splitlines()[0][:120]
        return Skipped(str(log_dir), f"{contract.METRICS_FILE} has an event the trainer did not write ({what}): edited or damaged")


def _read_run(log_dir: Path) -> Run | Skipped:
    events = read_events(log_dir / contract.METRICS_FILE)
    finished, end_step, config, val = False, None, {}, None
    for e in events:
        kind = e["event"]
        if kind == "end":
            finished, end_step = e.get("reason") == "done", e.get("step")
        elif kind == "train":
            finished = False  # trained on after an end: a longer run now, not finished
        elif kind == "val":
            val = e
        elif kind == "start" and isinstance(e.get("config"), dict):
            config = e["config"]
    ends = [e for e in events if e["event"] == "end"]
    if not ends:
        return Skipped(str(log_dir), "not finished: no end event (still running, or killed)")
    if not finished:
        why = f"its last end event says {ends[-1].get('reason')!r} at step {ends[-1].get('step')}" if ends[-1].get("reason") != "done" \
            else "it trained on after its end event"
        return Skipped(str(log_dir), f"not finished: {why}")
    if val is None:
        return Skipped(str(log_dir), "no val event: nothing to compare")
    return Run(str(log_dir), config.get("seed"), int(end_step if end_step is not None else val["step"]), float(val["loss"]),
               train_seconds(events), config.get("recipe"), config.get("preset"))


def log_dirs(paths: list[str]) -> list[Path]:
    """Each path's runs: itself when it holds metrics.jsonl (or is one), else its sub-directories that hold one."""
    found: list[Path] = []
    for text in paths:
        p = Path(text)
        if p.is_file() and p.name == contract.METRICS_FILE:
            p = p.parent
        if not p.exists():
            raise UserError(f"{text} does not exist: pass a run's log dir (the one with {contract.METRICS_FILE}) or a directory of them")
        if not p.is_dir():
            raise UserError(f"{text} is a file, not a log dir: pass a run's log dir (the one with {contract.METRICS_FILE}) "
                            "or a directory of them")
        runs = [p] if (p / contract.METRICS_FILE).is_file() else sorted(d for d in p.iterdir() if (d / contract.METRICS_FILE).is_file())
        if not runs:
            raise UserError(f"{text} has no {contract.METRICS_FILE}, nor any sub-directory with one: pass a run's log dir "
                            "or a directory of them")
        found += [d for d in runs if d.resolve() not in {f.resolve() for f in found}]
    return found


# ---- the statistics -------------------------------------------------------------------------------------------
@dataclass
class Stats:
    runs: list[Run]
    skipped: list[Skipped]
    target: float
    n: int = 0
    val_mean: float = math.nan
    val_std: float | None = None  # None: one run, no spread to estimate
    t: float | None = None
    p: float | None = None
    meets_rule: bool | None = None
    time_mean: float = math.nan
    time_std: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"n": self.n, "target": self.target, "alpha": ALPHA,
                "val_loss": {"mean": self.val_mean, "std": self.val_std},
                "t": _finite_or_none(self.t), "df": self.n - 1 if self.p is not None else None, "p": self.p, "meets_rule": self.meets_rule,
                "train_seconds": {"mean": self.time_mean, "std": self.time_std},
                "runs": [asdict(r) for r in self.runs], "skipped": [asdict(s) for s in self.skipped], "notes": self.notes}


def _finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def compute(paths: list[str], target: float = TARGET) -> Stats:
    read = [read_run(d) for d in log_dirs(paths)]
    runs = [r for r in read if isinstance(r, Run)]
    skipped = [r for r in read if isinstance(r, Skipped)]
    if not runs:
        why = "; ".join(f"{s.dir}: {s.why}" for s in skipped)
        raise UserError(f"no finished run among the {len(skipped)} given ({why}): pass the log dirs of runs that trained to the end")
    s = Stats(runs, skipped, target, n=len(runs))
    losses, times = [r.val_loss for r in runs], [r.train_seconds for r in runs]
    s.val_mean, s.time_mean = statistics.fmean(losses), statistics.fmean(times)
    if s.n < 2:
        s.notes.append("one run: the standard deviation and the t-test need two or more")
    else:
        s.val_std, s.time_std = statistics.stdev(losses), statistics.stdev(times)
        s.t, s.p = ttest_below(losses, target)
        s.meets_rule = s.p < ALPHA
        if s.val_std == 0:
            s.notes.append("every run has the same val loss: no spread, so t is infinite (or undefined at the target)")
    setups = {(r.recipe, r.preset, r.steps) for r in runs}
    if len(setups) > 1:
        s.notes.append("the runs differ in recipe, preset or steps: " + ", ".join(f"{r} {p} {n} steps" for r, p, n in sorted(setups, key=str)))
    return s


def _pm(mean: float, std: float | None, fmt: str, unit: str = "") -> str:
    return f"mean {mean:{fmt}}{unit}, std " + (f"{std:{fmt}}{unit}" if std is not None else "undefined (one run)")


def format_stats(s: Stats) -> str:
    width = max(len("run"), *(len(r.dir) for r in s.runs))
    lines = [f"{'run'.ljust(width)}  {'seed':>6}  {'steps':>6}  {'val loss':>8}  {'train time':>10}"]
    lines += [f"{r.dir.ljust(width)}  {r.seed if r.seed is not None else '?':>6}  {r.steps:>6}  {r.val_loss:>8.4f}  {r.train_seconds:>8.1f} s"
              for r in s.runs]
    lines += [f"skipped {k.dir}: {k.why}" for k in s.skipped]
    lines.append(f"runs: {s.n}")
    lines.append("val loss: " + _pm(s.val_mean, s.val_std, ".4f"))
    if s.p is None:
        lines.append(f"t-test against {s.target:g}: not computed (one run)")
    else:
        verdict = f"p < {ALPHA:g}: meets the board's rule" if s.meets_rule else f"p >= {ALPHA:g}: does not meet the board's rule (p < {ALPHA:g})"
        lines.append(f"t-test (H0: mean >= {s.target:g}, one-sided): t = {s.t:.3f}, df = {s.n - 1}, p = {s.p:.4g}: {verdict}")
    lines.append("training time (steps only, no evaluation): " + _pm(s.time_mean, s.time_std, ".1f", " s"))
    lines += [f"note: {n}" for n in s.notes]
    return "\n".join(lines)


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m job.stats", description="The final val loss and training time over several runs, and the "
                       "one-sided t-test of modded-nanogpt's record board (mean below the target with p < 0.01).")
    p.add_argument("logdir", nargs="+", help="a run's log dir (with metrics.jsonl), or a directory of them (e.g. what "
                                             "`fab launch --runs N` fetched)")
    p.add_argument("--target", type=float_arg(above=0), default=TARGET, help=f"the val loss to beat (default {TARGET})")
    p.add_argument("--json", action="store_true", help="print the statistics as one JSON object")
    args = p.parse_args(argv)
    s = compute(args.logdir, args.target)
    sys.stdout.write((json.dumps(s.to_json(), indent=1) if args.json else format_stats(s)) + "\n")


if __name__ == "__main__":
    main()
