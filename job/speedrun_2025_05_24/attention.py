"""The record's attention mask: causal, within one document (documents start at <|endoftext|>), and a sliding window
counted in 128-token blocks.

The window is not "k within W tokens of q": the record builds it from block lists. For each query block, the key
blocks wholly inside the same document and strictly before it ("full" blocks, no per-token check) are taken nearest
first, at most W - 1 of them; the blocks that need a per-token check ("partial": the diagonal block and blocks that
straddle a document boundary) are taken nearest first, at most max(1, W - all full blocks). `block_lists` computes
those lists once; `flex_block_mask` hands them to FlexAttention exactly as the record does, and `dense_mask` expands
the same selection to a token-by-token boolean mask for scaled_dot_product_attention. Both therefore mask the same
pairs, which tests/test_speedrun_2025_05_24.py checks against FlexAttention's own output and against a mask built from first
principles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from job.speedrun_2025_05_24 import BLOCK  # noqa: F401 (FlexAttention's block size in the record)

BOS = 50256  # <|endoftext|>: every document starts with it


@dataclass
class BlockLists:
    docs: torch.Tensor  # (T,) document index of each token
    partial_num: torch.Tensor  # (NB,) partial key blocks per query block, before the window
    partial_idx: torch.Tensor  # (NB, NB) their indices, nearest first (then the blocks not taken)
    full_num: torch.Tensor
    full_idx: torch.Tensor


def _ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, indices) of the True entries of each row, highest index (nearest key block) first."""
    num = dense.sum(dim=-1, dtype=torch.int32)
    idx = dense.argsort(dim=-1, descending=False, stable=True).flip(-1).to(torch.int32)
    return num, idx


def block_lists(tokens: torch.Tensor) -> BlockLists:
    """The block lists of one sequence of tokens (1-D, a multiple of BLOCK long)."""
    if tokens.ndim != 1 or len(tokens) % BLOCK:
        raise ValueError(f"the block mask needs one sequence whose length is a multiple of {BLOCK}, got {tuple(tokens.shape)}")
    docs = (tokens == BOS).cumsum(0)
    nb = len(tokens) // BLOCK
    block = torch.arange(nb, dtype=torch.int32, device=tokens.device)
    causal_any = block[:, None] >= block
    causal_all = block[:, None] > block
    low = docs.view(-1, BLOCK)[:, 0].contiguous()
    high = docs.view(-1, BLOCK)[:, -1].contiguous()
    doc_any = (low[:, None] <= high) & (high[:, None] >= low)
    doc_all = (low[:, None] == high) & (high[:, None] == low)
    any_, all_ = causal_any & doc_any, causal_all & doc_all
    partial_num, partial_idx = _ordered(any_ & ~all_)
    full_num, full_idx = _ordered(all_)
    return BlockLists(docs, partial_num, partial_idx, full_num, full_idx)


def windowed_counts(lists: BlockLists, window_blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full) block counts per query block under a window of `window_blocks` blocks, as the record clamps them."""
    partial = torch.clamp_max(lists.partial_num, torch.clamp_min(window_blocks - lists.full_num, 1))
    full = torch.clamp_max(lists.full_num, window_blocks - 1)
    return partial, full


def flex_block_mask(lists: BlockLists, window_blocks: torch.Tensor):
    """The FlexAttention BlockMask of one sequence (batch and head dimensions of size 1, broadcast)."""
    from torch.nn.attention.flex_attention import BlockMask

    docs = lists.docs

    def document_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (docs[q_idx] == docs[kv_idx])

    partial, full = windowed_counts(lists, window_blocks)
    return BlockMask.from_kv_blocks(partial[None, None].contiguous(), lists.partial_idx[None, None].contiguous(),
                                    full[None, None].contiguous(), lists.full_idx[None, None].contiguous(),
                                    BLOCK_SIZE=BLOCK, mask_mod=document_causal)


def _taken(num: torch.Tensor, idx: torch.Tensor, nb: int) -> torch.Tensor:
    """(NB, NB) bool: key block kb is among the first num[qb] entries of idx[qb]."""
    rank = torch.arange(nb, device=idx.device)[None, :] < num[:, None]
    out = torch.zeros(nb, nb, dtype=torch.bool, device=idx.device)
    return out.scatter_(1, idx.long(), rank)


def dense_mask(tokens: torch.Tensor, window_blocks: torch.Tensor | int) -> torch.Tensor:
    """(T, T) bool mask (True: attend) of one sequence of any length: the same pairs FlexAttention's block mask lets
    through. A length that is not a multiple of BLOCK is padded (continuing the last document) and cut back."""
    T = len(tokens)
    pad = -T % BLOCK
    if pad:
        tokens = torch.cat([tokens, tokens.new_zeros(pad)])  # token 0 is not BOS: the last document goes on
    lists = block_lists(tokens)
    window = torch.as_tensor(window_blocks, dtype=torch.int32, device=tokens.device)
    partial, full = windowed_counts(lists, window)
    nb = len(tokens) // BLOCK
    full_taken = _taken(full, lists.full_idx, nb)
    partial_taken = _taken(partial, lists.partial_idx, nb)
    pos = torch.arange(len(tokens), device=tokens.device)
    qb, kb = pos[:, None] // BLOCK, pos[None, :] // BLOCK
    per_token = (pos[:, None] >= pos[None, :]) & (lists.docs[:, None] == lists.docs[None, :])
    mask = full_taken[qb, kb] | (partial_taken[qb, kb] & per_token)
    return mask[:T, :T]
