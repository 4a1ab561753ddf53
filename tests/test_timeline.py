"""The launch's timeline (infra/timeline.py): its stages from the trainer's own metrics events, the JSON it is kept
as, and the bill: instance seconds x the hourly price, split into setup and training."""

from __future__ import annotations

import json

from infra.timeline import STAGES, Timeline, bill_line, dollars_for, setup_estimate, trainer_stages
from job.metrics import MetricsLogger


def measured() -> Timeline:
    tl = Timeline("gpt2", "tiny", "gpu_1x_a10")
    for name, seconds in [("training", 7000.0), ("boot", 120.0), ("preflight", 30.0), ("image", 600.0), ("data", 300.0),
                          ("compile", 60.0), ("first step", 61.5), ("fetch", 150.0), ("training", 200.0)]:
        tl.add(name, seconds)
    return tl


def test_stages_keep_the_launchs_order_and_add_up_a_stage_measured_in_pieces():
    tl = measured()
    assert [s.name for s in tl.stages] == list(STAGES)
    assert tl.seconds("training") == 7200.0  # two pieces: the steps that start the run, then the run itself
    lines = tl.lines()
    assert len(lines) == len(STAGES) and lines[0].split()[:3] == ["boot", "120.0", "s"]
    assert "first step" in lines[5] and "61.5 s" in lines[5] and "the trainer's first train event" in lines[5]


def test_the_bill_is_instance_seconds_times_the_hourly_price_split_into_setup_and_training():
    tl = measured()
    # setup: boot + preflight + image + data + fetch = 120 + 30 + 600 + 300 + 150 = 1200 s; at 75 cents an hour that is
    # a third of an hour = 25 cents. Training: 7200 s = 2 h = $1.50. Compile and first step are inside training.
    assert dollars_for(3600, 75) == 0.75 and dollars_for(1200, 75) == 0.25
    assert bill_line(tl, 75) == "cost: setup 1200 s = $0.25 + training 7200 s = $1.50, at $0.75/hour x1: $1.75"
    assert bill_line(tl, 75, nodes=2).endswith("at $0.75/hour x2: $3.50")


def test_compile_and_first_step_come_from_the_trainers_latest_start(tmp_path):
    log = MetricsLogger(tmp_path)  # the trainer's own writer, so the test reads what it writes
    log.event("start", config={}, world=1)
    log.event("compile", step=0, seconds=95.5, cache_hits=0, cache_misses=4)
    log.event("train", step=0, loss=11.0, lr=1e-4, norm=1.0, ms=96000.0, tokens=8, tok_s=1.0)
    log.event("train", step=1, loss=10.0, lr=1e-4, norm=1.0, ms=100.0, tokens=8, tok_s=1.0)
    log.event("resume", step=2, path="model_00002.pt")  # a relaunch: its compile hits the cache
    log.event("compile", step=2, seconds=7.25, cache_hits=4, cache_misses=0)
    log.event("train", step=2, loss=9.0, lr=1e-4, norm=1.0, ms=7400.0, tokens=8, tok_s=1.0)
    log.event("train", step=3, loss=8.0, lr=1e-4, norm=1.0, ms=90.0, tokens=8, tok_s=1.0)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert trainer_stages(lines) == {"compile": 7.25, "first step": 7.4}
    assert trainer_stages(lines[:4]) == {"compile": 95.5, "first step": 96.0}
    assert trainer_stages(lines[:1] + ['{"event": "tr']) == {}  # no compile (CPU), a line half written


def test_the_json_kept_on_the_box_reads_back_and_anything_else_is_no_timeline():
    tl = measured()
    d = json.loads(tl.to_json())
    assert d["recipe"] == "gpt2" and d["preset"] == "tiny" and d["type_name"] == "gpu_1x_a10"
    assert [(s["name"], s["seconds"]) for s in d["stages"]][:2] == [("boot", 120.0), ("preflight", 30.0)]
    assert Timeline.from_json(tl.to_json()) == tl
    for junk in ("", "{", "[]", '{"recipe": "gpt2"}', '{"recipe": "gpt2", "preset": "tiny", "stages": [{"name": "boot"}]}'):
        assert Timeline.from_json(junk) is None, junk
    assert tl.matches("gpt2", "tiny", "gpu_1x_a10") and tl.matches("gpt2", "tiny", None)
    assert not tl.matches("gpt2", "gpt2", "gpu_1x_a10") and not tl.matches("gpt2", "tiny", "gpu_8x_h100_sxm5")


def test_setup_estimate_names_each_stage_never_measured():
    assert setup_estimate(None, 75) == ["setup: not measured yet (the first launch measures it)", "  boot: not measured yet",
                                        "  preflight: not measured yet", "  image: not measured yet", "  data: not measured yet",
                                        "  fetch: not measured yet"]
    tl = Timeline("gpt2", "tiny")
    tl.add("preflight", 30.0)
    tl.add("image", 690.0)
    lines = setup_estimate(tl, 75)
    assert lines[0] == "setup: 720 s measured = $0.15 (stages not measured yet are not in it)"  # 0.2 h x $0.75
    assert lines[1:] == ["  boot: not measured yet", "  preflight: 30 s (measured)", "  image: 690 s (measured)",
                         "  data: not measured yet", "  fetch: not measured yet"]


def test_the_image_stage_says_how_each_node_got_the_image_and_keeps_it_in_the_json():
    tl = Timeline("gpt2", "tiny")
    tl.mark("image", ["pulled"])  # the step says how, then its seconds come as for every stage
    tl.add("image", 12.5)
    (image,) = tl.stages
    assert (image.seconds, image.how, image.what) == (12.5, "pulled", "trainer image pulled from the registry")
    back = Timeline.from_json(tl.to_json())
    assert back.stages[0].how == "pulled" and "pulled from the registry" in back.lines()[0]
    tl.mark("image", ["found", "pulled", "pulled"])  # two nodes: one had it, two pulled
    assert tl.stages[0].how == "found+pulled" and tl.stages[0].seconds == 12.5
    old = json.loads(tl.to_json())  # a timeline kept before stages said how still reads
    del old["stages"][0]["how"]
    assert Timeline.from_json(json.dumps(old)).stages[0].how == ""


def test_stages_that_ran_beside_each_other_are_billed_once_and_say_so():
    tl = Timeline("gpt2", "tiny")
    t0 = tl.origin
    tl.span("preflight", t0 + 0.0, t0 + 2.0)
    tl.span("data", t0 + 2.0, t0 + 3.0)  # the data image built and its container started...
    tl.span("image", t0 + 3.0, t0 + 40.0)  # ...the trainer image built meanwhile...
    tl.span("data", t0 + 40.0, t0 + 55.0)  # ...and the data's end waited for: one stage, from its start to its end
    assert [(s.name, s.start, s.seconds) for s in tl.stages] == [("preflight", 0.0, 2.0), ("image", 3.0, 37.0), ("data", 2.0, 53.0)]
    assert tl.total(("preflight", "image", "data")) == 55.0  # not 2 + 37 + 53: the launch's wall time
    tl.add("fetch", 10.0)  # measured without a start: added as it is
    assert tl.total(("preflight", "image", "data", "fetch")) == 65.0
    assert bill_line(tl, 3600).startswith("cost: setup 65 s = $0.65")
    lines = tl.lines()
    assert lines[2].endswith("(2.0-55.0 s into the launch, beside the image)") and lines[1].endswith("beside the data)")
    assert "into the launch" not in lines[0]
    back = Timeline.from_json(tl.to_json())
    assert back == tl and back.stages[2].start == 2.0 and "origin" not in json.loads(tl.to_json())
