"""Triton kernels of the record's fused operations, written for this port from their arithmetic. Each launcher computes
what its torch twin computes from the same inputs; the twins (in polar_express.py and kernels.py, whose transposes
normuon.py calls) call it on CUDA tensors when triton is installed (kernels.use_triton) and stay torch everywhere
else. Only this module imports triton.

- xxt, xtx, ba_plus_caa: Polar Express's symmetric products, X X^T (or X^T X) and alpha A A + beta A for a symmetric A,
  bf16 in, float32 sums, one rounding to bf16. Only the blocks on and above the diagonal are computed; each is
  stored twice, as itself and mirrored, so the result is exactly symmetric.
- relu_square, relu_square_grad: the MLP's up projection with ReLU² fused after it (the pre-activation kept for the
  backward), and the backward's down projection fused with the ReLU²'s derivative. bf16 only: see below for FP8.
- softcapped_ce, softcapped_ce_grad: the soft-capped multi-token cross-entropy, one program per row looping over the
  vocabulary: the losses, the bf16 sigmoid and the log-sum-exp; then, from those, the logits' gradient (float32,
  scaled for the e5m2 cast that the caller does).
- transpose_copy, transpose_add: dst = src^T and dst += src^T in tiles (the tied embedding and output layer).

The kernels use plain pointer blocks (tl.load, tl.store, tl.dot), no tensor descriptors, so Triton's interpreter
(TRITON_INTERPRET=1) runs them on a CPU: tests/test_speedrun_2026_07_17_triton.py holds each one to its torch twin
there. Two habits follow from the interpreter, and cost a GPU next to nothing:

- Arithmetic is float32 and each rounding to bf16 is explicit (round_bf16, to nearest even on the bits). The
  interpreter keeps bf16 values as raw 16-bit integers, so it cannot add or multiply them, and its float32 -> bf16
  cast truncates where the GPU rounds. A product of two bf16 values is exact in float32, so rounding it once is
  what a bf16 multiply does.
- tl.dot's operands are bf16 on a GPU (the tensor cores' input) and float32 in the interpreter (FLOAT32_DOT). A
  bf16 value is exactly a float32 one and their products are exact in float32, so only the order of the float32
  sums differs, as it does between any two matmul implementations.

What stays torch: everything in FP8 (the MLP's FP8 forward, the FP8 matmuls, the e5m2 cast of the loss's gradient).
The interpreter does not round to FP8 as the hardware does (it rounds ties away from zero and loses the carry into
the exponent: 1.97 becomes 1.0 in e4m3), so an FP8 kernel could not be checked here.

The soft cap's sigmoid is 1 / (1 + exp(-u)) (Triton has tanh only in libdevice, which the interpreter lacks) where the
torch twin computes 0.5 + tanh(u / 2) / 2 as the record's CUDA kernel does: the two agree to a few float32 ulps, so
the bf16 sigmoid can differ in its last bit where the float32 one lies that close to a rounding boundary.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_PREDICTIONS = 4  # the multi-token loss's weights fit one vector of this many (the record uses up to 3)


# tl.dot's operands: bf16 on a GPU, float32 under the interpreter (which would multiply bf16 bits as integers).
FLOAT32_DOT = bool(triton.knobs.runtime.interpret)


@triton.jit
def round_bf16(x):
    """float32 x rounded to the nearest bf16 (ties to even), as a float32; NaN stays NaN."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))


# ---- Polar Express's symmetric products ---------------------------------------------------------------------------
@triton.jit
def _gram_kernel(
    x_ptr,
    out_ptr,
    n,
    k: tl.constexpr,
    x_batch,
    x_row,
    x_red,
    out_batch,
    out_row,
    out_col,
    alpha,
    beta,
    ADD_INPUT: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    FLOAT32_DOT: tl.constexpr,
):
    """out[i, j] = sum_r x[i, r] x[j, r] for one (BLOCK, BLOCK) block on or above the diagonal, stored with its
    mirror; with ADD_INPUT (x square), alpha times that sum plus beta x[i, j], rounded once."""
    bi, bj, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if bj < bi:  # below the diagonal: block (bj, bi) stores it
        return
    x_ptr += batch.to(tl.int64) * x_batch
    out_ptr += batch.to(tl.int64) * out_batch
    i = bi * BLOCK + tl.arange(0, BLOCK)
    j = bj * BLOCK + tl.arange(0, BLOCK)
    r = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for start in range(0, k, BLOCK_K):
        red = start + r
        xi = tl.load(x_ptr + i[:, None] * x_row + red[None, :] * x_red, mask=(i[:, None] < n) & (red[None, :] < k), other=0.0)
        xj = tl.load(x_ptr + j[:, None] * x_row + red[None, :] * x_red, mask=(j[:, None] < n) & (red[None, :] < k), other=0.0)
        if FLOAT32_DOT:
            xi, xj = xi.to(tl.float32), xj.to(tl.float32)
        acc = tl.dot(xi, tl.trans(xj), acc)
    inside = (i[:, None] < n) & (j[None, :] < n)
    if ADD_INPUT:
        own = tl.load(x_ptr + i[:, None] * x_row + j[None, :] * x_red, mask=inside, other=0.0)
        acc = acc * alpha + own.to(tl.float32) * beta
    # A diagonal block is stored twice over itself, possibly by different threads: its lower triangle takes the
    # upper one's sums, so whichever store lands last, the result is exactly symmetric.
    out = round_bf16(tl.where(i[:, None] <= j[None, :], acc, tl.trans(acc)))
    tl.store(out_ptr + i[:, None] * out_row + j[None, :] * out_col, out, mask=inside)
    tl.store(out_ptr + j[:, None] * out_row + i[None, :] * out_col, tl.trans(out), mask=tl.trans(inside))


def _batch_strides(t: Tensor) -> tuple[int, int]:
    return (t.size(0), t.stride(0)) if t.ndim == 3 else (1, 0)


def _launch_gram(x: Tensor, out: Tensor, row: int, red: int, alpha: float, beta: float, add_input: bool, block: int, block_k: int) -> Tensor:
    if x.dtype != torch.bfloat16 or out.dtype != torch.bfloat16 or x.ndim not in (2, 3):
        raise ValueError(f"the symmetric products take bf16 matrices or batches of them, got {x.dtype} {tuple(x.shape)}")
    n, k = x.size(row), x.size(red)
    if out.shape[-2:] != (n, n):
        raise ValueError(f"the output must be {n} x {n}, got {tuple(out.shape)}")
    batch, x_batch = _batch_strides(x)
    grid = (triton.cdiv(n, block), triton.cdiv(n, block), batch)
    _gram_kernel[grid](
        x,
        out,
        n,
        k,
        x_batch,
        x.stride(row),
        x.stride(red),
        _batch_strides(out)[1],
        out.stride(-2),
        out.stride(-1),
        alpha,
        beta,
        ADD_INPUT=add_input,
        BLOCK=block,
        BLOCK_K=block_k,
        FLOAT32_DOT=FLOAT32_DOT,
        num_warps=8,
    )
    return out


def xxt(X: Tensor, out: Tensor, block: int = 128, block_k: int = 64) -> Tensor:
    """out = X X^T, for one matrix (m, k) or a batch (b, m, k); bf16."""
    return _launch_gram(X, out, -2, -1, 1.0, 0.0, False, block, block_k)


def xtx(X: Tensor, out: Tensor, block: int = 128, block_k: int = 64) -> Tensor:
    """out = X^T X: the small product of a tall matrix (or batch); bf16."""
    return _launch_gram(X, out, -1, -2, 1.0, 0.0, False, block, block_k)


def ba_plus_caa(A: Tensor, alpha: float, beta: float, out: Tensor, block: int = 128, block_k: int = 64) -> Tensor:
    """out = alpha A A + beta A for a symmetric A (so A A = A A^T), summed in float32 and rounded once; bf16."""
    if A.size(-1) != A.size(-2):
        raise ValueError(f"A must be square, got {tuple(A.shape)}")
    return _launch_gram(A, out, -2, -1, float(alpha), float(beta), True, block, block_k)


# ---- the MLP's up projection with ReLU², and its gradient ---------------------------------------------------------
@triton.jit
def _relu_square_kernel(
    a_ptr,
    b_ptr,
    out_ptr,
    aux_ptr,
    m,
    n,
    k: tl.constexpr,
    a_row,
    a_col,
    b_row,
    b_col,
    out_row,
    aux_row,
    FORWARD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    FLOAT32_DOT: tl.constexpr,
):
    """c = a b^T (float32 sums) rounded to bf16, for one (BLOCK_M, BLOCK_N) block. FORWARD: out = c (the
    pre-activation) and aux = relu(c)² rounded. Else aux holds the pre-activation and out = 2 c relu(aux) rounded:
    d loss / d pre, where c = d loss / d post."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    r = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, k, BLOCK_K):
        red = start + r
        a = tl.load(a_ptr + rows[:, None].to(tl.int64) * a_row + red[None, :] * a_col, mask=(rows[:, None] < m) & (red[None, :] < k), other=0.0)
        b = tl.load(b_ptr + cols[:, None] * b_row + red[None, :] * b_col, mask=(cols[:, None] < n) & (red[None, :] < k), other=0.0)
        if FLOAT32_DOT:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc)
    c = round_bf16(acc)
    inside = (rows[:, None] < m) & (cols[None, :] < n)
    at = rows[:, None].to(tl.int64) * out_row + cols[None, :]
    aux_at = rows[:, None].to(tl.int64) * aux_row + cols[None, :]
    if FORWARD:
        tl.store(out_ptr + at, c, mask=inside)
        relu = tl.maximum(c, 0.0)
        tl.store(aux_ptr + aux_at, round_bf16(relu * relu), mask=inside)
    else:
        pre = tl.load(aux_ptr + aux_at, mask=inside, other=0.0).to(tl.float32)
        tl.store(out_ptr + at, round_bf16(2.0 * c * tl.maximum(pre, 0.0)), mask=inside)


def _launch_relu_square(a: Tensor, b: Tensor, out: Tensor, aux: Tensor, forward: bool, blocks: tuple[int, int, int]) -> None:
    if not (a.dtype == b.dtype == out.dtype == aux.dtype == torch.bfloat16) or a.ndim != 2 or b.ndim != 2 or a.size(1) != b.size(1):
        raise ValueError(f"the fused MLP takes bf16 (m, k) and (n, k), got {a.dtype} {tuple(a.shape)} and {b.dtype} {tuple(b.shape)}")
    m, k = a.shape
    n = b.size(0)
    bm, bn, bk = blocks
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _relu_square_kernel[grid](
        a,
        b,
        out,
        aux,
        m,
        n,
        k,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        out.stride(0),
        aux.stride(0),
        FORWARD=forward,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        FLOAT32_DOT=FLOAT32_DOT,
        num_warps=8,
        num_stages=3,
    )


def relu_square(x: Tensor, w_up: Tensor, blocks: tuple[int, int, int] = (128, 128, 64)) -> tuple[Tensor, Tensor]:
    """(pre, post) for x (N, dim) and w_up (hidden, dim): pre = x w_up^T rounded to bf16, post = relu(pre)² in bf16."""
    pre = x.new_empty(x.size(0), w_up.size(0))
    post = torch.empty_like(pre)
    _launch_relu_square(x, w_up, pre, post, True, blocks)
    return pre, post


def relu_square_grad(grad: Tensor, w_down: Tensor, pre: Tensor, blocks: tuple[int, int, int] = (128, 128, 64)) -> Tensor:
    """d loss / d pre for the incoming gradient (N, dim), w_down (hidden, dim) and the saved pre-activation (N, hidden):
    (grad w_down^T) rounded to bf16, times 2 relu(pre), rounded to bf16."""
    if pre.shape != (grad.size(0), w_down.size(0)):
        raise ValueError(f"the pre-activation must be {(grad.size(0), w_down.size(0))}, got {tuple(pre.shape)}")
    out = torch.empty_like(pre)
    _launch_relu_square(grad, w_down, out, pre, False, blocks)
    return out


# ---- the soft-capped multi-token cross-entropy --------------------------------------------------------------------
@triton.jit
def _capped_sigmoid(logits, inv_c, b_over_c):
    """sigmoid(z / C + B / C) in float32 for bf16 logits z."""
    u = logits.to(tl.float32) * inv_c + b_over_c
    return 1.0 / (1.0 + tl.exp(-u))


@triton.jit
def _pick(values, ks, k: tl.constexpr):
    """values[k] of a small vector (a sum with zeros: exact)."""
    return tl.sum(tl.where(ks == k, values, 0), axis=0)


@triton.jit
def _softcapped_ce_kernel(
    logits_ptr,
    targets_ptr,
    weights_ptr,
    losses_ptr,
    s_ptr,
    lse_ptr,
    n_rows,
    vocab: tl.constexpr,
    n_predict,
    logits_row,
    s_row,
    a,
    inv_c,
    b_over_c,
    BLOCK_V: tl.constexpr,
    PREDICT: tl.constexpr,
):
    """One row: s = the bf16 sigmoid of every logit (stored), lse = max + log(sum exp(A s - max)) with the max taken
    over A times the float32 sigmoid, and the loss sum_k w_k (lse - A s[target of row + k]), summed in k order."""
    row = tl.program_id(0)
    logits_ptr += row.to(tl.int64) * logits_row
    s_ptr += row.to(tl.int64) * s_row
    offs = tl.arange(0, BLOCK_V)
    top = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    for start in range(0, vocab, BLOCK_V):
        inside = start + offs < vocab
        s = _capped_sigmoid(tl.load(logits_ptr + start + offs, mask=inside, other=0.0), inv_c, b_over_c)
        tl.store(s_ptr + start + offs, round_bf16(s), mask=inside)
        top = tl.maximum(top, tl.where(inside, a * s, float("-inf")))
    top_max = tl.max(top, axis=0)
    tl.debug_barrier()  # the stored sigmoid is read back below, by other threads of this program
    total = tl.zeros((BLOCK_V,), tl.float32)
    for start in range(0, vocab, BLOCK_V):
        inside = start + offs < vocab
        s = tl.load(s_ptr + start + offs, mask=inside, other=0.0).to(tl.float32)
        total += tl.where(inside, tl.exp(a * s - top_max), 0.0)
    lse = top_max + tl.log(tl.sum(total, axis=0))
    tl.store(lse_ptr + row, lse)
    ks = tl.arange(0, PREDICT)
    valid = (ks < n_predict) & (row + ks < n_rows)
    target = tl.load(targets_ptr + row + ks, mask=valid, other=0)
    s_target = tl.load(s_ptr + target, mask=valid, other=0.0).to(tl.float32)
    terms = tl.where(valid, tl.load(weights_ptr + ks, mask=valid, other=0.0) * (lse - a * s_target), 0.0)
    loss = _pick(terms, ks, 0)
    for k in tl.static_range(1, PREDICT):
        loss += _pick(terms, ks, k)
    tl.store(losses_ptr + row, loss)


def _softcap_constants(B: float, C: float) -> tuple[float, float]:
    """1/C and B/C as the float32 numbers the torch twin (kernels.softcap) multiplies by."""
    inv_c = np.float32(1) / np.float32(C)
    return float(inv_c), float(np.float32(B) * inv_c)


def _check_ce(targets: Tensor, weights: Tensor, rows: int) -> None:
    if targets.shape != (rows,) or not 1 <= weights.numel() <= MAX_PREDICTIONS:
        raise ValueError(f"need one target per row and 1 to {MAX_PREDICTIONS} weights, got {tuple(targets.shape)} and {weights.numel()}")


def softcapped_ce(
    logits: Tensor, targets: Tensor, weights: Tensor, A: float, B: float, C: float, block_v: int = 1024
) -> tuple[Tensor, Tensor, Tensor]:
    """(losses (N,), s (N, V) bf16, lse (N, 1)) of bf16 logits (N, V): kernels.softcapped_ce's outputs."""
    if logits.dtype != torch.bfloat16 or logits.stride(-1) != 1:
        raise ValueError(f"the logits must be bf16 with contiguous rows, got {logits.dtype} {tuple(logits.stride())}")
    n, vocab = logits.shape
    _check_ce(targets, weights, n)
    s = torch.empty_like(logits, memory_format=torch.contiguous_format)
    lse = logits.new_empty(n, 1, dtype=torch.float32)
    losses = logits.new_empty(n, dtype=torch.float32)
    inv_c, b_over_c = _softcap_constants(B, C)
    _softcapped_ce_kernel[(n,)](
        logits,
        targets.contiguous(),
        weights.float().contiguous(),
        losses,
        s,
        lse,
        n,
        vocab,
        weights.numel(),
        logits.stride(0),
        s.stride(0),
        float(A),
        inv_c,
        b_over_c,
        BLOCK_V=block_v,
        PREDICT=MAX_PREDICTIONS,
        num_warps=8,
    )
    return losses, s, lse


@triton.jit
def _softcapped_ce_grad_kernel(
    s_ptr,
    lse_ptr,
    targets_ptr,
    weights_ptr,
    grad_ptr,
    out_ptr,
    n_rows,
    vocab: tl.constexpr,
    n_predict,
    s_row,
    out_row,
    a,
    a_over_c,
    inv_grad_s,
    BLOCK_V: tl.constexpr,
    PREDICT: tl.constexpr,
):
    """One row: grad * (A / C) / grad_s * (S_w p - w_t) * s * (1 - s), p = exp(A s - lse), S_w the sum of all the
    weights and w_t, per column, the sum of the weights of the k whose target (row + k in the batch) it is."""
    row = tl.program_id(0)
    s_ptr += row.to(tl.int64) * s_row
    out_ptr += row.to(tl.int64) * out_row
    ks = tl.arange(0, PREDICT)
    valid = (ks < n_predict) & (row + ks < n_rows)
    weights = tl.load(weights_ptr + ks, mask=ks < n_predict, other=0.0)
    target = tl.load(targets_ptr + row + ks, mask=valid, other=-1)
    s_w = _pick(weights, ks, 0)
    for k in tl.static_range(1, PREDICT):
        s_w += _pick(weights, ks, k)
    lse = tl.load(lse_ptr + row)
    scale = tl.load(grad_ptr + row).to(tl.float32) * a_over_c * inv_grad_s
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, vocab, BLOCK_V):
        cols = start + offs
        inside = cols < vocab
        s = tl.load(s_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        w_t = tl.zeros((BLOCK_V,), tl.float32)
        for k in tl.static_range(PREDICT):
            w_t += tl.where(cols == _pick(target, ks, k), _pick(weights, ks, k), 0.0)
        grad_z = s_w * tl.exp(a * s - lse) - w_t
        tl.store(out_ptr + cols, scale * grad_z * s * (1 - s), mask=inside)


def softcapped_ce_grad(
    s: Tensor, lse: Tensor, targets: Tensor, weights: Tensor, grad: Tensor, grad_s: float, A: float, C: float, block_v: int = 1024
) -> Tensor:
    """kernels.softcapped_ce_grad: d loss / d logits divided by grad_s, float32 (N, V), from the forward's s and lse
    and each row's incoming gradient."""
    if s.dtype != torch.bfloat16 or s.stride(-1) != 1:
        raise ValueError(f"s must be bf16 with contiguous rows, got {s.dtype} {tuple(s.stride())}")
    n, vocab = s.shape
    _check_ce(targets, weights, n)
    out = s.new_empty(n, vocab, dtype=torch.float32)
    # The twin's float32 constants: A / C as (1 / C) * A, and 1 / grad_s.
    a_over_c = float(np.float32(1) / np.float32(C) * np.float32(A))
    inv_grad_s = float(np.float32(1) / np.float32(grad_s))
    _softcapped_ce_grad_kernel[(n,)](
        s,
        lse.contiguous(),
        targets.contiguous(),
        weights.float().contiguous(),
        grad.float().contiguous(),
        out,
        n,
        vocab,
        weights.numel(),
        s.stride(0),
        out.stride(0),
        float(A),
        a_over_c,
        inv_grad_s,
        BLOCK_V=block_v,
        PREDICT=MAX_PREDICTIONS,
        num_warps=8,
    )
    return out


# ---- transposes ---------------------------------------------------------------------------------------------------
@triton.jit
def _transpose_kernel(
    src_ptr,
    dst_ptr,
    m,
    n,
    src_row,
    src_col,
    dst_row,
    dst_col,
    ADD: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dst (n, m) = src (m, n) transposed, one tile; with ADD, dst += it (float32 sum, rounded to bf16 if
    ROUND_BF16). Both sides are read and written along their rows, the tile turned in between."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    inside = (rows[:, None] < m) & (cols[None, :] < n)
    tile = tl.trans(tl.load(src_ptr + rows[:, None] * src_row + cols[None, :] * src_col, mask=inside))
    dst = dst_ptr + cols[:, None] * dst_row + rows[None, :] * dst_col
    if ADD:
        tile = tl.load(dst, mask=tl.trans(inside)).to(tl.float32) + tile.to(tl.float32)
        if ROUND_BF16:
            tile = round_bf16(tile)
    tl.store(dst, tile, mask=tl.trans(inside))


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _launch_transpose(src: Tensor, dst: Tensor, add: bool, blocks: tuple[int, int]) -> Tensor:
    if src.ndim != 2 or dst.shape != src.shape[::-1]:
        raise ValueError(f"dst must be src's transpose, got {tuple(src.shape)} and {tuple(dst.shape)}")
    m, n = src.shape
    bm, bn = blocks
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _transpose_kernel[grid](
        src,
        dst,
        m,
        n,
        src.stride(0),
        src.stride(1),
        dst.stride(0),
        dst.stride(1),
        ADD=add,
        ROUND_BF16=dst.dtype == torch.bfloat16,
        BLOCK_M=bm,
        BLOCK_N=bn,
        num_warps=4,
    )
    return dst


def transpose_copy(src: Tensor, dst: Tensor, blocks: tuple[int, int] = (64, 64)) -> Tensor:
    """dst = src^T for 2-d tensors of one dtype, bit for bit: both are viewed as integers of their width."""
    if src.dtype != dst.dtype:
        raise ValueError(f"src and dst must share a dtype, got {src.dtype} and {dst.dtype}")
    bits = _BITS[src.element_size()]
    _launch_transpose(src.view(bits), dst.view(bits), False, blocks)
    return dst


def transpose_add(src: Tensor, dst: Tensor, blocks: tuple[int, int] = (64, 64)) -> Tensor:
    """dst += src^T for bf16 or float32 tensors, each sum in float32 rounded once to dst's dtype."""
    if src.dtype not in (torch.bfloat16, torch.float32) or dst.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"transpose_add takes bf16 or float32, got {src.dtype} and {dst.dtype}")
    return _launch_transpose(src, dst, True, blocks)
