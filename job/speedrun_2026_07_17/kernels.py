"""The record's fused kernels as torch functions with the same arithmetic: the FP8 matmuls, the MLP's linear + ReLU²
(bf16, or FP8 with delayed scaling of the down projection), and the soft-capped multi-token cross-entropy with its
hand-written gradient. (The optimizer's kernels, Polar Express's products, are its own module's.)

The record runs these as Triton kernels (and the cross-entropy as CUDA C); here each is plain torch, so it runs on a
CPU and on any GPU. Where an FP8 matmul is involved, `scaled_mm` calls torch._scaled_mm on GPUs with FP8 tensor
cores and elsewhere multiplies the FP8 values dequantised to float32 (every product of two FP8 numbers is exact in
float32, so only the order of the sums differs). The rounding points are the kernels': what
they keep in bf16 is rounded to bf16 here at the same place, what they keep in float32 stays float32.

On CUDA tensors, where triton is installed (use_triton), the bf16 MLP's two fused products, the cross-entropy's loss
and gradient and the transposes run as this port's own Triton kernels (triton_kernels.py) instead, with the same
rounding points; the FP8 parts stay torch.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
E5M2_MAX = 57344.0

# The record's soft cap of the logits: A * sigmoid((z + B) / C), in (0, A).
SOFTCAP = (23.0, 5.0, 7.5)


# Whether triton is installed, found without importing it (a CPU run never loads it); a plain constant, so a compiled
# graph reads it as one. A test may set it False to run the torch path on a GPU.
TRITON = importlib.util.find_spec("triton") is not None


def use_triton(t: Tensor) -> bool:
    """Whether an operation on t runs as this port's Triton kernel: t is on a CUDA device and triton is installed.
    Everywhere else the torch path runs, whose arithmetic the kernels share (triton_kernels.py says where the float32
    sums' order or the sigmoid's last bit can differ)."""
    return TRITON and t.is_cuda


def triton_kernels():
    """triton_kernels.py, imported on first use (it imports triton)."""
    from job.speedrun_2026_07_17 import triton_kernels

    return triton_kernels


def transpose_copy(src: Tensor, dst: Tensor) -> Tensor:
    """dst = src^T (2-d), in tiles on CUDA (a strided copy reads one side across its rows)."""
    if use_triton(src):
        return triton_kernels().transpose_copy(src, dst)
    return dst.copy_(src.T)


def transpose_add(src: Tensor, dst: Tensor) -> Tensor:
    """dst += src^T (2-d, bf16 or float32), in tiles on CUDA."""
    if use_triton(src):
        return triton_kernels().transpose_add(src, dst)
    return dst.add_(src.T)


def transposed(t: Tensor) -> Tensor:
    """t^T as a new contiguous tensor."""
    if use_triton(t):
        return triton_kernels().transpose_copy(t, t.new_empty(t.shape[::-1]))
    return t.T.contiguous()


def fp8_matmul_supported(device: torch.device | str) -> bool:
    """A GPU with FP8 tensor cores (compute capability 8.9 and up), where torch._scaled_mm is the hardware's matmul.
    (torch._scaled_mm also runs on the CPU, but as a reference loop, slower than float32 by orders of magnitude.)"""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def scaled_mm(a: Tensor, b: Tensor, scale_a: Tensor, scale_b: Tensor, out_dtype: torch.dtype, fast_accum: bool = False) -> Tensor:
    """(a @ b) * scale_a * scale_b for FP8 a (row-major) and b (column-major), accumulated in float32: torch._scaled_mm
    on an FP8 GPU, elsewhere the FP8 values dequantised to float32 (exact) and multiplied there."""
    if fp8_matmul_supported(a.device):
        return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype, use_fast_accum=fast_accum)
    return ((a.float() @ b.float()) * (scale_a * scale_b)).to(out_dtype)


def _scale(like: Tensor, s: float) -> Tensor:
    return like.new_tensor(s, dtype=torch.float32)


# --- the FP8 linear with weights stored (in, out) ------------------------------------------------------------
class FP8LinearT(torch.autograd.Function):
    """x @ w for w stored (in_features, out_features), in FP8 with fixed scales: x and w in e4m3 (divided by x_s and
    w_s), the incoming gradient in e5m2 (divided by grad_s); out and grad_x in bf16, grad_w in float32."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, x_s: float, w_s: float, grad_s: float) -> Tensor:
        x8 = x.div(x_s).to(E4M3)
        w8 = w.div(w_s).to(E4M3)
        out = scaled_mm(x8, w8.T.contiguous().T, _scale(x, x_s), _scale(x, w_s), torch.bfloat16, fast_accum=True)
        ctx.save_for_backward(x8, w8)
        ctx.scales = x_s, w_s, grad_s
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x8, w8 = ctx.saved_tensors
        x_s, w_s, grad_s = ctx.scales
        g8 = grad.contiguous().div(grad_s).to(E5M2)
        grad_x = scaled_mm(g8, w8.T, _scale(grad, grad_s), _scale(grad, w_s), torch.bfloat16)
        grad_w = scaled_mm(x8.T.contiguous(), g8.T.contiguous().T, _scale(grad, x_s), _scale(grad, grad_s), torch.float32)
        return grad_x, grad_w, None, None, None


# --- the MLP: relu(x @ W1.T)² @ W2 -----------------------------------------------------------------------------
@dataclass
class MLPFP8:
    """One MLP's FP8 operands. The up projection: x quantised by its own amax this step (x8, dequant = the weight's
    scale * amax / 448), W1 per-tensor. The down projection: W2 quantised after the last optimizer step with the scale
    measured the step before (delayed), the activations with the scale measured by the previous forward."""

    x8: Tensor  # (N, dim) e4m3
    w_up8: Tensor  # (hidden, dim) e4m3
    dequant: Tensor  # (1,) float32: x8 @ w_up8.T times this is the pre-activation
    w_down8: Tensor  # (hidden, dim) e4m3, column-major
    w_down_scale: Tensor  # (1,) float32
    act_scale: Tensor  # (1,) float32: the activations are divided by it before the cast


def relu_square_fp8(x8: Tensor, w_up8: Tensor, dequant: Tensor, act_scale: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The up projection in FP8: (pre, post, post8, amax). pre is the float32 product times dequant rounded to bf16,
    post = relu(pre)² in bf16, post8 = post / act_scale in e4m3 (capped at 448), amax = post's largest value, which
    sets the next forward's act_scale."""
    pre = scaled_mm(x8, w_up8.T, dequant, torch.ones_like(dequant), torch.bfloat16)
    post = pre.relu().square()
    post8 = (post.float() * act_scale.reciprocal()).clamp_max(E4M3_MAX).to(E4M3)
    return pre, post, post8, post.float().amax()


def relu_square_grad(grad: Tensor, w_down: Tensor, pre: Tensor) -> Tensor:
    """d loss / d pre: (grad @ W2.T) rounded to bf16, times 2 relu(pre), in bf16 (one fused kernel on CUDA)."""
    if use_triton(grad) and grad.dtype == w_down.dtype == pre.dtype == torch.bfloat16:
        return triton_kernels().relu_square_grad(grad, w_down, pre)
    return 2 * (grad @ w_down.T) * pre.relu()


def relu_square(x: Tensor, w_up: Tensor) -> tuple[Tensor, Tensor]:
    """The bf16 up projection: (pre, post), pre = x @ W1.T rounded to bf16, post = relu(pre)² in bf16 (one fused
    kernel on CUDA)."""
    if use_triton(x) and x.dtype == w_up.dtype == torch.bfloat16:
        return triton_kernels().relu_square(x, w_up)
    pre = x @ w_up.T
    return pre, pre.relu().square()


class ReLUSquareMLP(torch.autograd.Function):
    """relu(x @ w_up.T)² @ w_down for x (..., dim), w_up and w_down (hidden, dim). Without `fp8`, all in bf16 (float32
    sums); with it, both products in FP8 (MLPFP8). The backward is bf16 either way, from the bf16 weights and the
    saved pre-activation. Returns (out, amax of the activations; 0 without FP8)."""

    @staticmethod
    def forward(ctx, x: Tensor, w_up: Tensor, w_down: Tensor, fp8: MLPFP8 | None = None):
        x_flat = x.view(-1, x.size(-1))
        if fp8 is None:
            pre, post = relu_square(x_flat, w_up)
            out, amax = post @ w_down, x.new_zeros((), dtype=torch.float32)
        else:
            pre, post, post8, amax = relu_square_fp8(fp8.x8.view(x_flat.shape), fp8.w_up8, fp8.dequant, fp8.act_scale)
            out = scaled_mm(post8, fp8.w_down8, fp8.act_scale, fp8.w_down_scale, torch.bfloat16, fast_accum=True)
        ctx.save_for_backward(x, w_up, w_down, pre, post)
        ctx.mark_non_differentiable(amax)
        return out.view(x.shape), amax

    @staticmethod
    def backward(ctx, grad: Tensor, _):
        x, w_up, w_down, pre, post = ctx.saved_tensors
        grad_pre = relu_square_grad(grad.reshape(-1, grad.size(-1)), w_down, pre)
        # The weights' gradients multiply by the incoming gradient and the input in their own (1, T, dim) shape, as
        # the record does: a batched product, whose bf16 sums the CPU rounds differently from the flattened one's.
        grad_w_down = _sum_batch(post.T @ grad)
        grad_w_up = _sum_batch(grad_pre.T @ x)
        return (grad_pre @ w_up).view(x.shape), grad_w_up, grad_w_down, None


def _sum_batch(t: Tensor) -> Tensor:
    """(..., a, b) -> (a, b), summed over the leading dimensions (one of size 1 in the model: a copy)."""
    return t.reshape(-1, *t.shape[-2:]).sum(0)


def activation_scales(amax: Tensor, headroom: float) -> Tensor:
    """The e4m3 scale that maps amax * headroom to 448 (amax at least 1e-12)."""
    return amax.clamp_min(1e-12) * (headroom / E4M3_MAX)


def quantize_down_weights(w_down: Tensor, next_scales: Tensor, used_scales: Tensor, headroom: float = 1.12) -> Tensor:
    """The down projections (layers, hidden, dim) in e4m3 with delayed scaling: divided by next_scales (measured at
    the previous call) and clamped to ±448; used_scales takes those scales, and next_scales becomes this call's
    amax * headroom / 448. Returns (layers, dim, hidden) e4m3, contiguous: each layer's transpose is the column-major
    (hidden, dim) operand of the down projection."""
    values = w_down.float()
    q = (values / next_scales.view(-1, 1, 1)).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    used_scales.copy_(next_scales)
    next_scales.copy_(activation_scales(values.abs().amax(dim=(1, 2)), headroom))
    return q.transpose(1, 2).contiguous()


# --- the soft-capped multi-token cross-entropy ----------------------------------------------------------------
def softcap(logits: Tensor, A: float = SOFTCAP[0], B: float = SOFTCAP[1], C: float = SOFTCAP[2]) -> tuple[Tensor, Tensor]:
    """(sigmoid((z + B) / C) in float32, the same rounded to bf16) for bf16 logits z, as the kernel computes it:
    z / C + B / C, then 0.5 + tanh(u / 2) / 2."""
    inv_c = np.float32(1) / np.float32(C)
    # In place on one float32 copy: the same roundings as the expression, without a temporary per operation (a CPU
    # spends most of this function allocating and filling rows x vocabulary floats).
    s = logits.to(torch.float32, copy=True).mul_(float(inv_c)).add_(float(np.float32(B) * inv_c))
    s.mul_(0.5).tanh_().mul_(0.5).add_(0.5)
    return s, s.to(torch.bfloat16)


def softcapped_ce(
    logits: Tensor, targets: Tensor, weights: Tensor, A: float = SOFTCAP[0], B: float = SOFTCAP[1], C: float = SOFTCAP[2]
) -> tuple[Tensor, Tensor, Tensor]:
    """The per-row losses of A * sigmoid((z + B) / C), (losses, s, lse): row r's loss is the sum over k of
    weights[k] * (lse_r - A s[r, targets[r + k]]) for the k with r + k < rows (k = 0 is the next token, k = 1 the one
    after, ...). s is the sigmoid rounded to bf16, as the kernel keeps it; lse is max + log(sum exp(A s - max)), the
    max taken before that rounding, as in the kernel. On CUDA, one Triton program per row."""
    if use_triton(logits) and logits.dtype == torch.bfloat16:
        return triton_kernels().softcapped_ce(logits, targets, weights, A, B, C)
    s32, s = softcap(logits, A, B, C)
    z = s.to(torch.float32, copy=True).mul_(A)
    top = s32.mul_(A).amax(dim=-1, keepdim=True)
    lse = top + (z - top).exp_().sum(dim=-1, keepdim=True).log_()
    n = logits.size(0)
    losses = torch.zeros(n, dtype=torch.float32, device=logits.device)
    for k in range(weights.numel()):
        rows = n - k
        if rows <= 0:
            break
        z_t = z[:rows].gather(1, targets[k:].view(-1, 1))
        losses[:rows] += (weights[k] * (lse[:rows] - z_t)).view(-1)
    return losses, s, lse


def softcapped_ce_grad(
    s: Tensor, lse: Tensor, targets: Tensor, weights: Tensor, grad: Tensor, grad_s: float, A: float = SOFTCAP[0], C: float = SOFTCAP[2]
) -> Tensor:
    """d loss / d logits divided by grad_s (the e5m2 scale), in float32, as the kernel writes it:
    grad * (A / C) / grad_s * (S_w p - w_t) * s * (1 - s), with p = exp(A s - lse), S_w the sum of all the weights,
    w_t the sum of the weights of the k whose target is this column, and grad (rows, 1) the incoming gradient of each
    row's loss. It treats s as the exact sigmoid (its bf16 rounding has no derivative) and, like the kernel, takes
    the whole S_w on the last rows too, where some k fall past the end. On CUDA, one Triton program per row."""
    if use_triton(s) and s.dtype == torch.bfloat16:
        return triton_kernels().softcapped_ce_grad(s, lse, targets, weights, grad, grad_s, A, C)
    n, sf = s.size(0), s.to(torch.float32, copy=True)
    s_w = weights[0]
    for w in weights[1:]:
        s_w = s_w + w
    grad_z = (sf * A).sub_(lse).exp_().mul_(s_w)
    for i in range(min(weights.numel(), n)):
        rows = n - i
        cols = targets[i:].view(-1, 1)
        grad_z[:rows].scatter_(1, cols, s_w * (A * sf[:rows].gather(1, cols) - lse[:rows]).exp() - _target_weight(targets, weights, i))
    # The kernel's float32 constants, multiplied in its order: grad * (1/C * A) * (1/grad_s).
    a_over_c = float(np.float32(1) / np.float32(C) * np.float32(A))
    scale = grad.float().view(-1, 1) * a_over_c * float(np.float32(1) / np.float32(grad_s))
    grad_z.mul_(scale).mul_(sf)
    return grad_z.mul_(sf.neg_().add_(1))  # times (1 - s), in place as the rest


def _target_weight(targets: Tensor, weights: Tensor, i: int) -> Tensor:
    """For rows r < n - i: the sum, in k order, of weights[k] over the k with r + k < n and targets[r + k] equal to
    targets[r + i] (the column whose gradient row r's i-th prediction corrects)."""
    n = targets.numel()
    rows = n - i
    w_t = torch.zeros(rows, 1, dtype=torch.float32, device=targets.device)
    for k in range(weights.numel()):
        m = max(0, min(rows, n - k))
        same = torch.zeros(rows, 1, dtype=torch.bool, device=targets.device)
        same[:m] = (targets[k : k + m] == targets[i : i + m]).view(-1, 1)
        w_t = w_t + torch.where(same, weights[k], 0.0)
    return w_t


class SoftcappedCrossEntropy(torch.autograd.Function):
    """The training loss: x (N, dim) times the output layer w (dim, vocab) in FP8 (e4m3, fixed scales x_s and w_s),
    the soft cap, and the multi-token losses of softcapped_ce. The logits' gradient goes through e5m2 (scaled by
    grad_s) into two FP8 matmuls: grad_x in bf16, grad_w in float32. Each row's loss takes its own incoming gradient
    (the record's kernel assumes it equal for all rows and bakes it in)."""

    @staticmethod
    def forward(ctx, x: Tensor, targets: Tensor, weights: Tensor, w: Tensor, x_s: float, w_s: float, grad_s: float) -> Tensor:
        x8 = x.div(x_s).to(E4M3)
        w8 = w.div(w_s).to(E4M3)
        logits = scaled_mm(x8, w8.T.contiguous().T, _scale(x, x_s), _scale(x, w_s), torch.bfloat16, fast_accum=True)
        losses, s, lse = softcapped_ce(logits, targets, weights)
        ctx.save_for_backward(x8, w8, s, lse, targets, weights)
        ctx.scales = x_s, w_s, grad_s
        return losses

    @staticmethod
    def backward(ctx, grad: Tensor):
        x8, w8, s, lse, targets, weights = ctx.saved_tensors
        x_s, w_s, grad_s = ctx.scales
        g8 = softcapped_ce_grad(s, lse, targets, weights, grad, grad_s).clamp(-E5M2_MAX, E5M2_MAX).to(E5M2)
        grad_x = scaled_mm(g8, w8.T, _scale(grad, grad_s), _scale(grad, w_s), torch.bfloat16)
        grad_w = scaled_mm(transposed(x8), transposed(g8).T, _scale(grad, x_s), _scale(grad, grad_s), torch.float32)
        return grad_x, None, None, grad_w, None, None, None
