"""Polar Express (https://arxiv.org/abs/2505.16932, Amsel, Persson, Musco, Gower): Nesterov momentum, then five
polynomial iterations that map a gradient to an approximately orthogonal matrix with its singular vectors, as
modded-nanogpt's record of 2026-07-17 runs them in NorMuon.

The record computes the iteration's small symmetric products with Triton kernels (A = X X^T or X^T X, then
B = b A + c A A). Here they are this port's Triton kernels on CUDA (triton_kernels.py, where triton is installed) and
torch matmuls elsewhere, with the same inputs and outputs: bf16 in, float32 accumulation, one rounding to bf16 out
(the kernels store the upper triangle mirrored, exactly symmetric; a matmul's two triangles are the same sums in
another order). The rest of the iteration is the record's own torch code.
"""

from __future__ import annotations

import torch
from torch import Tensor

from job.speedrun_2026_07_17 import kernels

# The record's coefficients (a, b, c) of a X + b (X X^T) X + c (X X^T)^2 X, for five iterations with a safety factor
# of 2e-2 and a cushion of 2.
COEFFICIENTS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
SAFETY = 2e-2  # the spectral norm is brought a little under 1 first: the norm over-estimates it, the polynomials need it


def xxt(X: Tensor, out: Tensor) -> Tensor:
    """out = X X^T, for one matrix or a batch."""
    if kernels.use_triton(X):
        return kernels.triton_kernels().xxt(X, out)
    return torch.matmul(X, X.mT, out=out)


def xtx(X: Tensor, out: Tensor) -> Tensor:
    """out = X^T X: the small product of a tall matrix."""
    if kernels.use_triton(X):
        return kernels.triton_kernels().xtx(X, out)
    return torch.matmul(X.mT, X, out=out)


def ba_plus_caa(A: Tensor, alpha: float, beta: float, out: Tensor) -> Tensor:
    """out = alpha A A^T + beta A, for a symmetric A (so A A^T = A A), summed in float32 and rounded once."""
    if kernels.use_triton(A):
        return kernels.triton_kernels().ba_plus_caa(A, alpha, beta, out)
    addmm = torch.baddbmm if A.ndim == 3 else torch.addmm
    return addmm(A, A, A.mT, beta=beta, alpha=alpha, out=out)


def polar_express(grad: Tensor, momentum_buffer: Tensor, momentum: Tensor, split: bool = False) -> Tensor:
    """Nesterov momentum on `grad` (float32, updated in place, as is the buffer), then its orthogonalised direction
    in bf16. `momentum` is a 0-d float32 tensor: its value is rounded to float32 before 1 - momentum is taken, as in
    the record, and a compiled graph takes a new value without recompiling. `split`: X B and a X as two kernels
    rather than one addmm (the record's choice for its 3072-row matrices, where addmm copies X first)."""
    m = momentum.to(grad.device, grad.dtype)
    momentum_buffer.lerp_(grad, 1 - m)
    g = grad.lerp_(momentum_buffer, m)

    X = g.bfloat16()
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * (1 + SAFETY) + 1e-6)
    X = X.contiguous()
    tall = g.size(-2) > g.size(-1)
    batched = X.ndim > 2
    # Tall: iterate on the small X^T X, multiplying X from the right; wide or square: X X^T, from the left.
    n = X.size(-1) if tall else X.size(-2)
    A = torch.empty((*X.shape[:-2], n, n), device=X.device, dtype=X.dtype)
    B = torch.empty_like(A)
    C = torch.empty_like(X)
    matmul = torch.bmm if batched else torch.mm
    addmm = torch.baddbmm if batched else torch.addmm
    for a, b, c in COEFFICIENTS:
        (xtx if tall else xxt)(X, out=A)
        ba_plus_caa(A, alpha=c, beta=b, out=B)
        left, right = (X, B) if tall else (B, X)
        if split:
            matmul(left, right, out=C)
            C.add_(X, alpha=a)
        else:
            addmm(X, left, right, beta=a, out=C)
        X, C = C, X  # the old X is the next iteration's output buffer
    return X
