"""The record's attention: causal within each document of a packed sequence, over a sliding window of keys.

The record calls FlashAttention-3's varlen kernel with the documents' cumulative lengths (cu_seqlens: 0, then each
document's end, padded with the sequence length) and window_size=(W, 0): query i sees key j when both are in the
same document and 0 <= i - j <= W, so W + 1 keys counting its own. FlashAttention-3 needs a Hopper GPU and a
kernel downloaded at run time; here the same mask goes to torch's own attention:

- on the CPU, scaled_dot_product_attention with the mask built token by token, (T, T): the CPU's and the tests'
  lengths, not the record's 16K-262K-token batches;
- on CUDA, FlexAttention with the same rule as its mask_mod, which skips the 128-token blocks the rule leaves empty
  when it is compiled (inside the compiled model; eager FlexAttention materialises every score). FlexAttention has
  no backward pass on the CPU, where tests/test_speedrun_2026_07_17_model.py checks its forward against the dense
  mask; the CUDA path itself has not been run yet.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel


def document_ids(cu_seqlens: Tensor, T: int) -> Tensor:
    """(T,) the document of each position: how many document boundaries lie at or before it (repeated boundaries,
    the padding of cu_seqlens, make empty documents and change no pair's sameness)."""
    pos = torch.arange(T, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens, pos, right=True)


def window_mask(cu_seqlens: Tensor, T: int, window: int) -> Tensor:
    """(T, T) bool, True where query i may attend key j: same document and 0 <= i - j <= window."""
    docs = document_ids(cu_seqlens, T)
    pos = torch.arange(T, device=cu_seqlens.device)
    back = pos[:, None] - pos[None, :]
    return (docs[:, None] == docs[None, :]) & (back >= 0) & (back <= window)


def kernel_name(device: torch.device | str) -> str:
    """Which attention runs on `device`, in words (the run's first log line says it)."""
    if torch.device(device).type == "cuda":
        return "FlexAttention (torch's, compiled; the record's FlashAttention-3 mask)"
    return "scaled_dot_product_attention over a dense mask (the record's FlashAttention-3 mask)"


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, window: int, scale: float) -> Tensor:
    """softmax(q k^T * scale) v over the window mask, for q, k, v (T, H, D) as flash_attn_varlen_func takes them;
    returns (T, H, D)."""
    attend = flex_attention if q.is_cuda else dense_attention
    y = attend(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], cu_seqlens, window, scale)
    return y[0].transpose(0, 1).contiguous()


def dense_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, window: int, scale: float) -> Tensor:
    """(1, H, T, D) inputs and output: scaled_dot_product_attention over the (T, T) window mask."""
    mask = window_mask(cu_seqlens, q.size(-2), window)
    with contextlib.nullcontext() if cpu_flash_attention(q) else sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


# Read once, outside any traced code: torch.compile cannot trace the call (it returns a str), and a graph break there
# splits the compiled model at every attention layer.
CPU_CAPABILITY = torch.backends.cpu.get_cpu_capability()


def cpu_flash_attention(q: Tensor) -> bool:
    """Whether torch's CPU flash-attention kernel takes q's dtype here: it packs bf16 and fp16 with AVX-512
    instructions only (elsewhere, under ATEN_CPU_CAPABILITY avx2 or default too, it raises), and the math kernel
    stands in."""
    return q.dtype == torch.float32 or CPU_CAPABILITY.startswith("AVX512")


def flex_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, window: int, scale: float) -> Tensor:
    """(1, H, T, D) inputs and output: FlexAttention with the window rule as its mask_mod."""
    from torch.nn.attention.flex_attention import create_block_mask
    from torch.nn.attention.flex_attention import flex_attention as flex

    T = q.size(-2)
    docs = document_ids(cu_seqlens, T)

    def same_document_window(b, h, q_idx, kv_idx):
        back = q_idx - kv_idx
        return (docs[q_idx] == docs[kv_idx]) & (back >= 0) & (back <= window)

    block_mask = create_block_mask(same_document_window, None, None, T, T, device=q.device)
    return flex(q, k, v, block_mask=block_mask, scale=scale)
