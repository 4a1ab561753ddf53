"""The launch's timeline: how long each stage took, what it was, and what the instance cost.

`fab launch` times its own stages on the laptop (boot, preflight, image, data, training, fetch) and takes compile and
first step from the trainer's metrics.jsonl (its `compile` event and its first `train` event), so those two are the
trainer's own clock, inside the training stage. Each stage the launcher timed has its start too (seconds into the
launch): the data runs beside the image, and setup's seconds are their wall time, the overlap counted once. The
timeline is kept as JSON in the run's log dir on the box
(job.contract.TIMELINE_FILE): `fab status` shows it, and the next dry run prices setup from it.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from job import contract

# In the order they happen. Compile and first step fall inside training (the trainer measured them), so only the
# others make up what the instance was billed for; data overlaps image.
STAGES = ("boot", "preflight", "image", "data", "compile", "first step", "training", "fetch")
SETUP = ("boot", "preflight", "image", "data", "fetch")
TRAINING = ("training",)
WHAT = {
    "boot": "instance created, booted, answering SSH",
    "preflight": "box checked (docker, GPUs, driver, disks), no active run",
    "image": "trainer image built, pulled or found",
    "data": "shards prepared, downloaded or found",
    "compile": "torch.compile of the first step (the trainer's compile event)",
    "first step": "the first optimizer step (the trainer's first train event)",
    "training": "sidecars and trainer started, trainer ran to its exit",
    "fetch": "weights fetched home before terminating",
}
# How the image stage got the image (infra/image.py's Image.how), and what its line then says.
IMAGE_HOW = {
    "built": "trainer image built on the box",
    "pulled": "trainer image pulled from the registry",
    "shipped": "trainer image shipped from this machine",
    "found": "trainer image already on the box",
}


@dataclass
class Stage:
    name: str
    seconds: float
    what: str
    how: str = ""  # the image stage: built, pulled, shipped or found (IMAGE_HOW); "a+b" where nodes differ
    start: float | None = None  # seconds into the launch where the launcher timed it; stages can overlap (data, image)

    @property
    def end(self) -> float | None:
        return None if self.start is None else self.start + self.seconds


@dataclass
class Timeline:
    recipe: str
    preset: str
    type_name: str | None = None  # the Lambda instance type, where known
    stages: list[Stage] = field(default_factory=list)
    origin: float = field(default_factory=time.monotonic, repr=False, compare=False)  # the launch's start; not kept

    def add(self, name: str, seconds: float) -> None:
        """A stage's seconds; a stage measured in several pieces (the steps of one stage) adds up."""
        for s in self.stages:
            if s.name == name:
                s.seconds += seconds
                return
        self.stages.append(Stage(name, seconds, WHAT[name]))
        self.stages.sort(key=lambda s: STAGES.index(s.name))

    def mark(self, name: str, hows: list[str]) -> None:
        """How a stage did its work (each node's way, in node order, once each); its seconds come as usual."""
        self.add(name, 0.0)
        stage = next(s for s in self.stages if s.name == name)
        stage.how = "+".join(dict.fromkeys(hows))
        stage.what = " + ".join(IMAGE_HOW.get(h, h) for h in dict.fromkeys(hows)) if name == "image" else stage.what

    @contextmanager
    def timed(self, name: str):
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.span(name, t0, time.monotonic())

    def span(self, name: str, t0: float, t1: float) -> None:
        """A stage from t0 to t1 (time.monotonic()); a stage timed in several pieces spans from its first piece's
        start to its last one's end (the steps between belong to it, or run beside it)."""
        stage = next((s for s in self.stages if s.name == name), None)
        if stage is None or stage.start is None:
            self.add(name, t1 - t0)
            stage = next(s for s in self.stages if s.name == name)
            stage.start = t0 - self.origin
        else:
            stage.seconds = max(stage.seconds, t1 - self.origin - stage.start)

    def seconds(self, name: str) -> float | None:
        return next((s.seconds for s in self.stages if s.name == name), None)

    def total(self, names) -> float:
        """The seconds of these stages, counting once the time where they overlapped (the data beside the image)."""
        timed = sorted((s.start, s.end) for s in self.stages if s.name in names and s.start is not None)
        total, reach = 0.0, float("-inf")
        for start, end in timed:
            total += max(0.0, end - max(start, reach))
            reach = max(reach, end)
        return total + sum(s.seconds for s in self.stages if s.name in names and s.start is None)

    def to_json(self) -> str:
        d = asdict(self)
        del d["origin"]
        return json.dumps(d, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Timeline | None:
        """None for text that is not a timeline (a file cut short, another version's): it is only ever a hint."""
        try:
            d = json.loads(text)
            stages = [Stage(s["name"], float(s["seconds"]), s.get("what", WHAT.get(s["name"], "")), str(s.get("how", "")),
                            None if s.get("start") is None else float(s["start"]))
                      for s in d["stages"] if s["name"] in STAGES]
            return cls(d["recipe"], d["preset"], d.get("type_name"), stages)
        except (ValueError, KeyError, TypeError):
            return None

    def lines(self) -> list[str]:
        width = max(len(s) for s in STAGES)
        return [f"{s.name.ljust(width)}  {s.seconds:8.1f} s  {s.what}{self.beside(s)}" for s in self.stages]

    def beside(self, stage: Stage) -> str:
        """For a stage that ran beside another one (the data while the image was made): when, and beside what."""
        others = [o.name for o in self.stages if o is not stage and o.start is not None and stage.start is not None
                  and o.name in SETUP and stage.name in SETUP and o.start < stage.end and stage.start < o.end]
        if not others:
            return ""
        return f" ({stage.start:.1f}-{stage.end:.1f} s into the launch, beside the {' and '.join(others)})"

    def matches(self, recipe: str, preset: str, type_name: str | None) -> bool:
        """Measured on the same kind of run: the recipe and preset, and the instance type where both know it."""
        return (self.recipe, self.preset) == (recipe, preset) and (not type_name or not self.type_name or type_name == self.type_name)


def trainer_stages(metrics_lines: list[str]) -> dict[str, float]:
    """Compile and first step from the trainer's metrics.jsonl lines of its latest start (an earlier run's, before a
    resume, are left out): the compile event's seconds, the first train event's milliseconds."""
    events = []
    for line in metrics_lines:
        try:
            e = json.loads(line)
        except ValueError:
            continue  # a line being written
        if isinstance(e, dict):
            if e.get("event") in ("start", "resume"):
                events = []
            events.append(e)
    out = {}
    compiled = next((e for e in events if e.get("event") == "compile"), None)
    if compiled and isinstance(compiled.get("seconds"), (int, float)):
        out["compile"] = float(compiled["seconds"])
    first = next((e for e in events if e.get("event") == "train"), None)
    if first and isinstance(first.get("ms"), (int, float)):
        out["first step"] = first["ms"] / 1000
    return out


def dollars_for(seconds: float, price_cents_per_hour: float, nodes: int = 1) -> float:
    """Instance seconds at an hourly price, in dollars."""
    return seconds / 3600 * price_cents_per_hour / 100 * nodes


def bill_line(tl: Timeline, price_cents_per_hour: float, nodes: int = 1, what: str = "") -> str:
    """What the run cost: the measured seconds x the live price, split into setup and training."""
    setup, training = tl.total(SETUP), tl.total(TRAINING)
    s, t = dollars_for(setup, price_cents_per_hour, nodes), dollars_for(training, price_cents_per_hour, nodes)
    return (f"cost{what}: setup {setup:.0f} s = ${s:,.2f} + training {training:.0f} s = ${t:,.2f}, "
            f"at ${price_cents_per_hour / 100:,.2f}/hour x{nodes}: ${s + t:,.2f}")


def setup_estimate(tl: Timeline | None, price_cents_per_hour: float | None, nodes: int = 1) -> list[str]:
    """The dry run's setup part: each setup stage's last measured seconds, or "not measured yet", and their price."""
    lines = []
    for name in SETUP:
        sec = tl.seconds(name) if tl else None
        lines.append(f"  {name}: " + (f"{sec:.0f} s (measured)" if sec is not None else "not measured yet"))
    if tl and tl.total(SETUP):
        price = f" = ${dollars_for(tl.total(SETUP), price_cents_per_hour, nodes):,.2f}" if price_cents_per_hour else ""
        head = f"setup: {tl.total(SETUP):.0f} s measured{price} (stages not measured yet are not in it)"
    else:
        head = "setup: not measured yet (the first launch measures it)"
    return [head, *lines]


def path_on_box(weights_dir: str) -> str:
    return f"{weights_dir.rstrip('/')}/{contract.TIMELINE_FILE}"


def local_path(fetch_to: Path) -> Path:
    """Where a launch that fetched the weights home keeps its timeline: beside them, in --fetch-to."""
    return fetch_to / contract.TIMELINE_FILE
