"""The port's Triton kernels (job/speedrun_2026_07_17/triton_kernels.py) run by Triton's interpreter on the CPU, each
held to its torch twin on the same inputs: exactly where the two do the same arithmetic, and within a stated bound
where only the order of float32 sums or the last bits of exp and the sigmoid can differ.

The interpreter is chosen when triton is imported (TRITON_INTERPRET=1), and another test of a worker may have
imported triton first (torch.compile does): so the kernels run in a child process, this file run as a script, which
saves their outputs; the tests compare them here with the torch path. Both processes make the inputs from seeded
generators. Small shapes, not multiples of the (small) blocks, so that every kernel's masks and its several blocks
are exercised: the interpreter runs each program in Python."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from job.speedrun_2026_07_17 import kernels
from job.speedrun_2026_07_17.polar_express import COEFFICIENTS, ba_plus_caa, polar_express, xtx, xxt

ROOT = Path(__file__).resolve().parents[1]  # not conftest's: the child, this file run as a script, imports no conftest
# Triton's interpreter runs the kernels a value at a time in Python: tens of seconds, outside `make test-fast`.
pytestmark = pytest.mark.slow

A, B, C = kernels.SOFTCAP
BF16_HALF_ULP = 2**-8  # rounding to bf16 (8 significant bits) moves a number by at most this much of itself
F32_EPS = 2**-24  # each float32 addition's rounding, relative to the running sum's magnitude
BLOCK, BLOCK_K = 16, 16  # tl.dot's smallest blocks


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- inputs, made alike in both processes ---------------------------------------------------------------------------
def fractions(shape, seed, lo=-1, hi=2, denominator=2) -> torch.Tensor:
    """Small multiples of 1/denominator in bf16: every product and float32 sum of them below is exact, in any order
    (and fits bf16's 8 significant bits)."""
    return (torch.randint(lo, hi, shape, generator=gen(seed)) / denominator).bfloat16()


def symmetric_signs(n: int, seed: int) -> torch.Tensor:
    upper = torch.randint(-1, 2, (n, n), generator=gen(seed)).triu()
    return (upper + upper.triu(1).T).bfloat16()


def gram_inputs() -> dict[str, torch.Tensor]:
    x = torch.randn(2, 40, 72, generator=gen(1)).bfloat16()
    return {"exact": fractions((2, 40, 72), 0), "random": x, "sym_exact": symmetric_signs(40, 2), "sym_random": (x[0] @ x[0].T).bfloat16()}


def mlp_inputs(exact: bool) -> dict[str, torch.Tensor]:
    """x (24, 40), w_up and w_down (72, 40), the incoming gradient (24, 40)."""
    if exact:
        # pre and c = grad w_down^T: multiples of 1/8 below 20 (at most 160 eighths: exact in bf16); the square and
        # 2 c relu(pre) often need more than 8 bits, so both sides round them.
        return {
            "x": fractions((24, 40), 3, -4, 5, 4),
            "w_up": fractions((72, 40), 4),
            "w_down": fractions((72, 40), 5),
            "grad": fractions((24, 40), 6, -4, 5, 4),
        }
    g = gen(7)
    return {
        name: (torch.randn(shape, generator=g) * scale).bfloat16()
        for name, shape, scale in (("x", (24, 40), 1.0), ("w_up", (72, 40), 0.2), ("w_down", (72, 40), 0.2), ("grad", (24, 40), 1.0))
    }


def ce_inputs(n_weights: int) -> dict[str, torch.Tensor]:
    """Logits (7, 200) spread over the sigmoid's whole range, targets with a repeat (row 1's predictions 0 and 2 land
    on one column), the multi-token weights, each row's incoming gradient (one zero, one negative)."""
    g = gen(8 + n_weights)
    targets = torch.randint(0, 200, (7,), generator=g)
    targets[3] = targets[1]
    grad = torch.rand(7, generator=g) + 0.5
    grad[2], grad[4] = 0.0, -grad[4]
    weights = torch.tensor([1.0, 0.5, 0.25][:n_weights])
    return {"logits": (torch.randn(7, 200, generator=g) * 20).bfloat16(), "targets": targets, "weights": weights, "grad": grad}


def transpose_inputs() -> dict[str, torch.Tensor]:
    g = gen(12)
    src = torch.randn(70, 45, generator=g)
    dst = torch.randn(45, 70, generator=g)
    return {"src": src.bfloat16(), "dst": dst.bfloat16(), "src32": src, "dst32": dst, "src8": (src * 30).to(kernels.E4M3)}


GRAD_S = 0.75 / 448


# ---- the child: every kernel under the interpreter ------------------------------------------------------------------
def triton_outputs() -> dict[str, torch.Tensor]:
    from job.speedrun_2026_07_17 import triton_kernels as tk

    out = {}
    for name, x in gram_inputs().items():
        if name.startswith("sym"):
            _, b, c = COEFFICIENTS[0] if name == "sym_random" else (None, -2.0, 0.5)
            out[f"bcaa_{name}"] = tk.ba_plus_caa(x, c, b, torch.empty_like(x), BLOCK, BLOCK_K)
            continue
        n, k = x.shape[-2:]
        out[f"xxt_{name}"] = tk.xxt(x, x.new_empty(2, n, n), BLOCK, BLOCK_K)
        out[f"xtx_{name}"] = tk.xtx(x, x.new_empty(2, k, k), BLOCK, BLOCK_K)
        out[f"xxt2d_{name}"] = tk.xxt(x[1], x.new_empty(n, n), BLOCK, BLOCK_K)
    for exact in (True, False):
        m = mlp_inputs(exact)
        pre, post = tk.relu_square(m["x"], m["w_up"], (BLOCK, BLOCK, BLOCK_K))
        out[f"mlp_{exact}"] = torch.stack([pre, post])
        out[f"mlp_grad_{exact}"] = tk.relu_square_grad(m["grad"], m["w_down"], pre, (BLOCK, BLOCK, BLOCK_K))
    for n_weights in (1, 3):
        ce = ce_inputs(n_weights)
        losses, s, lse = tk.softcapped_ce(ce["logits"], ce["targets"], ce["weights"], A, B, C, block_v=64)
        out.update({f"ce_losses_{n_weights}": losses, f"ce_s_{n_weights}": s, f"ce_lse_{n_weights}": lse})
        _, s_ref, lse_ref = kernels.softcapped_ce(ce["logits"], ce["targets"], ce["weights"])  # the torch path's
        out[f"ce_grad_{n_weights}"] = tk.softcapped_ce_grad(s_ref, lse_ref, ce["targets"], ce["weights"], ce["grad"], GRAD_S, A, C, block_v=64)
    t = transpose_inputs()
    blocks = (16, 32)
    out["t_copy"] = tk.transpose_copy(t["src"], torch.empty_like(t["dst"]), blocks)
    out["t_copy8"] = tk.transpose_copy(t["src8"], t["src8"].new_empty(45, 70), blocks)
    out["t_add"] = tk.transpose_add(t["src"], t["dst"].clone(), blocks)
    out["t_add32"] = tk.transpose_add(t["src32"], t["dst32"].clone(), blocks)
    return out


def through_the_dispatch() -> dict[str, torch.Tensor]:
    """The port's functions that choose between the paths, on small inputs: Polar Express (wide, and tall with the
    split product), the bf16 MLP's forward and backward, the FP8 loss's forward and backward (its transposed FP8
    copies included) and the tied embedding's transposes. The child runs them with every choice forced to Triton,
    this process with the torch path the CPU takes."""
    out = {}
    for name, shape, split in (("polar_wide", (48, 160), False), ("polar_tall", (160, 48), True)):
        g = torch.randn(shape, generator=gen(20))
        out[name] = polar_express(g, torch.zeros_like(g), torch.tensor(0.0), split=split)
    m = mlp_inputs(exact=True)
    x, w_up, w_down = m["x"][None].requires_grad_(), m["w_up"].requires_grad_(), m["w_down"].requires_grad_()
    y, _ = kernels.ReLUSquareMLP.apply(x, w_up, w_down, None)
    out["mlp_out"] = y
    out["mlp_grads"] = torch.cat([t.flatten() for t in torch.autograd.grad(y, (x, w_up, w_down), m["grad"][None])])
    ce = ce_inputs(3)
    g = gen(21)
    x = torch.randn(7, 32, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(32, 200, generator=g) * 0.3).bfloat16().requires_grad_()
    losses = kernels.SoftcappedCrossEntropy.apply(x, ce["targets"], ce["weights"], w, 100 / 448, 1.6 / 448, GRAD_S)
    out["ce_losses"] = losses
    out["ce_grad_x"], out["ce_grad_w"] = torch.autograd.grad(losses, (x, w), ce["grad"])
    t = transpose_inputs()
    out["tied_copy"] = kernels.transpose_copy(t["src"], torch.empty_like(t["dst"]))
    out["tied_add"] = kernels.transpose_add(t["src"], t["dst"].clone())
    return out


if __name__ == "__main__":
    outputs = triton_outputs()
    kernels.use_triton = lambda t: True  # every choice takes the Triton path, on these CPU tensors
    outputs.update({f"dispatch_{name}": value for name, value in through_the_dispatch().items()})
    torch.save(outputs, sys.argv[1])
    sys.exit(0)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict[str, torch.Tensor]:
    if importlib.util.find_spec("triton") is None:
        pytest.skip(reason="triton is not installed (requirements-dev.txt installs it on Linux x86-64, where its wheels exist)")
    path = tmp_path_factory.mktemp("triton") / "outputs.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    run = subprocess.run([sys.executable, __file__, str(path)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return torch.load(path)


def within(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor) -> None:
    excess = (got.double() - want.double()).abs() - bound
    assert (excess <= 0).all(), f"off by up to {excess.max().item():.3g} past the bound"


# ---- Polar Express's products ---------------------------------------------------------------------------------------
def test_the_symmetric_products_are_the_torch_products_exactly_when_every_sum_is_exact(interpreted):
    x = gram_inputs()["exact"]
    assert torch.equal(interpreted["xxt_exact"], xxt(x, x.new_empty(2, 40, 40)))
    assert torch.equal(interpreted["xtx_exact"], xtx(x, x.new_empty(2, 72, 72)))
    assert torch.equal(interpreted["xxt2d_exact"], xxt(x[1], x.new_empty(40, 40)))
    a = gram_inputs()["sym_exact"]
    assert torch.equal(interpreted["bcaa_sym_exact"], ba_plus_caa(a, 0.5, -2.0, torch.empty_like(a)))


def test_the_symmetric_products_of_random_matrices_are_exactly_symmetric_and_within_bf16_rounding(interpreted):
    x = gram_inputs()["random"]
    xd = x.double()
    cases = {
        "xxt_random": (xd @ xd.mT, xd.abs() @ xd.abs().mT, 72),
        "xtx_random": (xd.mT @ xd, xd.abs().mT @ xd.abs(), 40),
        "xxt2d_random": (xd[1] @ xd[1].T, xd[1].abs() @ xd[1].abs().T, 72),
    }
    for name, (exact, magnitude, k) in cases.items():
        got = interpreted[name]
        assert torch.equal(got, got.mT), name  # the upper blocks stored mirrored
        # A float32 sum of k exact products, in any order, is within k eps of the products' magnitudes; then one
        # rounding to bf16. The torch product obeys the same bound: the two differ only in the order of the sums.
        within(got, exact, exact.abs() * BF16_HALF_ULP + magnitude * k * F32_EPS)
        torch_path = (xtx if name.startswith("xtx") else xxt)(x if "2d" not in name else x[1], torch.empty_like(got))
        within(torch_path, exact, exact.abs() * BF16_HALF_ULP + magnitude * k * F32_EPS)
    a = gram_inputs()["sym_random"]
    _, b, c = COEFFICIENTS[0]
    ad = a.double()
    got = interpreted["bcaa_sym_random"]
    assert torch.equal(got, got.T)
    exact = c * (ad @ ad) + b * ad
    # alpha and beta are float32 in the kernel: their rounding adds two eps to the sum's.
    within(got, exact, exact.abs() * BF16_HALF_ULP + (abs(c) * (ad.abs() @ ad.abs()) + abs(b) * ad.abs()) * (40 + 2) * F32_EPS)


# ---- the MLP --------------------------------------------------------------------------------------------------------
def test_the_fused_relu_square_and_its_gradient_are_the_torch_path_exactly_when_every_sum_is_exact(interpreted):
    """The products are exact here, so each side rounds the same numbers once: the activation's square and the
    gradient's 2 c relu(pre) are rounded to bf16 (to nearest, ties to even) exactly as torch rounds them."""
    m = mlp_inputs(exact=True)
    pre, post = kernels.relu_square(m["x"], m["w_up"])
    got_pre, got_post = interpreted["mlp_True"]
    assert torch.equal(got_pre, pre) and torch.equal(got_post, post)
    assert (post.double() != pre.double().relu().square()).any()  # squares that needed rounding
    grad_pre = kernels.relu_square_grad(m["grad"], m["w_down"], pre)
    assert torch.equal(interpreted["mlp_grad_True"], grad_pre)
    exact_grad = 2 * (m["grad"].double() @ m["w_down"].double().T) * pre.double().relu()
    assert (grad_pre.double() > exact_grad).any() and (grad_pre.double() < exact_grad).any()


def test_the_fused_relu_square_of_random_values_rounds_its_own_product_exactly_as_torch(interpreted):
    m = mlp_inputs(exact=False)
    x, w_up, w_down, grad = (m[k] for k in ("x", "w_up", "w_down", "grad"))
    got_pre, got_post = interpreted["mlp_False"]
    exact = x.double() @ w_up.double().T
    within(got_pre, exact, exact.abs() * BF16_HALF_ULP + (x.double().abs() @ w_up.double().abs().T) * 40 * F32_EPS)
    assert torch.equal(got_post, got_pre.relu().square())  # the epilogue: torch's bf16 square of the same pre
    got = interpreted["mlp_grad_False"]
    c = grad.double() @ w_down.double().T
    # c's float32 sum and its bf16 rounding, then the product's own rounding.
    c_err = c.abs() * BF16_HALF_ULP + (grad.double().abs() @ w_down.double().abs().T) * 40 * F32_EPS
    relu2 = 2 * got_pre.double().relu()
    exact = c * relu2
    within(got, exact, relu2 * c_err * (1 + BF16_HALF_ULP) + exact.abs() * BF16_HALF_ULP)


# ---- the soft-capped multi-token cross-entropy -----------------------------------------------------------------------
@pytest.mark.parametrize("n_weights", [1, 3])
def test_the_loss_kernel_gives_the_torch_paths_sigmoid_lse_and_losses(interpreted, n_weights):
    ce = ce_inputs(n_weights)
    logits, targets, weights = ce["logits"], ce["targets"], ce["weights"]
    s32, s_ref = kernels.softcap(logits)
    _, _, lse_ref = kernels.softcapped_ce(logits, targets, weights)
    s, lse, losses = interpreted[f"ce_s_{n_weights}"], interpreted[f"ce_lse_{n_weights}"], interpreted[f"ce_losses_{n_weights}"]
    # The kernel's 1 / (1 + exp(-u)) and the twin's 0.5 + tanh(u / 2) / 2 agree to a few float32 ulps: their bf16
    # roundings are equal but where the float32 sigmoid lies that close to the midpoint between two bf16 numbers.
    differ = s != s_ref
    ulp = (s_ref.float().abs() * 2**-7).clamp_min(2**-133)
    assert ((s.float() - s_ref.float()).abs()[differ] <= ulp[differ] * 1.01).all()
    midpoint = (s.float() + s_ref.float()).double() / 2
    assert ((s32.double() - midpoint).abs()[differ] <= s32.double().abs()[differ] * 2**-20).all()
    # lse: each exp and log within a few ulps, the float32 sum of 200 positive terms in another order (within 200
    # eps), and a sigmoid that moved by one bf16 ulp moves lse by at most A times that (lse is 1-Lipschitz).
    moved = A * (s.float() - s_ref.float()).abs().amax(dim=1, keepdim=True)
    within(lse, lse_ref, moved + (200 + 8) * F32_EPS + lse_ref.abs() * 4 * F32_EPS)
    # The losses from the kernel's own s and lse, in the twin's arithmetic: exactly.
    z = A * s.float()
    want = torch.zeros(7)
    for k in range(n_weights):
        want[: 7 - k] += (weights[k] * (lse[: 7 - k] - z[: 7 - k].gather(1, targets[k:].view(-1, 1)))).view(-1)
    assert torch.equal(losses, want)


@pytest.mark.parametrize("n_weights", [1, 3])
def test_the_loss_gradient_kernel_is_the_torch_paths_but_for_the_last_bits_of_exp(interpreted, n_weights):
    ce = ce_inputs(n_weights)
    _, s, lse = kernels.softcapped_ce(ce["logits"], ce["targets"], ce["weights"])
    want = kernels.softcapped_ce_grad(s, lse, ce["targets"], ce["weights"], ce["grad"], GRAD_S)
    got = interpreted[f"ce_grad_{n_weights}"]
    assert (got[2] == 0).all() and (got[3] != 0).any()  # row 2's incoming gradient is 0
    # Everything but p = exp(A s - lse) is the same float32 arithmetic in the same order; numpy's exp and torch's are
    # each within about an ulp, so S_w p moves by a few eps of itself and the product by a few eps of its own size.
    sf = s.double()
    scale = (ce["grad"].double().view(-1, 1) * (A / C) / GRAD_S * sf * (1 - sf)).abs()
    p_term = ce["weights"].sum().item() * (A * sf - lse.double()).exp()
    within(got, want, scale * p_term * 2**-20 + want.double().abs() * 2**-21)


# ---- transposes -----------------------------------------------------------------------------------------------------
def test_the_transposes_copy_bits_and_add_as_torch_does(interpreted):
    t = transpose_inputs()
    assert torch.equal(interpreted["t_copy"], t["src"].T)
    assert torch.equal(interpreted["t_copy8"].view(torch.uint8), t["src8"].T.contiguous().view(torch.uint8))
    # bf16 + bf16: the float32 sum rounded once, to nearest even, as torch's add_ does.
    assert torch.equal(interpreted["t_add"], t["dst"].clone().add_(t["src"].T))
    assert torch.equal(interpreted["t_add32"], t["dst32"].clone().add_(t["src32"].T))


# ---- the choice of path ---------------------------------------------------------------------------------------------
def test_the_functions_that_choose_triton_give_the_torch_paths_results(interpreted):
    want = through_the_dispatch()
    got = {name: interpreted[f"dispatch_{name}"] for name in want}
    # Exact sums in the MLP (the inputs of the exact test above): the Triton path's output and all three gradients
    # are the torch path's, bit for bit. The transposes likewise.
    for name in ("mlp_out", "mlp_grads", "tied_copy", "tied_add"):
        assert torch.equal(got[name], want[name]), name
    # Polar Express: the products' float32 sums in another order can flip a bf16 rounding in any of the five
    # iterations; the result is the same direction up to bf16 rounding (the bound test_speedrun_2026_07_17_optim.py
    # allows a direction whose input differed by a rounding).
    for name in ("polar_wide", "polar_tall"):
        assert got[name].dtype == torch.bfloat16 and (got[name].float() - want[name].float()).abs().max() < 2e-2, name
    # The loss: within the log-sum-exp's float32 bound (the sigmoids agree here, see the loss test). The gradients
    # pass through e5m2, where a float32 difference of 2^-20 flips a rounding only at a midpoint's edge.
    within(got["ce_losses"], want["ce_losses"], (want["ce_losses"].abs() + 1) * 2**-18)
    for name in ("ce_grad_x", "ce_grad_w"):
        assert (got[name].float() - want[name].float()).norm() <= 1e-2 * want[name].float().norm(), name
