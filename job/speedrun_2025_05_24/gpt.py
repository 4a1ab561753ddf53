"""The record's model: GPT-2 (124M)'s width and depth with the speedrun's changes, parameter for parameter.

Token embeddings normed and mixed back into every block (x0); three value embeddings added to the values of the
first and last three layers; rotary positions on half the head dimensions; RMS-normed queries and keys with a fixed
attention scale; ReLU² MLPs; no attention in the eighth block; U-net skips from the first half of the blocks to
the second; an untied, zero-initialised output layer (FP8 where the GPU can) whose logits are soft-capped by
30·sigmoid(z / 7.5√d). Names, shapes, initialisation and the order in which parameters are drawn follow the record,
so the same seed gives the same initial weights and its state dicts load here unchanged.

Precision is the record's too: no autocast; the embeddings are stored in the compute dtype (bf16 on CUDA) and every
matmul casts its weight to the activations' dtype. The forward takes (B, T) token ids like job/model.py's GPT and
returns (logits, mean loss); the training loss of the record is the sum over tokens, which the recipe asks the
trainer for (Recipe.backward_scale), so gradients are the record's.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from job.model import generate
from job.speedrun_2025_05_24 import GPT2_VOCAB, LAYERS, attention, next_multiple  # noqa: F401 (re-exported)
from job.speedrun_2025_05_24.fp8 import fp8_mm

ATTN_SCALE = 0.12  # the record's fixed attention scale (not 1/sqrt(head_dim))
NO_ATTENTION_LAYER = 7  # the eighth block has only its MLP
# Layers that use the long window (the others use half of it), for the record's 12 layers.
LONG_WINDOW_LAYERS = (0, 4, 7, 11)
MAX_WINDOW = 1792  # the long window at the end of the record's schedule (14 blocks of 128)


@dataclass
class SpeedrunConfig:
    vocab_size: int = GPT2_VOCAB
    n_layer: int = LAYERS
    n_head: int = 6
    n_embd: int = 768
    block_size: int = 4 * 64 * 1024  # the longest sequence (rotary table): the record's validation length

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


@functools.cache
def _compiled_flex():
    """FlexAttention compiled on its own, for an eager model. Compiled at first use, not at import: compiling fixes
    Inductor's cache dir, which the trainer sets first."""
    from torch.nn.attention.flex_attention import flex_attention as flex

    return torch.compile(flex, dynamic=False)


# Compiled with static shapes, FlexAttention is compiled anew for each shape, and past Dynamo's recompile limit (8 by
# default, counted over every compile of torch's flex_attention in the process) Dynamo quietly runs it eagerly: here
# that is a different model. The eager model's shapes are few (its FlexAttention path takes one sequence a multiple
# of 128 long); past this many it fails instead of changing the model.
FLEX_SHAPES = 64


def flex_attention(q: Tensor, k: Tensor, v: Tensor, block_mask, scale: float) -> Tensor:
    """FlexAttention, always compiled: only the compiled kernel skips the blocks the block lists leave out, and the
    window lives there alone (eager FlexAttention applies just the per-token document-causal rule, a different model).
    Inside a compiled model it is traced into the model's graph, as the record's is: no global state for Dynamo to
    guard on (a guard that fails recompiles the whole model), and the compiled callable of an eager model stays the
    compiled one."""
    from torch.nn.attention.flex_attention import flex_attention as flex

    if torch.compiler.is_compiling():
        return flex(q, k, v, block_mask=block_mask, scale=scale)
    with torch._dynamo.config.patch(recompile_limit=FLEX_SHAPES, fail_on_recompile_limit_hit=True):
        return _compiled_flex()(q, k, v, block_mask=block_mask, scale=scale)


class CastedLinear(nn.Linear):
    """A bias-free linear whose weight is cast to the input's dtype; optionally FP8 in training."""

    def __init__(self, in_features: int, out_features: int, fp8_scales: tuple[float, float, float] | None = None):
        super().__init__(in_features, out_features, bias=False)
        self.fp8_scales = fp8_scales
        self.use_fp8 = False  # switched on by the recipe where the GPU has FP8 tensor cores

    def reset_parameters(self) -> None:
        bound = math.sqrt(3) * 0.5 * self.in_features ** -0.5  # uniform with std 0.5/sqrt(in)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        if self.use_fp8 and self.training:
            out = fp8_mm(x.flatten(0, -2), self.weight, *self.fp8_scales)[0]
            return out.reshape(*x.shape[:-1], -1)
        return F.linear(x, self.weight.type_as(x))


class Rotary(nn.Module):
    """Rotary embedding on the first half of the head dimensions (the rest rotate at frequency 0: unchanged)."""

    def __init__(self, dim: int, max_seq_len: int):
        super().__init__()
        freq = (1 / 1024) ** torch.linspace(0, 1, steps=dim // 4, dtype=torch.float32)
        freq = torch.cat([freq, freq.new_zeros(dim // 4)])
        theta = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), freq)
        self.cos = nn.Buffer(theta.cos(), persistent=False)
        self.sin = nn.Buffer(theta.sin(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, H, D)
        T = x.size(-3)
        cos, sin = self.cos[None, :T, None, :], self.sin[None, :T, None, :]
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: SpeedrunConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        hdim, dim = cfg.n_head * cfg.head_dim, cfg.n_embd
        bound = math.sqrt(3) * 0.5 * dim ** -0.5
        self.qkv_w = nn.Parameter(torch.empty(3, hdim, dim).uniform_(-bound, bound))  # q, k, v stacked: one matmul
        self.lambdas = nn.Parameter(torch.tensor([0.5, 0.5]))  # value mix: own values vs value embedding
        self.rotary = Rotary(self.head_dim, cfg.block_size)
        self.c_proj = CastedLinear(hdim, dim)
        self.c_proj.weight.detach().zero_()

    def forward(self, x: Tensor, ve: Tensor | None, mask) -> Tensor:
        B, T = x.size(0), x.size(1)
        qkv = F.linear(x, self.qkv_w.flatten(end_dim=1).type_as(x))
        q, k, v = qkv.view(B, T, 3 * self.n_head, self.head_dim).chunk(3, dim=-2)
        q, k = norm(q), norm(k)
        q, k = self.rotary(q), self.rotary(k)
        v = self.lambdas[0] * v + self.lambdas[1] * ve.view_as(v) if ve is not None else self.lambdas[0] * v
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if isinstance(mask, Tensor):  # dense (B, T, T): scaled_dot_product_attention
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=ATTN_SCALE)
        else:  # a FlexAttention BlockMask
            y = flex_attention(q, k, v, block_mask=mask, scale=ATTN_SCALE)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, -1))


class MLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.c_fc = CastedLinear(dim, 4 * dim)
        self.c_proj = CastedLinear(4 * dim, dim)
        self.c_proj.weight.detach().zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, cfg: SpeedrunConfig, layer: int):
        super().__init__()
        self.attn = CausalSelfAttention(cfg) if layer != NO_ATTENTION_LAYER else None
        self.mlp = MLP(cfg.n_embd)
        self.lambdas = nn.Parameter(torch.tensor([1.0, 0.0]))  # mix of the stream and the embeddings x0

    def forward(self, x: Tensor, ve: Tensor | None, x0: Tensor, mask) -> Tensor:
        x = self.lambdas[0] * x + self.lambdas[1] * x0
        if self.attn is not None:
            x = x + self.attn(norm(x), ve, mask)
        return x + self.mlp(norm(x))


class SpeedrunGPT(nn.Module):
    def __init__(self, cfg: SpeedrunConfig):
        super().__init__()
        if cfg.n_layer != LAYERS:
            raise ValueError(f"the record's layer layout is for {LAYERS} layers, got {cfg.n_layer}")
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.value_embeds = nn.ModuleList([nn.Embedding(cfg.vocab_size, cfg.n_embd) for _ in range(3)])
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)])
        dim = cfg.n_embd
        self.lm_head = CastedLinear(dim, next_multiple(cfg.vocab_size, 128), fp8_scales=(dim ** 0.5 / 448, 24 / 448, 1 / 448))
        self.lm_head.weight.detach().zero_()
        self.skip_weights = nn.Parameter(torch.ones(cfg.n_layer // 2))
        # The window in 128-token blocks, set each step by the recipe's schedule. A tensor, so a new value does not
        # make torch.compile trace again.
        self.window_blocks = nn.Buffer(torch.tensor(1, dtype=torch.int32), persistent=False)

    # --- what the trainer asks of a model ------------------------------------------------------------
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6 per weight of the matmuls (embedding lookups are not matmuls) plus attention's
        two products over the keys a token sees: at most the window at its widest (MAX_WINDOW in the long-window
        layers, half in the others) or the sequence, whichever is shorter; documents can only cut it further."""
        matmul = sum(p.numel() for n, p in self.named_parameters() if p.ndim >= 2 and "embed" not in n)
        T = seq_len or self.config.block_size
        keys = sum(min(T, MAX_WINDOW if i in LONG_WINDOW_LAYERS else MAX_WINDOW // 2)
                   for i, b in enumerate(self.blocks) if b.attn is not None)
        return 6 * matmul + 6 * self.config.n_head * self.config.head_dim * keys

    def compute_dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def masks(self, idx: Tensor):
        """(long, short) window masks for a (B, T) batch: FlexAttention's on CUDA for one sequence a multiple of
        128 long (the record's training and validation layout), dense masks otherwise."""
        B, T = idx.shape
        long_w, short_w = self.window_blocks, self.window_blocks // 2
        if idx.is_cuda and B == 1 and T % attention.BLOCK == 0:
            lists = attention.block_lists(idx[0])
            return attention.flex_block_mask(lists, long_w), attention.flex_block_mask(lists, short_w)
        return (torch.stack([attention.dense_mask(row, long_w) for row in idx]),
                torch.stack([attention.dense_mask(row, short_w) for row in idx]))

    def forward(self, idx: Tensor, targets: Tensor | None = None):
        ve = [emb(idx) for emb in self.value_embeds]
        ve = ve + [None] * (len(self.blocks) - 6) + ve  # layers 0-2 and the last three: the 012 ... 012 layout
        long_mask, short_mask = self.masks(idx)
        x = x0 = norm(self.embed(idx))
        skips, n = [], len(self.skip_weights)
        for i, block in enumerate(self.blocks):
            if i >= n:
                x = x + self.skip_weights[i - n] * skips.pop()
            x = block(x, ve[i], x0, long_mask if i in LONG_WINDOW_LAYERS else short_mask)
            if i < n:
                skips.append(x)
        x = norm(x)
        logits = self.lm_head(x).float()
        logits = 30 * torch.sigmoid(logits / (7.5 * x.size(-1) ** 0.5))  # soft cap in (0, 30): tanh shifted by +15
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return None, loss

    def generate(self, idx: Tensor, max_new_tokens: int, top_k: int = 50, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> Tensor:
        return generate(self, idx, max_new_tokens, top_k, temperature, generator)
