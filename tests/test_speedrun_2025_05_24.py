"""The speedrun recipe (a port of modded-nanogpt's 2025-05-24 record): its parts against first principles, the port
against figures recorded from the record's own code (tests/data/speedrun_reference.json, written by
scripts/speedrun_reference.py), and what a run of it logs and saves. Resume, SIGTERM and torchrun for every recipe are
tests/test_promises.py's."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import REFERENCES, ROOT, SPEEDRUN_SMALL, assert_one_line_error, events, losses, run_cli, script_module, vectorised_inductor
from job.optim import Optimizers
from job.recipes import speedrun_2025_05_24 as recipe
from job.speedrun_2025_05_24 import attention, gpt
from job.speedrun_2025_05_24.gpt import Rotary, SpeedrunConfig, SpeedrunGPT
from job.speedrun_2025_05_24.muon import Muon, newton_schulz

REFERENCE = json.loads((ROOT / "tests" / "data" / "speedrun_reference.json").read_text())
SIZE = REFERENCE["size"]


# --- components against first principles ------------------------------------------------------------
@pytest.mark.parametrize("shape", [(64, 64), (96, 32), (32, 96), (3, 48, 48)])
def test_newton_schulz_keeps_the_singular_vectors_and_flattens_the_singular_values(shape):
    """G with singular values spread 30x (its singular vectors from a random matrix's SVD)."""
    g = torch.Generator().manual_seed(0)
    U, _, Vh = torch.linalg.svd(torch.randn(shape, generator=g), full_matrices=False)
    S = torch.logspace(-1.5, 0, U.size(-1))
    G = U @ torch.diag_embed(S.expand(*U.shape[:-2], -1)) @ Vh
    X = newton_schulz(G, dtype=torch.float32)
    # In G's singular basis X is diagonal: the same singular vectors...
    D = U.mT @ X @ Vh.mT
    diag = torch.diagonal(D, dim1=-2, dim2=-1)
    assert (D - torch.diag_embed(diag)).abs().max() < 1e-5
    # ...and the singular values, 30x apart, pushed into a band around 1: the quintic trades exactness for speed.
    assert diag.min() > 0.65 and diag.max() < 1.2
    # So the result is near the SVD's orthogonal factor U V^T, not equal to it.
    polar = U @ Vh
    rel = (X - polar).norm(dim=(-2, -1)) / polar.norm(dim=(-2, -1))
    assert (rel < 0.25).all() and (rel > 0.05).all()
    # bf16, the record's precision, lands in the same place.
    assert (newton_schulz(G).float() - X).abs().max() < 0.03


def test_rotary_is_complex_multiplication_on_half_the_dimensions():
    D, T = 16, 40
    rot = Rotary(D, T)
    x = torch.randn(2, T, 3, D)
    y = rot(x)
    freq = (1 / 1024) ** torch.linspace(0, 1, D // 4)
    theta = torch.arange(T, dtype=torch.float32)[:, None] * torch.cat([freq, torch.zeros(D // 4)])
    z = torch.complex(x[..., : D // 2], x[..., D // 2:])
    rotated = z * torch.polar(torch.ones_like(theta), -theta)[None, :, None, :]
    torch.testing.assert_close(y, torch.cat([rotated.real, rotated.imag], dim=-1), rtol=1e-5, atol=1e-5)
    # The last quarter of the frequencies is zero: those pairs are not rotated at all.
    torch.testing.assert_close(y[..., D // 4: D // 2], x[..., D // 4: D // 2])
    # What rotary is for: q.k depends on the positions' difference only.
    q, k = torch.randn(D), torch.randn(D)
    qs, ks = rot(q.expand(1, T, 1, D).contiguous()), rot(k.expand(1, T, 1, D).contiguous())
    dots = [(qs[0, i + 5, 0] @ ks[0, i, 0]).item() for i in range(0, T - 5, 7)]
    assert max(dots) - min(dots) < 1e-4


def single_document(T):
    tokens = torch.randint(0, 50000, (T,))
    tokens[0] = attention.BOS
    return tokens


@pytest.mark.parametrize("window", [1, 2, 3, 8])
def test_mask_of_one_document_is_causal_within_the_window_of_blocks(window):
    T = 1024
    mask = attention.dense_mask(single_document(T), window)
    q, k = torch.arange(T)[:, None], torch.arange(T)[None, :]
    assert torch.equal(mask, (k <= q) & (q // 128 - k // 128 < window))


def test_mask_keeps_documents_apart_and_the_window_never_cuts_a_wide_one():
    T = 1024
    tokens = single_document(T)
    tokens[[200, 201, 640]] = attention.BOS  # documents of 200, 1, 439 and 384 tokens
    docs = (tokens == attention.BOS).cumsum(0)
    q, k = torch.arange(T)[:, None], torch.arange(T)[None, :]
    causal_doc = (k <= q) & (docs[:, None] == docs[None, :])
    assert torch.equal(attention.dense_mask(tokens, T // 128), causal_doc)
    for w in (1, 2, 3):
        mask = attention.dense_mask(tokens, w)
        assert not (mask & ~causal_doc).any()  # never across documents, never ahead
        assert torch.diagonal(mask).all()  # a token always sees itself
        assert mask.sum() < causal_doc.sum()
    # Any length: cut from the padded mask, the same pairs as the same tokens a block longer.
    torch.testing.assert_close(attention.dense_mask(tokens[:700], 3), attention.dense_mask(tokens, 3)[:700, :700])


# torch compiles FlexAttention for the CPU only with its AVX2 kernels (torch/_inductor/kernel/flex/flex_cpu.py): not
# on a CPU without AVX2, nor under ATEN_CPU_CAPABILITY=default. The trainer runs FlexAttention on CUDA only.
FLEX_ON_CPU = torch.cpu._is_avx2_supported() and os.environ.get("ATEN_CPU_CAPABILITY") != "default"


@pytest.mark.slow  # compiles (Inductor's CPU code generation)
@pytest.mark.skipif(not FLEX_ON_CPU, reason="torch compiles FlexAttention for the CPU only with AVX2 kernels")
def test_flex_attention_with_the_block_mask_equals_sdpa_with_the_dense_mask(monkeypatch):
    """The eager model's FlexAttention (compiled on its own; eager FlexAttention would ignore the block lists, and with
    them the window) against scaled_dot_product_attention with the dense mask, on the CPU. A shape past its limit of
    compiled shapes fails, where Dynamo would quietly run the eager FlexAttention."""
    T = 1024
    tokens = single_document(T)
    tokens[[300, 700]] = attention.BOS
    q, k, v = (torch.randn(1, T, 2, 64).transpose(1, 2) for _ in range(3))
    lists = attention.block_lists(tokens)
    torch._dynamo.reset()  # the compiles of FlexAttention by tests before this one count towards the limit
    monkeypatch.setattr(gpt, "FLEX_SHAPES", 1)
    # torch's default, as in a trainer (tests/conftest.py makes the limit an error in the test processes): the failure
    # below must come from the model's own setting. Through torch's own patch: monkeypatch would undo its setattr with a
    # delattr (the setting is no entry of the config module's __dict__), and a deleted setting of torch's config stays
    # hidden from every later test of the worker.
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=False), vectorised_inductor():
        for w in (1, 3, 8):
            got = gpt.flex_attention(q, k, v, attention.flex_block_mask(lists, torch.tensor(w, dtype=torch.int32)), 0.12)
            want = F.scaled_dot_product_attention(q, k, v, attn_mask=attention.dense_mask(tokens, w), scale=0.12)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        shorter = attention.flex_block_mask(attention.block_lists(tokens[:896]), torch.tensor(1, dtype=torch.int32))
        with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):
            gpt.flex_attention(q[:, :, :896], k[:, :, :896], v[:, :, :896], shorter, 0.12)


def test_softcap_bounds_the_logits_as_a_shifted_tanh():
    torch.manual_seed(0)
    model = SpeedrunGPT(SpeedrunConfig(n_head=1, n_embd=64, block_size=128))
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 40.0)  # raw logits far beyond the cap
    idx = torch.randint(0, 50257, (1, 128))
    logits, _ = model(idx)
    assert 0 <= logits.min() < 0.5 and 29.5 < logits.max() <= 30  # saturated, never beyond
    # 30 sigmoid(z / 7.5 sqrt(d)) = 15 (1 + tanh(z / 15 sqrt(d))): the record's shifted form of Gemma 2's tanh cap.
    h = F.rms_norm(torch.randn(5, 64), (64,))
    z = h @ model.lm_head.weight.T
    capped = 30 * torch.sigmoid(z / (7.5 * 8))
    torch.testing.assert_close(capped, 15 * (1 + torch.tanh(z / (15 * 8))), rtol=1e-5, atol=1e-4)


def test_schedules_are_the_records():
    steps = REFERENCE["training"]["steps"]
    for step, fig in enumerate(steps):
        assert recipe.window_blocks(step, SIZE["iterations"]) == fig["window_blocks"]
        # Python's float64 arithmetic, no vector kernels: only a differently written formula could round apart.
        assert recipe.lr_factor(step, SIZE["iterations"]) == pytest.approx(fig["lr_factor"], rel=1e-12)
    # Over the record's 1770 steps: the window grows from one block to 14 (1792 tokens); the learning rate holds for
    # 60% of the run, then falls linearly to a tenth; Muon's momentum warms up over 300 steps.
    assert recipe.window_blocks(0, 1770) == 1 and recipe.window_blocks(1770, 1770) == 14
    assert recipe.lr_factor(1061, 1770) == 1.0 and recipe.lr_factor(1770, 1770) == pytest.approx(0.1)
    assert recipe.muon_momentum(0) == 0.85 and recipe.muon_momentum(150) == pytest.approx(0.9)
    assert recipe.muon_momentum(300) == recipe.muon_momentum(1000) == pytest.approx(0.95)


# --- the port against the record's own code -----------------------------------------------------------
# The recorded figures carry the kernels of the CPU that computed them (REFERENCE's cpu_capability, cpu, threads):
# ATen's vectorised kernels (ATEN_CPU_CAPABILITY default, avx2, avx512), the BLAS's kernel for the CPU model and the
# thread count each round float32 sums their own way. In one process the port equals the record's code to the last
# bit (scripts/bench_speedrun.py); against a file written on another machine each figure is held to a bound that
# follows from how that rounding grows. The bounds were set against measurements: the record's code run under
# `default`, avx2 and avx512, with one and with two threads, on an AVX-512 Xeon, plus the figures an earlier machine
# recorded (21 pairs of runs); each bound is several times the largest difference seen and below what a porting bug
# moves (a learning rate 5% off, no momentum warm-up, a window one block wider, a lambda left out), measured the same
# way against these figures.

# Initial weights are float32 draws: the scalar and the vectorised normal_ kernels round the transform's last bits
# differently, a few ulp (2^-24) per element, so a checksum moves by a few 1e-8 of its scale (measured: 2.2e-8
# between `default` and avx2/avx512, 2e-16 between the vector kernels, the float64 sums' order). A wrong draw (another
# bound or distribution, another order) moves them by percents.
INIT_TOL = 1e-6
# A mean cross-entropy in float32 through 12 layers: measured at most 1.7e-7 apart (2 ulp of 11.3). The bound, ~24 ulp,
# is under the smallest gap between two windows' losses on one batch (9.7e-6: 5 and 8 blocks) and far under a lambda
# left out of the attention's value mix (4.7e-4).
LOSS_TOL = 2e-6
# After a step the loss also carries the weights' drift (below): measured at most 3.7e-5 by the fourth step.
STEP_LOSS_TOL = 2e-4
# Adam's first step is lr * m/(sqrt(v) + eps) = +-lr per element whatever the gradient's last bits (bar a gradient
# within rounding of zero): the weights differ only by the rounding of w +- lr (measured at most 1.9e-7). An Adam
# learning rate 5% off moves them at least 7.3e-4 (embeddings), 1.9e-3 (output layer), 2.4e-2 (scalars).
ADAM_FIRST_STEP_TOL = 1e-5
# Muon orthogonalises in bfloat16 (8-bit mantissa): a gradient element whose float32 value differs in the last bits
# rounds to another bf16 value when it sits at a rounding boundary, and five bf16 Newton-Schulz iterations spread it.
# Measured: 7.4e-5 of a matrix's scale after one step, 3.0e-4 after four; Adam's embeddings and output layer, fed the
# drifted activations, at most 1.7e-4 after four. A Muon learning rate 5% off moves the matrices 2.1e-3 by the second
# step and 6.5e-3 by the fourth; no momentum warm-up, 2.9e-3 by the third; an Adam learning rate 5% off, 2.3e-3 by
# the second (embeddings); Adam's betas (0.9, 0.95), 3.0e-3 by the third.
WEIGHT_TOL = 2e-3
# The scalars (lambdas, skip weights) after the first step: a few numbers each, stepped by about lr times the sign of
# a gradient that is often near zero, so one sign flipped by rounding moves a tensor's sums by percents of lr / |w|:
# measured up to 7.1e-3 by the fourth step. Their learning rate is held by the first step's bound, their use in the
# forward by the losses'.
SCALAR_TOL = 3e-2
# The FP8 op's inputs are the same bits everywhere and its float8 rounding is elementwise; what differs is the
# float32 accumulation of the scaled matmuls: measured 1.9e-6 (`default` against the vector kernels), 0 between
# avx2 and avx512. An input scale 5% off moves the output 1.1e-4, the weight's scale 24/448 -> 25/448 moves it 4.2e-4.
FP8_TOL = 2e-5


def reference_model() -> SpeedrunGPT:
    torch.manual_seed(SIZE["seed"])
    return SpeedrunGPT(SpeedrunConfig(vocab_size=SIZE["vocab_size"], n_layer=SIZE["n_layer"], n_head=SIZE["n_head"],
                                      n_embd=SIZE["n_embd"], block_size=SIZE["seq_len"]))


REF = script_module("speedrun_reference")  # the same seeded noise, batches and checksums as the recorded figures
perturb, batch, checksum = REF.perturb, REF.batch, REF.checksum


def checksum_within(got: list[float], want: list[float], tol: float) -> bool:
    """A checksum (sum, sum of |x|, sum of x^2) within tol of the recorded one, relative to the tensor's scale: the
    sum against the sum of |x| (a zero-mean tensor's sum cancels, so its own relative error means nothing), the
    others against themselves. A tensor recorded as all zeros must be all zeros."""
    scale, squares = abs(want[1]), abs(want[2])
    return abs(got[0] - want[0]) <= tol * scale and abs(got[1] - want[1]) <= tol * scale and \
        abs(got[2] - want[2]) <= tol * squares


def assert_weights(model, want: dict, tol) -> None:
    """tol: a bound, or a function of (name, parameter) giving each tensor's."""
    got = {n: checksum(p) for n, p in model.named_parameters()}
    assert list(got) == list(want)  # the same parameters, in the same order
    params = dict(model.named_parameters())
    for name, figures in want.items():
        bound = tol(name, params[name]) if callable(tol) else tol
        assert checksum_within(got[name], figures, bound), (name, got[name], figures, bound)


def test_the_reference_records_the_machine_that_computed_it():
    """What the figures' rounding depends on, for whoever compares them on another machine."""
    assert REFERENCE["cpu_capability"] and REFERENCE["cpu"] and REFERENCE["torch"] and REFERENCE["threads"] >= 1


def test_same_seed_gives_the_records_initial_weights():
    assert_weights(reference_model(), REFERENCE["init"], INIT_TOL)


@pytest.mark.slow  # ten forwards of the whole 12-layer model over 1,024 tokens: seconds, kept out of the edit loop
def test_forward_loss_matches_the_records_for_every_window():
    model = reference_model()
    perturb(model)
    model.eval()
    with torch.no_grad():
        for key, want in REFERENCE["forward_losses"].items():
            step, window = map(int, key.split("/"))
            tokens = batch(step)
            model.window_blocks.fill_(window)
            _, loss = model(tokens[None, :-1], tokens[None, 1:])
            assert loss.item() == pytest.approx(want, rel=LOSS_TOL, abs=0), key


def step_tolerance(step: int, muon_params: set):
    def tol(name, p):
        if step == 0 and p not in muon_params:  # Adam's: the embeddings, the output layer, the scalars
            return ADAM_FIRST_STEP_TOL
        return SCALAR_TOL if p.ndim < 2 else WEIGHT_TOL

    return tol


@pytest.fixture
def reference_threads():
    """torch on the reference's thread count: Inductor's CPU code splits its bf16 reductions by the thread count it
    compiles for (a test process may have been given fewer, e.g. one per pytest-xdist worker), and the bounds above were
    measured for one and two threads in a process started with the machine's default."""
    threads = torch.get_num_threads()
    torch.set_num_threads(REFERENCE["threads"])
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow  # compiles (Inductor's CPU code generation)
def test_training_steps_match_the_records_losses_and_weights(reference_threads):
    """Four steps of Muon and Adam with the record's groups, learning rates and schedules, from the same weights and
    batches; the gradient is the summed loss's, as the record's; Newton-Schulz compiled in bf16, as the record runs
    it. Every loss and every weight after each step is held to the bounds above."""
    model = reference_model()
    perturb(model)
    adam_groups, matrices = recipe.param_groups(model)
    adam = torch.optim.Adam(adam_groups, betas=recipe.ADAM_BETAS, eps=recipe.ADAM_EPS, fused=True)
    muon = Muon([dict(params=ps) for ps in matrices], lr=recipe.MUON_LR, momentum=0.95, ns_dtype=torch.bfloat16,
                orthogonalize=torch.compile(newton_schulz))
    for opt in (adam, muon):
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    optimizers = Optimizers([adam, muon])
    cfg = type("Cfg", (), {"max_steps": SIZE["iterations"], "hp": recipe.Hparams()})()  # the record's hyperparameters
    for step, want in enumerate(REFERENCE["training"]["steps"]):
        tokens = batch(10 + step)
        recipe.RECIPE.model_schedule(model, step, cfg)
        _, loss = model(tokens[None, :-1], tokens[None, 1:])
        (loss * SIZE["seq_len"]).backward()
        recipe.RECIPE.schedule(optimizers, step, cfg)
        optimizers.step()
        optimizers.zero_grad()
        # The first loss is a forward pass on the initial weights; later ones carry the steps' drift.
        assert loss.item() * SIZE["seq_len"] == pytest.approx(want["loss"], rel=LOSS_TOL if step == 0 else STEP_LOSS_TOL,
                                                              abs=0), step
        assert_weights(model, want["weights"], step_tolerance(step, {p for ps in matrices for p in ps}))


@pytest.mark.slow  # compiles (Inductor's CPU code generation)
def test_fp8_matmul_matches_the_records():
    from job.speedrun_2025_05_24.fp8 import fp8_mm

    g = torch.Generator().manual_seed(SIZE["seed"] + 7)
    dim = SIZE["n_embd"]
    x = torch.randn(256, dim, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(512, dim, generator=g) * 0.05).requires_grad_()
    out = fp8_mm(x, w, dim ** 0.5 / 448, 24 / 448, 1 / 448)[0]
    out.backward(torch.randn(out.shape, generator=g).bfloat16())
    want = REFERENCE["fp8"]
    for name, t in (("out", out), ("grad_x", x.grad), ("grad_w", w.grad)):
        assert checksum_within(checksum(t), want[name], FP8_TOL), (name, checksum(t), want[name])
    # And it is a matmul: within FP8's precision of the exact product.
    exact = x.detach().float() @ w.detach().T
    assert (out.float() - exact).norm() / exact.norm() < 0.1


def test_muon_momentum_state_is_whole_on_every_rank_and_scales_tall_matrices():
    p_tall, p_wide = torch.nn.Parameter(torch.zeros(8, 2)), torch.nn.Parameter(torch.zeros(2, 8))
    opt = Muon([dict(params=[p_tall]), dict(params=[p_wide])], lr=0.1, ns_dtype=torch.float32)
    g = torch.randn(8, 2)
    p_tall.grad, p_wide.grad = g.clone(), g.T.clone()
    opt.step()
    assert set(opt.state) == {p_tall, p_wide}
    # The tall matrix's step is sqrt(rows/cols) = 2 times larger: the same RMS change per element.
    assert p_tall.norm().item() == pytest.approx(2 * p_wide.norm().item(), rel=1e-5)
    assert math.isfinite(p_tall.sum().item())


# --- the trainer's promises, for this recipe -------------------------------------------------------------
STEPS = 12


def sr_cmd(data_dir, log_dir, *extra) -> list[str]:
    return ["-m", "job.train", *SPEEDRUN_SMALL, "--data-dir", str(data_dir), "--log-dir", str(log_dir), "--max-steps", str(STEPS),
            *map(str, extra)]


@pytest.fixture
def sr_reference(references):
    return references["speedrun-2025-05-24"]  # tests/conftest.py's run of the recipe, shared with tests/test_promises.py


@REFERENCES
def test_speedrun_run_learns_logs_its_schedules_and_checkpoints_both_optimizers(sr_reference):
    ls = losses(sr_reference)
    assert ls[STEPS - 1] < ls[0] - 1.0
    head = (sr_reference / "train.log").read_text().splitlines()[0]
    assert "(speedrun-2025-05-24 recipe)" in head and "attention SDPA with the same mask" in head and "output layer float32" in head
    train = events(sr_reference, "train")
    assert [round(e["muon_momentum"], 6) for e in train[:3]] == [0.85, round(0.85 + 0.1 / 300, 6), round(0.85 + 0.2 / 300, 6)]
    assert train[-1]["lr_factor"] == pytest.approx(recipe.lr_factor(STEPS - 1, STEPS))
    assert "ETA" in (sr_reference / "train.log").read_text()
    assert [v["step"] for v in events(sr_reference, "val")] == [0, 5, 10, 12]
    assert [h["step"] for h in events(sr_reference, "hellaswag")] == [0, 6, 12]
    assert events(sr_reference, "sample")[-1]["step"] == STEPS
    ck = torch.load(sr_reference / "model_00012.pt", map_location="cpu", weights_only=True)
    assert ck["train_config"]["recipe"] == "speedrun-2025-05-24"
    adam, muon = ck["optimizer"]["optimizers"]
    model = SpeedrunGPT(SpeedrunConfig(**{k: ck["config"][k] for k in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size")}))
    matrices = sum(len(ps) for ps in recipe.param_groups(model)[1])
    assert len(muon["state"]) == matrices and all("momentum_buffer" in s for s in muon["state"].values())
    assert len(adam["state"]) == sum(len(g["params"]) for g in adam["param_groups"])
    assert muon["param_groups"][0]["momentum"] == pytest.approx(recipe.muon_momentum(STEPS - 1))


@REFERENCES
def test_speedrun_checkpoint_samples_and_export_refuses_in_one_line(sr_reference, tmp_path):
    proc = run_cli("-m", "job.sample", "--checkpoint", sr_reference, "--num", "2", "--max-tokens", "8", "--prompt", "ROMEO:",
                   check=True)
    assert proc.stdout.count("sample ") == 2 and "step 12" in proc.stdout
    out = tmp_path / "hf"
    proc = run_cli("-m", "job.export", "--checkpoint", sr_reference, "--out", out)
    assert proc.returncode == 2
    assert_one_line_error(proc, "--recipe speedrun-2025-05-24", "job.sample")
    assert not out.exists()


@pytest.mark.parametrize("flags, needle", [
    (["--micro-batch", "2"], "--micro-batch 1"),
    (["--n-layer", "6"], "12 layers"),
    (["--seq-len", "200", "--val-seq-len", "256"], "multiple of 128"),
    (["--val-tokens", "1000"], "--val-tokens 1000"),
    (["--grad-clip", "1.0"], "--grad-clip"),
    (["--n-embd", "120", "--n-head", "4"], "not a multiple of 4"),
])
def test_speedrun_settings_it_cannot_run_are_one_line(shards, tmp_path, flags, needle, capsys):
    """The trainer's own entry point, in this process (tests/test_bad_inputs.py runs the command lines)."""
    from job.train import main

    with pytest.raises(SystemExit) as e:
        main(sr_cmd(shards, tmp_path / "log", *flags)[2:])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not (tmp_path / "log").exists()


def test_flops_per_token_count_the_window_not_the_whole_sequence():
    from job.recipes.speedrun_2025_05_24 import PRESETS
    from job.speedrun_2025_05_24.gpt import MAX_WINDOW

    size = PRESETS["gpt2"]
    model = SpeedrunGPT(SpeedrunConfig(n_head=size["n_head"], n_embd=size["n_embd"], block_size=1024))
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n)
    # 11 attention layers (none in layer 7): 3 with the long window (0, 4, 11; layer 7's would be the fourth), 8 short.
    assert model.flops_per_token(48 * 1024) == 6 * matmul + 6 * 768 * (3 * MAX_WINDOW + 8 * MAX_WINDOW // 2)
    assert model.flops_per_token(256) == 6 * matmul + 6 * 768 * 11 * 256  # a sequence shorter than any window
    assert recipe.window_blocks(1770, 1770) * 128 == MAX_WINDOW


@pytest.mark.parametrize("name", ["bench_speedrun", "speedrun_reference"])
def test_the_record_scripts_load_and_refuse_a_missing_record_in_one_line(name, tmp_path, capsys):
    """They run the record's own code, which is never in this repository: without it they say what to pass."""
    module = script_module(name)
    with pytest.raises(SystemExit) as e:
        module.main(["--record", str(tmp_path / "missing.txt"), "--device", "cpu"] if name == "bench_speedrun" else
                    ["--record", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "out.json")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --record") and "does not exist" in err and len(err.splitlines()) == 1, err
    assert f"`curl -LO {script_module('speedrun_reference').RECORD_LOG}`" in err and "/2025-05-24_StableTorch/" in err  # where it is
    assert not (tmp_path / "out.json").exists()


def test_the_reference_script_replaces_an_existing_file_only_with_force(tmp_path):
    """The tests' figures are not overwritten by a run on the wrong file: --out is required, an existing one is
    refused unless --force is given, before the record is read."""
    record = tmp_path / "record.txt"
    record.write_text("import os\n")  # a file, but no record: --force gets as far as refusing it
    out = tmp_path / "speedrun_reference.json"
    out.write_text("{}\n")
    script = ROOT / "scripts" / "speedrun_reference.py"
    proc = run_cli(script, "--record", record, "--out", out)
    assert proc.returncode == 2
    assert_one_line_error(proc, f"--out {out} exists", "--force")
    assert out.read_text() == "{}\n"
    proc = run_cli(script, "--record", record)
    assert proc.returncode == 2
    assert_one_line_error(proc, "--out")
    proc = run_cli(script, "--record", record, "--out", out, "--force")
    assert proc.returncode == 2
    assert_one_line_error(proc, "is not the record's train_gpt.py or log", "curl -LO")
    assert out.read_text() == "{}\n"
