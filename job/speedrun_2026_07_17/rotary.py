"""The record's rotary embedding: half-truncated RoPE on interleaved pairs, stretched by YaRN when the attention
window grows.

The first head_dim / 4 frequencies run from 1 to 1/1024 rad per position, each used by a pair of adjacent dimensions
((x0, x1) rotates as one complex number); the second half of the head's dimensions has frequency 0 and never turns.
When the schedule widens the long window from `old` to `new` tokens, `rescale` rescales each frequency by YaRN's rule:
a frequency that turns fewer than alpha = 1 times across the old window is divided by new / old (interpolated), one
that turns more than beta = 32 times keeps its value, and in between the two mix linearly in the number of turns.
The attention scale (0.1 at the start) is multiplied by 1 + 0.2 ln(new / old) at each change.

Paired heads (the layers whose adjacent heads are read as one sequence of twice the length, see transformer.py) use
a table of 2 * head_dim columns: the even position 2t's angles, then the odd position 2t + 1's.

The tables are bf16, as the record keeps them, and cover 2 * max_seq_len positions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

BASE = 1 / 1024  # the lowest rotating frequency, in rad per position
ALPHA, BETA = 1, 32  # YaRN's bounds, in turns across the old window
START_SCALE = 0.1  # the attention scale before any window change


def frequencies(head_dim: int, device=None) -> Tensor:
    """(head_dim,) float32: BASE ** linspace(0, 1, head_dim // 4), each repeated for its pair, then head_dim // 2 zeros."""
    freq = BASE ** torch.linspace(0, 1, steps=head_dim // 4, dtype=torch.float32, device=device)
    freq = freq.repeat_interleave(2)
    return torch.cat([freq, freq.new_zeros(head_dim // 2)])


def yarn_frequencies(freq: Tensor, old_window: int, new_window: int) -> Tensor:
    """freq rescaled for a window grown from old_window to new_window tokens (float32)."""
    turns = old_window * freq / (2 * torch.pi)
    ratio = old_window / new_window
    ramp = torch.clamp((turns - ALPHA) / (BETA - ALPHA), 0, 1)
    return freq * (ratio + ramp * (1 - ratio))


class Yarn(nn.Module):
    def __init__(self, head_dim: int, max_seq_len: int, paired: bool = False):
        super().__init__()
        self.head_dim, self.max_seq_len, self.paired = head_dim, max_seq_len, paired
        self.angular_freq = nn.Buffer(frequencies(head_dim), persistent=False)
        width = 2 * head_dim if paired else head_dim
        self.factor1 = nn.Buffer(torch.empty(2 * max_seq_len, width, dtype=torch.bfloat16), persistent=False)
        self.factor2 = nn.Buffer(torch.empty_like(self.factor1), persistent=False)
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the unscaled frequencies and scale (computed on the device the tables are on)."""
        self.angular_freq.copy_(frequencies(self.head_dim, device=self.angular_freq.device))
        self._fill()
        self.attn_scale = START_SCALE

    @torch.no_grad()
    def rescale(self, old_window: int, new_window: int) -> None:
        """The long window grows from old_window to new_window tokens: YaRN-scale the frequencies and the attention.
        (The record's Yarn.apply: nn.Module.apply is taken.)"""
        self.angular_freq.copy_(yarn_frequencies(self.angular_freq, old_window, new_window))
        self._fill()
        self.attn_scale *= 0.2 * math.log(new_window / old_window) + 1

    def _fill(self) -> None:
        t = torch.arange(2 * self.max_seq_len, dtype=torch.float32, device=self.angular_freq.device)
        if self.paired:
            even, odd = torch.outer(2 * t, self.angular_freq), torch.outer(2 * t + 1, self.angular_freq)
            cos, sin = torch.cat((even.cos(), odd.cos()), dim=-1), torch.cat((even.sin(), odd.sin()), dim=-1)
        else:
            theta = torch.outer(t, self.angular_freq)
            cos, sin = theta.cos(), theta.sin()
        self.factor1.copy_(cos)
        self.factor2.copy_(sin)
        self.factor2[..., 1::2] *= -1  # the odd member of each pair takes -sin: (x0, x1) -> (x0 c + x1 s, x1 c - x0 s)

    def rotary(self, x: Tensor) -> Tensor:
        """x (B, T, H, D) rotated by position t in 0..T-1, in x's dtype: factor1 * x + factor2 * (x with each pair swapped)."""
        T = x.size(-3)
        if T > self.factor1.size(0):
            raise ValueError(f"the rotary tables cover {self.factor1.size(0)} positions, got a sequence of {T}")
        cos, sin = self.factor1[None, :T, None, :], self.factor2[None, :T, None, :]
        swapped = x.view(*x.shape[:-1], x.size(-1) // 2, 2).flip(-1).view(x.shape)
        return cos * x + sin * swapped
