"""The record's attention: causal within each document of a packed sequence, over a sliding window of keys.

The record calls FlashAttention-3's varlen kernel with the documents' cumulative lengths (cu_seqlens: 0, then each
document's end, padded with the sequence length) and window_size=(W, 0): query i sees key j when both are in the
same document and 0 <= i - j <= W, so W + 1 keys counting its own. Here that mask is built token by token and handed
to torch's scaled_dot_product_attention, which runs anywhere (FlashAttention-3 needs a Hopper GPU and a downloaded
kernel); the mask is (T, T), which suits the CPU's and the tests' lengths, not the record's 16K-262K-token batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, window: int, scale: float) -> Tensor:
    """softmax(q k^T * scale) v over the window mask, for q, k, v (T, H, D) as flash_attn_varlen_func takes them;
    returns (T, H, D)."""
    mask = window_mask(cu_seqlens, q.size(0), window)
    y = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale)
    return y.transpose(0, 1).contiguous()
