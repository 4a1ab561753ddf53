"""Progress of a prepare run: documents, tokens, tokens/s and ETA."""

from __future__ import annotations

import sys
import time

from job.metrics import format_eta


class Progress:
    """Documents, tokens, tokens/s and ETA: a tqdm bar on a terminal, else one line every `every` seconds (logs)."""

    def __init__(self, docs: int, tokens: int, every: float = 30.0):
        self.docs0 = self.docs = docs
        self.tokens0 = self.tokens = tokens
        self.total: int | None = None
        self.every, self.t0, self.last = every, time.time(), time.time()
        self.printed: tuple | None = None  # (docs, total) of the last line printed
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            tqdm.monitor_interval = 0  # no monitor thread: a later prepare() in this process can still fork its workers
            self.bar = tqdm(initial=docs, unit="doc", unit_scale=True, dynamic_ncols=True, file=sys.stderr, mininterval=0.5)

    def set_total(self, total: int | None) -> None:
        self.total = total
        if self.bar is not None and total:
            self.bar.total = total
            self.bar.refresh()

    def rate(self) -> float:
        return (self.tokens - self.tokens0) / max(time.time() - self.t0, 1e-9)

    def line(self) -> str:
        dt = max(time.time() - self.t0, 1e-9)
        total = f"/{self.total:,} ({100 * self.docs / max(self.total, 1):.1f}%)" if self.total else ""
        eta = "?"
        if self.total and self.docs > self.docs0:
            eta = format_eta((self.total - self.docs) * dt / (self.docs - self.docs0))
        return f"{self.docs:,}{total} docs | {self.tokens:,} tokens | {self.rate() / 1e6:.2f}M tok/s | ETA {eta}"

    def update(self, docs: int, tokens: int) -> None:
        self.tokens += tokens
        self.docs += docs
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.tokens / 1e6:,.1f}M tok, {self.rate() / 1e6:.2f}M tok/s", refresh=False)
            self.bar.update(docs)
        elif time.time() - self.last >= self.every:
            self._print()

    def _print(self) -> None:
        self.last, self.printed = time.time(), (self.docs, self.total)
        print(f"prepare: {self.line()}", file=sys.stderr, flush=True)

    def close(self, last_line: bool = True) -> None:
        """Close the bar, or print the final count (unless last_line is False: a refused run ends on its error line)."""
        if self.bar is not None:
            self.bar.close()
        elif last_line and self.docs > self.docs0 and self.printed != (self.docs, self.total):
            self._print()  # the final count, with the total if it arrived after the last line
