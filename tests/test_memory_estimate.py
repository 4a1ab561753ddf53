"""scripts/estimate_memory.py: one training step's peak memory from fake tensors, and the presets' micro-batches
chosen from it."""

import json

import pytest

from conftest import ROOT, assert_one_line_error, run_cli
from job.config import from_dict
from job.model import GPT

SCRIPT = ROOT / "scripts" / "estimate_memory.py"
GiB = 2**30


def estimate(tmp_path, *args) -> dict:
    out = tmp_path / "est.json"
    run_cli(SCRIPT, *args, "--json", out, check=True, timeout=600)
    return json.loads(out.read_text())["bytes"]


@pytest.mark.slow  # seconds of real work (a kill and resume, a full export, a model trace): not the edit loop
def test_the_estimate_counts_the_weights_and_adams_moments_exactly(tmp_path):
    est = estimate(tmp_path, "--preset", "tiny", "--set", "ce_chunk_tokens=0")  # full logits (tiny's default is chunked)
    weights = 4 * sum(p.numel() for p in GPT(from_dict({"preset": "tiny"}).model_config()).parameters())  # fp32, tied once
    assert est["Parameter"] == weights
    assert 2 * weights <= est["Optstate"] <= 2 * weights + 4096  # two moments, plus a step counter per tensor
    assert est["Activation"] > 0 and est["Total"] == sum(v for k, v in est.items() if k != "Total")
    # The chunked loss never holds the B x T x 50304 logits at once: the step's temporaries shrink.
    chunked = estimate(tmp_path, "--preset", "tiny", "--set", "ce_chunk_tokens=256")
    assert chunked["Temp"] < est["Temp"] / 2 and chunked["Parameter"] == weights


@pytest.mark.slow
def test_it_bounds_the_step_measured_on_an_h100(tmp_path):
    # docs/BENCHMARKS.md, one H100, gpt2 at B=64 T=1024: 59.9 GiB for the plain eager step (fp32 residual stream,
    # full logits), 41.7 GiB compiled.
    total = estimate(tmp_path, "--preset", "gpt2", "--micro-batch", "64", "--set", "residual_dtype=float32",
                     "--set", "ce_chunk_tokens=0")["Total"] / GiB
    assert 59.9 <= total <= 1.25 * 59.9
    # The bf16 stream keeps half-size activations between the blocks (compiled on the H100: 39.4-39.8 GiB)...
    bf16_stream = estimate(tmp_path, "--preset", "gpt2", "--micro-batch", "64", "--set", "ce_chunk_tokens=0")["Total"] / GiB
    assert bf16_stream < total - 1
    # ...and the default chunked loss never holds the 6.1 GiB of bf16 logits nor their fp32 temporaries (compiled on
    # the H100: 28.5 GiB).
    default = estimate(tmp_path, "--preset", "gpt2", "--micro-batch", "64")["Total"] / GiB
    assert default < bf16_stream - 2 * 6.1


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["gpt2-medium", "gpt2-large", "gpt2-xl"])
def test_the_larger_presets_micro_batch_fits_an_80gb_card_with_room(tmp_path, preset):
    est = estimate(tmp_path, "--preset", preset)  # the preset's own micro-batch
    assert est["Total"] / GiB <= 0.8 * 80


def test_a_mistake_is_one_line():
    assert_one_line_error(run_cli(SCRIPT, "--preset", "tiny", "--set", "no_such=1"), "no_such=1' is not key=value with a TrainConfig field")
    assert_one_line_error(run_cli(SCRIPT, "--preset", "gpt5"), "unknown preset 'gpt5'")
