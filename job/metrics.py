"""Training logs: a human line per step (stdout + train.log), metrics.jsonl, and build-nanogpt's log.txt; each
event also goes to the dashboards' writers (job/dashboards.py: TensorBoard, W&B)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from job import contract

# Dense bf16 tensor-core peak (FLOP/s) by GPU name, for MFU in the step log. The benchmark measures the
# real peak of the card in hand; this table only has to be right enough for a progress line.
BF16_PEAK = [
    ("H200", 989e12), ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("GH200", 989e12),
    ("A100", 312e12), ("A10G", 70e12), ("A10", 125e12), ("L40S", 362e12), ("L4", 121e12), ("RTX 4090", 165e12),
    ("RTX 3090", 71e12), ("V100", 125e12),
]


def peak_flops(device_name: str) -> float | None:
    for key, flops in BF16_PEAK:
        if key in device_name:
            return flops
    return None


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class StepTimer:
    """Wall time per training step, averaged over the steps since the last log line. Steps that did not read
    anything back were only queued; the read-back of a log step waited for all of them, so the window's mean is
    the true time per step. `recent` smooths the ETA over the last windows."""

    def __init__(self, smooth: int = 20):
        self.smooth, self.recent = smooth, []
        self.window_s, self.window_n, self.last_s, self._t0 = 0.0, 0, 0.0, 0.0

    def start(self) -> None:
        self._t0 = time.time()

    def stop(self) -> None:
        self.last_s = time.time() - self._t0
        self.window_s, self.window_n = self.window_s + self.last_s, self.window_n + 1

    def lap(self) -> tuple[float, float]:
        """(mean seconds per step of this window, mean over the recent windows); starts a new window."""
        dt = self.window_s / self.window_n
        self.recent = (self.recent + [dt])[-self.smooth :]
        self.window_s, self.window_n = 0.0, 0
        return dt, sum(self.recent) / len(self.recent)


class MetricsLogger:
    """Only the master rank writes; other ranks get a logger that does nothing."""

    FILES = (contract.HUMAN_LOG_FILE, contract.METRICS_FILE, contract.NANOGPT_LOG_FILE)

    def __init__(self, log_dir, enabled: bool = True, writers=()):
        self.enabled = enabled
        self.writers = list(writers)  # each has event(kind, fields) and close(failed)
        self.dir = Path(log_dir)
        self.torn: set[str] = set()  # files whose last append failed, maybe half-way through a line
        self.warned = False
        if enabled:
            # Fail now, with the path in the error (cli_main turns it into one line), if the log dir or a log file in
            # it cannot be written: a read-only volume, or files left by a container that ran as root.
            self.dir.mkdir(parents=True, exist_ok=True)
            for name in self.FILES:
                open(self.dir / name, "a").close()

    def _append(self, name: str, text: str) -> None:
        """Append, or warn once and go on: a log line is not worth a training run (the lines still reach stdout,
        and a full disk or a lost mount stops training at the next checkpoint anyway, with its own error)."""
        path = self.dir / name
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(("\n" if name in self.torn else "") + text)  # never glue a line onto a torn one
            self.torn.discard(name)
        except OSError as e:
            self.torn.add(name)
            if not self.warned:
                self.warned = True
                print(f"warning: cannot append to {path} ({e.strerror}): training goes on; log lines still go to stdout, "
                      "and the files are retried at each line", file=sys.stderr, flush=True)

    def line(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)
            self._append(contract.HUMAN_LOG_FILE, text + "\n")

    def event(self, kind: str, **fields) -> None:
        if not self.enabled:
            return
        record = {"event": kind, "time": round(time.time(), 3), **fields}
        self._append(contract.METRICS_FILE, json.dumps(record) + "\n")
        self._to_writers(kind, record)
        # build-nanogpt's log.txt lines, so its notebooks and plot scripts read our runs unchanged.
        legacy = {"train": ("train", "loss", "{:.6f}"), "val": ("val", "loss", "{:.4f}"), "hellaswag": ("hella", "acc_norm", "{:.4f}")}
        if kind in legacy:
            tag, key, fmt = legacy[kind]
            self._append(contract.NANOGPT_LOG_FILE, f"{fields['step']} {tag} {fmt.format(fields[key])}\n")

    def _to_writers(self, kind: str, record: dict) -> None:
        """A dashboard that fails is dropped with one warning: it is not worth a training run either."""
        for w in list(self.writers):
            try:
                w.event(kind, record)
            except Exception as e:
                from job.dashboards import warn

                self.writers.remove(w)
                warn(w, e)

    def close(self, failed: bool = False) -> None:
        """Flush and close the dashboards' writers (the files above are appended line by line)."""
        writers, self.writers = self.writers, []
        for w in writers:
            try:
                w.close(failed)
            except Exception as e:
                from job.dashboards import warn

                warn(w, e)
