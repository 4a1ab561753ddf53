"""The launch's timeline: how long each stage took, what it was, and what the instance cost.

`fab launch` times its own stages on the laptop (boot, preflight, image, data, training, fetch) and takes compile and
first step from the trainer's metrics.jsonl (its `compile` event and its first `train` event), so those two are the
trainer's own clock, inside the training stage. The timeline is kept as JSON in the run's log dir on the box
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
# others add up to what the instance was billed for.
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


@dataclass
class Timeline:
    recipe: str
    preset: str
    type_name: str | None = None  # the Lambda instance type, where known
    stages: list[Stage] = field(default_factory=list)

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
            self.add(name, time.monotonic() - t0)

    def seconds(self, name: str) -> float | None:
        return next((s.seconds for s in self.stages if s.name == name), None)

    def total(self, names) -> float:
        return sum(s.seconds for s in self.stages if s.name in names)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Timeline | None:
        """None for text that is not a timeline (a file cut short, another version's): it is only ever a hint."""
        try:
            d = json.loads(text)
            stages = [Stage(s["name"], float(s["seconds"]), s.get("what", WHAT.get(s["name"], "")), str(s.get("how", "")))
                      for s in d["stages"] if s["name"] in STAGES]
            return cls(d["recipe"], d["preset"], d.get("type_name"), stages)
        except (ValueError, KeyError, TypeError):
            return None

    def lines(self) -> list[str]:
        width = max(len(s) for s in STAGES)
        return [f"{s.name.ljust(width)}  {s.seconds:8.1f} s  {s.what}" for s in self.stages]

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
