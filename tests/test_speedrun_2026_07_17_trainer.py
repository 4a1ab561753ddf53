"""The trainer's run of the 2026-07-17 recipe held to the record's own training loop, through figures stored in
tests/data/speedrun_2026_07_17_trainer.json: scripts/speedrun_2026_07_17_check_trainer.py ran the record's code
(its model, NorMuonAndAdam, schedule and loader, its main program's steps) and the trainer side by side on the CPU,
found them equal bit for bit, and kept the record's per-step losses, its validation losses and a checksum of each
of its final tensors, with the CPU capability and thread count that computed them. Here the trainer runs the same
command on the same shards and is held to those figures within bounds that cover another CPU's kernels.
"""

import json
import math

import pytest
import torch

from conftest import ROOT, script_module

FIGURES = json.loads((ROOT / "tests" / "data" / "speedrun_2026_07_17_trainer.json").read_text())
CHECK = script_module("speedrun_2026_07_17_check_trainer")  # the same shards, command line and checksums

# ATen's vectorised kernels (ATEN_CPU_CAPABILITY default, avx2, avx512) round their float32 sums, exps and norms in
# their own order, and below AVX-512 torch's CPU flash attention refuses bf16, so attention runs its math kernel
# (job/speedrun_2026_07_17/varlen.py); the model's weights, activations and gradients are bf16, so a sum that lands on
# the other side of a bf16 rounding moves by 2^-8 of itself, and the optimizer's steps carry it on. Measured against
# these figures (avx512 on one thread, where the trainer equals them bit for bit), on this project's 2-core AVX-512 Xeon:
# - the step losses: at most 1.0e-4 apart under `default`, 3.3e-5 under avx2. The bound is 10x that, and under the
#   2.0e-3 by which the trainer's step-2 loss moved when its zero_grad dropped Adam's even-step gradients (the bug
#   scripts/speedrun_2026_07_17_check_trainer.py found, batches / 32);
LOSS_TOL = 1e-3
# - the validation losses: at most 1.2e-4 apart (after the four steps);
VAL_TOL = 1e-3
# - a weight's checksum, against its scale: at most 3.4e-3 (the output layer and the embedding, avx2), 2.4e-3 (the
#   value-embedding gates), the rest under 1e-3;
WEIGHT_TOL = 2e-2
# - the FP8 down projection's scales (one amax / 448 per layer, refreshed after each step): 2.5e-2, where another
#   element of a bf16 weight becomes the largest.
FP8_SCALE_TOL = 1e-1
FP8_SCALES = ("_mlp_down_proj_scales", "_mlp_down_proj_next_scales")


def checksum_within(got: list[float], want: list[float], tol: float) -> bool:
    """A checksum (sum, sum of |x|, sum of x^2) within tol of the stored one, relative to the tensor's scale: the sum
    against the sum of |x| (a zero-mean tensor's sum cancels), the others against themselves. A tensor stored as all
    zeros must be all zeros."""
    scale, squares = abs(want[1]), abs(want[2])
    return abs(got[0] - want[0]) <= tol * scale and abs(got[1] - want[1]) <= tol * scale and abs(got[2] - want[2]) <= tol * squares


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The trainer on the stored settings, on the thread count that computed the figures (ATen's CPU reductions
    split their sums by it)."""
    data, log = tmp_path_factory.mktemp("doc-shards"), tmp_path_factory.mktemp("trainer")
    CHECK.write_shards(data)
    threads = torch.get_num_threads()
    torch.set_num_threads(FIGURES["threads"])
    try:
        return CHECK.run_trainer(FIGURES["settings"], data, log)
    finally:
        torch.set_num_threads(threads)


def test_the_figures_record_the_run_and_the_machine_that_computed_them():
    settings = FIGURES["settings"]
    steps = settings["scheduled_steps"] + settings["extension_steps"]
    assert FIGURES["bit_equal"] and len(FIGURES["losses"]) == steps
    assert FIGURES["cpu_capability"] and FIGURES["torch"] and FIGURES["threads"] >= 1
    assert sorted(map(int, FIGURES["val"])) == [0, steps]


@pytest.mark.slow  # trains (the module's run through job.train)
def test_the_trainer_takes_the_records_steps_losses(run):
    assert len(run["losses"]) == len(FIGURES["losses"])
    for step, (got, want) in enumerate(zip(run["losses"], FIGURES["losses"], strict=True)):
        assert math.isfinite(got) and got == pytest.approx(want, rel=LOSS_TOL, abs=0), step


@pytest.mark.slow  # trains (the module's run through job.train)
def test_the_trainer_evaluates_as_the_record_does(run):
    got = {str(k): v for k, v in run["val"].items()}
    assert got == pytest.approx(FIGURES["val"], rel=VAL_TOL, abs=0)


@pytest.mark.slow  # trains (the module's run through job.train)
def test_the_trainer_ends_with_the_records_weights(run):
    want = FIGURES["weights"]
    got = {k: CHECK.checksum(v) for k, v in run["state"].items() if v.is_floating_point()}
    assert sorted(got) == sorted(want)
    for name, figures in want.items():
        assert checksum_within(got[name], figures, FP8_SCALE_TOL if name in FP8_SCALES else WEIGHT_TOL), (name, got[name], figures)
