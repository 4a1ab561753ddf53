"""The 2026-07-17 record's model (job/speedrun_2026_07_17): each part against first principles, and the whole model's
forward and backward at a tiny size. scripts/speedrun_2026_07_17_check.py holds the port to the record's own code,
which is not in this repository."""

import math

import pytest
import torch
import torch.nn.functional as F

from job.speedrun_2026_07_17 import kernels, rotary, varlen
from job.speedrun_2026_07_17.bos_loader import bigram_hash
from job.speedrun_2026_07_17.transformer import GPT, ForwardSchedule, GPTConfig, layer_windows

A, B, C = kernels.SOFTCAP
E4M3_REL = 2**-4  # e4m3 keeps 3 mantissa bits: rounding moves a normal number by at most half a unit, 2^-4 of it
E5M2_REL = 2**-3
BF16_REL = 2**-8

# --- the soft-capped multi-token cross-entropy --------------------------------------------------------------------


def ce_case(n=6, vocab=11, weights=(1.0, 0.5, 0.25), seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, vocab, generator=g) * 20).bfloat16()
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[3] = targets[1]  # a repeated target: row 1's predictions 0 and 2 land on one column
    return logits, targets, torch.tensor(weights)


def test_the_soft_cap_is_a_shifted_scaled_sigmoid():
    z = torch.linspace(-60, 60, 241).bfloat16()
    s32, s = kernels.softcap(z)
    exact = torch.sigmoid((z.double() + B) / C)
    assert (s32.double() - exact).abs().max() < 1e-6
    assert torch.equal(s, s32.bfloat16())
    capped = A * s32
    assert capped.min() > 0 and capped.max() < A and capped[120].item() == pytest.approx(A / (1 + math.exp(-5 / 7.5)), rel=1e-6)


def test_the_multi_token_loss_is_the_weighted_sum_of_shifted_next_token_losses():
    """Row r's loss is sum_k w_k CE(capped logits of row r, target of row r + k), for the k that stay in the batch."""
    logits, targets, weights = ce_case()
    losses, s, _ = kernels.softcapped_ce(logits, targets, weights)
    capped = A * s.double()  # the kernel's logits: the sigmoid rounded to bf16, times 23
    n = len(targets)
    expected = torch.zeros(n, dtype=torch.float64)
    for k, w in enumerate(weights.tolist()):
        expected[: n - k] += w * F.cross_entropy(capped[: n - k], targets[k:], reduction="none")
    assert torch.allclose(losses.double(), expected, rtol=1e-6, atol=1e-5)
    # The last rows lose the predictions past the end: the final row has only its next token.
    assert losses[-1].item() == pytest.approx(F.cross_entropy(capped[-1:], targets[-1:]).item(), rel=1e-6)


def test_the_loss_gradient_is_the_derivative_of_the_capped_cross_entropy():
    """For rows whose every prediction stays in the batch, the kernel's gradient (times grad_s, over the incoming
    gradient) is d loss / d logits through A sigmoid((z + B) / C), evaluated at the bf16 sigmoid the kernel keeps."""
    logits, targets, weights = ce_case()
    _, s, lse = kernels.softcapped_ce(logits, targets, weights)
    grad_s, incoming = 0.75 / 448, 0.125
    rows = torch.full((len(targets),), incoming)
    got = kernels.softcapped_ce_grad(s, lse, targets, weights, rows, grad_s).double() * grad_s / incoming
    sd = s.double()
    capped = (A * sd).requires_grad_()
    full = len(targets) - len(weights) + 1  # rows 0 .. full-1 have all three predictions
    loss = sum(w * F.cross_entropy(capped[:full], targets[k : k + full], reduction="sum") for k, w in enumerate(weights.tolist()))
    (d_capped,) = torch.autograd.grad(loss, capped)
    expected = d_capped * (A / C) * sd * (1 - sd)  # d capped / d z = A s (1 - s) / C
    assert torch.allclose(got[:full], expected[:full], rtol=1e-5, atol=1e-6)
    # The last rows: like the record's kernel, the softmax term takes all the weights, also those of the predictions
    # past the end (whose targets are not in the loss).
    last = len(targets) - 1
    p = torch.softmax(A * sd[last], dim=-1)
    extra = (weights[1:].sum().double()) * p * (A / C) * sd[last] * (1 - sd[last])
    true_last = torch.autograd.grad(F.cross_entropy(capped[last : last + 1], targets[last:]), capped)[0][last]
    assert torch.allclose(got[last], true_last * (A / C) * sd[last] * (1 - sd[last]) + extra, rtol=1e-5, atol=1e-6)


def test_the_training_loss_runs_through_fp8_and_takes_each_rows_incoming_gradient():
    g = torch.Generator().manual_seed(1)
    dim, vocab, n = 32, 256, 8
    x = torch.randn(n, dim, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(dim, vocab, generator=g) * 0.3).bfloat16().requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=g)
    weights = torch.tensor([1.0, 0.5])
    x_s, w_s, grad_s = 100 / 448, 1.6 / 448, 0.75 / 448
    losses = kernels.SoftcappedCrossEntropy.apply(x, targets, weights, w, x_s, w_s, grad_s)
    # The logits are the FP8 product: each operand rounded to e4m3 (3 mantissa bits) at its scale.
    logits = ((x.div(x_s).to(kernels.E4M3).double() * x_s) @ (w.div(w_s).to(kernels.E4M3).double() * w_s)).bfloat16()
    assert torch.allclose(losses, kernels.softcapped_ce(logits, targets, weights)[0], rtol=1e-6, atol=1e-5)
    # Row r's gradient scales with its own incoming gradient; a row given 0 contributes nothing to grad_w.
    incoming = torch.ones(n)
    incoming[0] = 0.0
    gx, gw = torch.autograd.grad(losses, (x, w), incoming)
    assert (gx[0] == 0).all() and (gx[1:] != 0).any()
    gx2, _ = torch.autograd.grad(kernels.SoftcappedCrossEntropy.apply(x, targets, weights, w, x_s, w_s, grad_s), (x, w), 2 * incoming)
    assert torch.equal(gx2, 2 * gx)  # a power of two passes through the e5m2 rounding exactly


# --- FP8 matmuls -----------------------------------------------------------------------------------------------------


def test_scaled_mm_off_fp8_hardware_is_torchs_scaled_mm_up_to_float32_sums():
    g = torch.Generator().manual_seed(2)
    a = (torch.randn(32, 96, generator=g) * 30).to(kernels.E4M3)
    b = (torch.randn(64, 96, generator=g) * 30).to(kernels.E4M3).T  # column-major, as _scaled_mm takes it
    sa, sb = torch.tensor(0.0123), torch.tensor(1.7e-3)
    ours = kernels.scaled_mm(a, b, sa, sb, torch.float32)
    ref = torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.float32)
    scale = (a.float().abs() @ b.float().abs()) * sa * sb  # each sum's magnitude: float32 rounding is relative to it
    assert ((ours - ref).abs() <= scale * 96 * 2**-24).all()


def test_the_fp8_linear_is_the_dequantised_matmul_within_fp8_rounding():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 64, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(64, 48, generator=g) * 0.02).bfloat16().requires_grad_()
    x_s, w_s, grad_s = 4 / 448, 0.08 / 448, 1 / 448
    out = kernels.FP8LinearT.apply(x, w, x_s, w_s, grad_s)
    x8, w8 = x.div(x_s).to(kernels.E4M3).double() * x_s, w.div(w_s).to(kernels.E4M3).double() * w_s
    assert torch.allclose(out.double(), x8 @ w8, rtol=2 * BF16_REL, atol=1e-6)
    bound = (x.double().abs() @ w.double().abs()) * (2 * E4M3_REL + E4M3_REL**2) + out.double().abs() * BF16_REL
    assert ((out.double() - x.double() @ w.double()).abs() <= bound).all()
    grad = torch.randn(16, 48, generator=g).bfloat16() * 1e-3
    gx, gw = torch.autograd.grad(out, (x, w), grad)
    g8 = grad.div(grad_s).to(kernels.E5M2).double() * grad_s
    assert torch.allclose(gx.double(), g8 @ w8.T, rtol=2 * BF16_REL, atol=1e-9)
    assert gw.dtype == torch.bfloat16  # autograd casts the float32 product to the weight's dtype
    assert torch.allclose(gw.double(), x8.T @ g8, rtol=BF16_REL, atol=1e-9)
    bound = (grad.double().abs() @ w.double().abs().T) * (E5M2_REL + E4M3_REL + E5M2_REL * E4M3_REL) + gx.double().abs() * BF16_REL
    assert ((gx.double() - grad.double() @ w.double().T).abs() <= bound).all()


def mlp_case(seed=4, n=24, dim=32, hidden=128):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, n, dim, generator=g).bfloat16().requires_grad_()
    w_up = (torch.randn(hidden, dim, generator=g) * 0.2).bfloat16().requires_grad_()
    w_down = (torch.randn(hidden, dim, generator=g) * 0.2).bfloat16().requires_grad_()
    return x, w_up, w_down


def test_the_bf16_mlp_is_relu_squared_with_the_record_roundings_and_its_gradient():
    x, w_up, w_down = mlp_case()
    out, amax = kernels.ReLUSquareMLP.apply(x, w_up, w_down, None)
    xd, ud, dd = (t.detach().double().requires_grad_() for t in (x, w_up, w_down))
    ref = F.relu(xd @ ud.T).square() @ dd
    assert amax == 0
    assert torch.allclose(out.double(), ref, rtol=4 * BF16_REL, atol=4 * BF16_REL * ref.abs().max().item())
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).bfloat16()
    got = torch.autograd.grad(out, (x, w_up, w_down), grad)
    want = torch.autograd.grad(ref, (xd, ud, dd), grad.double())
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and torch.allclose(a.double(), b, rtol=0.05, atol=0.02 * b.abs().max().item())


def test_the_fp8_mlp_quantises_both_products_and_reports_the_activations_amax():
    x, w_up, w_down = mlp_case()
    xf = x.detach()[0]
    amax_x = xf.abs().max()
    x8 = (xf * (448.0 / amax_x)).to(kernels.E4M3)
    up_scale = (w_up.detach().abs().max() / 448).float().view(1)
    w_up8 = (w_up.detach() / up_scale.bfloat16()).to(kernels.E4M3)
    dequant = up_scale * amax_x / 448
    pre_ref = ((x8.double() @ w_up8.double().T) * dequant.double()).bfloat16()
    post_ref = pre_ref.relu().square()
    act_scale = torch.tensor([post_ref.float().max().item() * 1.8 / 448])  # the delayed scale: room to grow
    down_scale = torch.tensor([w_down.detach().float().abs().max().item() / 448])
    w_down8 = (w_down.detach().float() / down_scale).to(kernels.E4M3).T.contiguous().T
    fp8 = kernels.MLPFP8(x8=x8, w_up8=w_up8, dequant=dequant, w_down8=w_down8, w_down_scale=down_scale, act_scale=act_scale)
    out, amax = kernels.ReLUSquareMLP.apply(x, w_up, w_down, fp8)
    assert amax == post_ref.float().max()
    post8 = (post_ref.float() / act_scale).to(kernels.E4M3).double() * act_scale.double()
    ref = post8 @ (w_down8.double() * down_scale.double())
    assert torch.allclose(out.double()[0], ref, rtol=2 * BF16_REL, atol=1e-3 * ref.abs().max().item())
    exact = post_ref.double() @ w_down.detach().double()
    bound = (post_ref.double().abs() @ w_down.detach().double().abs()) * (2 * E4M3_REL + E4M3_REL**2) + exact.abs() * 2 * BF16_REL
    assert ((out.double()[0] - exact).abs() <= bound).all()
    # An activation scale too small for this step's activations caps them at 448 (what the headroom is for).
    fp8.act_scale = act_scale / 4
    capped, _ = kernels.ReLUSquareMLP.apply(x, w_up, w_down, fp8)
    assert capped.double().abs().sum() < out.double().abs().sum()


def test_the_down_weights_are_quantised_with_the_scale_measured_the_call_before():
    g = torch.Generator().manual_seed(6)
    w = (torch.randn(2, 64, 16, generator=g) * 0.01).bfloat16()
    next_scales, used = torch.ones(2), torch.zeros(2)
    next_scales.copy_(w.float().abs().amax(dim=(1, 2)) / 448)  # bootstrapped from this very weight
    q = kernels.quantize_down_weights(w, next_scales, used)
    assert q.shape == (2, 16, 64) and q.dtype == kernels.E4M3
    back = q.transpose(1, 2).double() * used.double().view(-1, 1, 1)
    assert ((back - w.double()).abs() <= w.double().abs() * E4M3_REL + used.max().item() * 2**-9).all()
    assert torch.allclose(next_scales, w.float().abs().amax(dim=(1, 2)) * (1.12 / 448))
    # The weights grow 1.5x past the stored scale's 1.12 headroom: this call still uses the old scale and clamps.
    w2 = w * 1.5
    old = next_scales.clone()
    q2 = kernels.quantize_down_weights(w2, next_scales, used)
    assert torch.equal(used, old)
    assert q2.float().abs().max() == 448
    assert torch.allclose(next_scales, w2.float().abs().amax(dim=(1, 2)) * (1.12 / 448))


# --- attention -----------------------------------------------------------------------------------------------------


def test_the_window_mask_allows_exactly_the_same_document_keys_at_most_window_back():
    T, window = 40, 5
    cu = torch.tensor([0, 7, 7, 23, 40, 40, 40], dtype=torch.int32)  # documents [0,7) [7,23) [23,40), padded
    mask = varlen.window_mask(cu, T, window)
    starts = [0, 7, 23, 40]
    doc = [max(j for j, s in enumerate(starts) if s <= i) for i in range(T)]
    for i in range(T):
        for j in range(T):
            assert mask[i, j].item() == (doc[i] == doc[j] and 0 <= i - j <= window), (i, j)


def test_varlen_attention_is_softmax_over_each_documents_window():
    g = torch.Generator().manual_seed(7)
    T, H, D, window = 30, 2, 8, 4
    q, k, v = (torch.randn(T, H, D, generator=g) for _ in range(3))
    cu = torch.tensor([0, 12, 30, 30], dtype=torch.int32)
    y = varlen.varlen_attention(q, k, v, cu, window, scale=0.3)
    for i in range(T):
        lo = max(i - window, 0 if i < 12 else 12)
        scores = torch.einsum("hd,khd->hk", q[i], k[lo : i + 1]) * 0.3
        expected = torch.einsum("hk,khd->hd", scores.softmax(-1), v[lo : i + 1])
        assert torch.allclose(y[i], expected, atol=1e-5), i


def test_the_layers_windows_and_their_key_shift():
    assert layer_windows(128, 384) == [128, 128, 128, 384, 128, 128, None, 128, 128, 128, 384]


# --- rotary ----------------------------------------------------------------------------------------------------------


def test_the_rotary_frequencies_are_the_records_half_truncated_ones():
    f = rotary.frequencies(16)
    base = [(1 / 1024) ** (j / 3) for j in range(4)]
    assert torch.allclose(f[:8], torch.tensor([b for b in base for _ in (0, 1)]), rtol=1e-6)
    assert (f[8:] == 0).all()


def test_yarn_keeps_fast_frequencies_divides_slow_ones_and_mixes_between():
    freq = torch.tensor([2.0, 0.5, 0.05, 0.001, 0.0])
    old, new = 384, 896
    turns = old * freq / (2 * math.pi)  # 122, 30.6, 3.06, 0.061, 0
    out = rotary.yarn_frequencies(freq, old, new)
    assert out[0] == freq[0]  # more than 32 turns across the old window: unchanged
    assert out[3] == pytest.approx(freq[3].item() * old / new)  # under one turn: stretched to the new window
    assert out[4] == 0
    for i in (1, 2):  # in between: linear in the number of turns
        ramp = (turns[i].item() - 1) / 31
        assert out[i].item() == pytest.approx(freq[i].item() * (old / new + ramp * (1 - old / new)), rel=1e-6)
    yarn = rotary.Yarn(16, 64)
    yarn.rescale(old, new)
    assert yarn.attn_scale == pytest.approx(0.1 * (1 + 0.2 * math.log(new / old)))
    yarn.reset()
    assert yarn.attn_scale == 0.1 and torch.equal(yarn.angular_freq, rotary.frequencies(16))


def test_rotary_turns_each_adjacent_pair_as_a_complex_number():
    D, T = 16, 20
    yarn = rotary.Yarn(D, T)
    x = torch.randn(1, T, 2, D, generator=torch.Generator().manual_seed(8)).bfloat16()
    out = yarn.rotary(x).double()
    theta = torch.arange(T, dtype=torch.float64)[:, None] * rotary.frequencies(D).double()[None, ::2]
    z = torch.view_as_complex(x.double().view(1, T, 2, D // 2, 2).contiguous())
    # The record multiplies by e^{-i theta} (x0 c + x1 s, x1 c - x0 s), with the tables rounded to bf16.
    expected = torch.view_as_real(z * torch.exp(-1j * theta)[None, :, None, :]).view(1, T, 2, D)
    assert torch.allclose(out, expected, atol=0.03)
    assert torch.equal(out[..., D // 2 :], x[..., D // 2 :].double())  # the second half does not turn


def test_the_paired_tables_hold_the_even_then_the_odd_position():
    D, T = 8, 10
    paired = rotary.Yarn(D, T, paired=True)
    freq = rotary.frequencies(D)
    t = 3
    assert torch.equal(paired.factor1[t, :D], torch.cos(2 * t * freq).bfloat16())
    assert torch.equal(paired.factor1[t, D:], torch.cos((2 * t + 1) * freq).bfloat16())


# --- the whole model ---------------------------------------------------------------------------------------------

TINY = dict(vocab_size=1000, num_heads=4, head_dim=16, model_dim=64, max_seq_len=128, bigram_vocab_size=3000, bigram_dim=32, bigram_sign_rows=64)
RECORD_LABELS = {
    "qk_bank",
    "vo_bank",
    "mlp_bank",
    "scalars",
    "smear_gate",
    "skip_gate",
    "attn_gate_bank",
    "ve_gate_bank",
    "lm_head",
    "bigram_embed",
    "post_lambdas",
    "x0_lambdas",
    "bigram_lambdas",
    "resid_lambdas",
    "xsa_alphas",
    "value_embeds",
    "embed",
    "mudd_w1",
    "mudd_w2",
    "mudd_b2",
}  # the record's optimizer table


def test_the_full_size_model_has_the_records_parameters_labels_and_banks():
    with torch.device("meta"):
        model = GPT(GPTConfig())
    params = dict(model.named_parameters())
    assert {p.label for p in params.values()} == RECORD_LABELS
    assert params["qk_bank"].shape == (64, 256, 768) and params["qk_bank"].reshape == (64, 256, 768)
    assert params["vo_bank"].shape == (24, 768, 768) and params["mlp_bank"].reshape == (24, 3072, 768)
    assert params["scalars"].shape == (24,) and params["lm_head.weight"].shape == (768, 50304)
    assert params["bigram_embed.weight"].shape == (50304 * 15, 192) and params["value_embeds"].shape == (5 * 50304, 768)
    fp32 = {n for n, p in params.items() if p.dtype == torch.float32}
    assert fp32 == {"scalars", "post_lambdas", "x0_lambdas", "bigram_lambdas", "resid_lambdas", "xsa_alphas"}


def tiny_batch(T=128, seed=9):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 1000, (T + 1,), generator=g)
    inputs, targets = tokens[:-1].int(), tokens[1:].long()
    seqlens = torch.tensor([0, 40, 90, T, T], dtype=torch.int32)
    return inputs, targets, seqlens, bigram_hash(inputs, TINY["bigram_vocab_size"])


def perturbed(model):
    g = torch.Generator().manual_seed(10)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
    return model


def test_the_tiny_model_trains_forward_and_backward_and_evaluates():
    torch.manual_seed(0)
    model = perturbed(GPT(GPTConfig(**TINY)))
    data = tiny_batch()
    schedule = ForwardSchedule(mtp_weights=torch.tensor([1.0, 0.5, 0.25]), ws_short=16, ws_long=48, train_max_seq_len=128)
    with pytest.raises(RuntimeError, match="quantize_mlp_fp8"):
        model(*data, schedule)
    model.quantize_mlp_fp8(bootstrap_down=True)
    losses = model(*data, schedule)
    assert losses.shape == (128,) and losses.dtype == torch.float32 and losses.isfinite().all()
    losses.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and g.isfinite().all() for g in grads.values())
    # Every weight the forward reads learns; the banks' padding and the last layer's unused value gate do not.
    assert (grads["qk_bank"][:60].abs().sum(dim=(1, 2)) > 0).all() and (grads["qk_bank"][60:] == 0).all()
    assert (grads["mlp_bank"][:11].abs().sum(dim=(1, 2, 3)) > 0).all() and (grads["mlp_bank"][11] == 0).all()
    assert (grads["ve_gate_bank"][:4].abs().sum(dim=(1, 2)) > 0).all() and (grads["ve_gate_bank"][4] == 0).all()
    for name in ("mudd_w1", "mudd_w2", "mudd_b2", "xsa_alphas", "bigram_embed.weight", "smear_gate.weight", "skip_gate.weight"):
        assert grads[name].abs().sum() > 0, name
    # The forward measured each MLP's activations for the next one's FP8 scale.
    assert (model._mlp_down_act_scales[:11] != 1).all() and model._mlp_down_act_scales[11] == 1
    model.eval()
    with torch.no_grad():
        val = model(*data, schedule)
        logits = model.logits(model.trunk(data[0], data[2], data[3], schedule)).float()
    assert torch.equal(val, F.cross_entropy(logits[0], data[1], reduction="none"))
    assert 0 < logits.min() and logits.max() < 23
    assert abs(val.mean().item() - math.log(1000)) < 1.0  # near-uniform predictions from near-initial weights


def test_the_training_forward_traces_as_one_graph():
    """The record compiles its model with fullgraph=True: a graph break in a layer splits the compiled model there,
    and Dynamo then compiles that layer's frame once per layer index (a CPU capability read inside the attention
    once did that). Dynamo traces here; the eager backend runs the traced graph without compiling it."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    model.quantize_mlp_fp8(bootstrap_down=True)
    data = tiny_batch()
    schedule = ForwardSchedule(mtp_weights=torch.tensor([1.0, 0.5, 0.25]), ws_short=16, ws_long=48, train_max_seq_len=128)
    torch._dynamo.reset()
    try:
        traced = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)
        assert torch.equal(traced(*data, schedule), model(*data, schedule))
    finally:
        torch._dynamo.reset()


def test_the_same_seed_builds_the_same_weights():
    a = GPT(GPTConfig(**TINY)) if torch.manual_seed(3) else None
    b = GPT(GPTConfig(**TINY)) if torch.manual_seed(3) else None
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert torch.equal(a.embed.weight, a.lm_head.weight.T)  # tied at the start


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flexattentions_mask_is_the_dense_one():
    """CUDA's path: FlexAttention with the window rule as its mask_mod gives the dense mask's attention (its forward;
    FlexAttention has no backward pass on the CPU)."""
    g = torch.Generator().manual_seed(11)
    T, H, D = 384, 2, 16
    q, k, v = (torch.randn(1, H, T, D, generator=g) for _ in range(3))
    cu = torch.tensor([0, 100, 260, T, T], dtype=torch.int32)
    for window in (0, 50, 200):
        flex = varlen.flex_attention(q, k, v, cu, window, 0.2)
        assert torch.allclose(flex, varlen.dense_attention(q, k, v, cu, window, 0.2), atol=1e-5), window


def test_the_long_window_layers_shift_the_keys_non_rotating_half_one_position(monkeypatch):
    """The record runs `k[:, 1:, :, D/2:] = k[:, :-1, :, D/2:]` compiled, which reads the keys before the write: key t
    takes key t - 1's non-rotating half (eager torch would copy row by row over the overlap instead)."""
    from job.speedrun_2026_07_17 import transformer

    seen = []
    real = varlen.varlen_attention
    monkeypatch.setattr(varlen, "varlen_attention", lambda q, k, *a: seen.append(k) or real(q, k, *a))
    g = torch.Generator().manual_seed(12)
    T, H, hd = 16, 4, 8
    x = torch.randn(1, T, H * hd, generator=g).bfloat16()
    w = (torch.randn(4 * H * hd, H * hd, generator=g) * 0.1).bfloat16()
    yarn = rotary.Yarn(hd, T)
    common = dict(
        paired=False,
        window=T,
        gate_w=torch.zeros(H, 12).bfloat16(),
        aux_v=None,
        xsa_alpha=None,
        seqlens=torch.tensor([0, T], dtype=torch.int32),
        num_heads=H,
    )
    for offset in (False, True):
        transformer.attention(x, w, torch.tensor([0.5, 1.0]), yarn, key_offset=offset, **common)
    plain, shifted = seen
    half = hd // 2
    assert torch.equal(shifted[:, :, :half], plain[:, :, :half])
    assert torch.equal(shifted[1:, :, half:], plain[:-1, :, half:]) and torch.equal(shifted[0, :, half:], plain[0, :, half:])


def test_the_check_script_refuses_what_is_not_the_record_in_one_line(tmp_path):
    """scripts/speedrun_2026_07_17_check.py runs the record's own code, never in this repository: without it, or
    with a file that is not it, it says where the record's log is (tests/test_bad_inputs.py tries the other kinds)."""
    from conftest import ROOT, assert_one_line_error, run_cli, script_module

    script = ROOT / "scripts" / "speedrun_2026_07_17_check.py"
    log = script_module("speedrun_2026_07_17_check").RECORD_LOG
    proc = run_cli(script, "--record", tmp_path / "missing.txt")
    assert proc.returncode == 2
    line = assert_one_line_error(proc, "--record", "does not exist")
    assert f"`curl -LO {log}`" in line and "/2026-07-17_FP8DownProjection/" in log
    other = tmp_path / "train_gpt.py"
    other.write_text("import os\nclass GPT(nn.Module):\n    pass\n# int main\n")
    proc = run_cli(script, "--record", other, "--out", tmp_path / "out.json")
    assert proc.returncode == 2
    assert_one_line_error(proc, "another version of the record's code", "curl -LO")
    assert not (tmp_path / "out.json").exists()
