"""GPT-2, exactly: the model of OpenAI's GPT-2 paper and code, written as in karpathy's nanoGPT.

Parameter names follow the GPT-2 / Hugging Face layout (transformer.wte, transformer.h.N.attn.c_attn,
..., lm_head) so weights convert both ways; HF stores Linear weights as Conv1D (transposed), which
`from_hf_state_dict` / `to_hf_state_dict` undo.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from job.gpt_config import GPT2_VOCAB, MODEL_PRESETS, PADDED_VOCAB, GPTConfig  # noqa: F401 (re-exported)

# Which attention kernel SDPA tries first. "auto" is torch's own order: FlashAttention-2 first on CUDA, except on
# H100/H200 (sm90) and B200 (sm100) with cuDNN newer than 9.15 (the torch >= 2.11 CUDA wheels), where torch puts
# cuDNN's fused attention first. The others put one backend first and keep the rest behind it, so inputs it cannot
# serve (a shape, a dtype, a CPU) still fall back instead of failing: "flash" is the way back to FlashAttention-2 on
# Hopper (cuDNN's attention backward has had NaN bugs at some shapes), and the A/B the benchmark runs against auto.
SDPA_BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def sdpa_priority(name: str) -> list[SDPBackend] | None:
    """The backend order for a --sdpa-backend choice (None: leave torch's order alone)."""
    if name == "auto":
        return None
    first = SDPA_BACKENDS[name]
    if first == SDPBackend.MATH:
        # The reference kernel, always able to run: alone, since the CPU picks by what is enabled, not by order.
        return [first]
    return [first] + [b for b in SDPA_BACKENDS.values() if b != first]


def settle_sdpa_order(device: torch.device) -> None:
    """Make torch choose its own attention order now, before any sdpa_kernel(set_priority=True) context runs.

    On a GPU torch fixes its default order lazily, at the first attention call of the process (cuDNN first on
    Hopper/Blackwell with a recent cuDNN, FlashAttention-2 first elsewhere). A priority context entered before
    that call saves the order from before that choice (FlashAttention first) and puts it back on exit; from then
    on the process never runs torch's own choice again (a run with "auto" after one with "flash" in the same process
    would run FlashAttention-2, the slower kernel there). One tiny call first makes the order every context saves
    and restores torch's own."""
    if device.type != "cuda":
        return  # the CPU picks by what is enabled, with no lazy default
    q = torch.zeros(1, 1, 8, 64, device=device, dtype=torch.bfloat16)
    F.scaled_dot_product_attention(q, q, q, is_causal=True)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE = True
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.sdpa_order: list[SDPBackend] | None = None  # set by GPT.set_sdpa_backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, nh, T, hs): heads become a batch dimension
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        # A fused attention kernel on GPU (cuDNN or FlashAttention): never materialises the (T, T) matrix.
        if self.sdpa_order is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # Inside forward (not a global switch) so torch.compile records the choice in the graph it traces
            # and caches: a cached graph of another backend can never be reused by mistake. (Compiled, Inductor may
            # still fuse the math kernel's matmul-softmax-matmul back into a fused kernel; bench --profile shows
            # which kernels ran.)
            with sdpa_kernel(self.sdpa_order, set_priority=True):
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 used the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pre-LayerNorm: the residual stream itself is never normalised, which keeps gradients clean.
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),  # learned positions, as GPT-2
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Rows per chunk of the chunked cross-entropy (0: plain F.cross_entropy over the full logits). A training
        # choice, not architecture: it is not in GPTConfig, so checkpoints do not depend on it.
        self.ce_chunk_tokens = 0
        # Under autocast the residual stream stays fp32 (the embeddings are fp32 and each add promotes the bf16
        # branch output), as in build-nanogpt. A dtype here (bf16) casts it once after the embeddings instead, which
        # halves the memory traffic of every residual add and layer norm; training choice, like ce_chunk_tokens.
        self.residual_dtype: torch.dtype | None = None
        # Weight tying (as GPT-2): the output projection is the token embedding; saves 38M params at 124M.
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)

    def set_sdpa_backend(self, name: str) -> None:
        """Prefer one attention kernel (see SDPA_BACKENDS); like ce_chunk_tokens, not part of the checkpoint.
        Call it after the model is on its device."""
        order = sdpa_priority(name)
        settle_sdpa_order(self.lm_head.weight.device)
        for block in self.transformer.h:
            block.attn.sdpa_order = order

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "RESIDUAL_SCALE", False):
                # Each block adds two projections to the residual stream; scale so its variance
                # does not grow with depth (GPT-2 paper, section 2.3).
                std *= (2 * self.config.n_layer) ** -0.5
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weight counted once
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6N for the matmuls with weights + the attention term (PaLM, app. B)."""
        cfg = self.config
        T = seq_len or cfg.block_size
        N = self.num_params() - self.transformer.wpe.weight.numel()
        return 6 * N + 12 * cfg.n_layer * cfg.n_embd * T

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} exceeds block size {self.config.block_size}")
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        if self.residual_dtype is not None and torch.is_autocast_enabled(x.device.type):
            x = x.to(self.residual_dtype)  # only under autocast: its layer norms take any input dtype, plain ones do not
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is not None and self.ce_chunk_tokens:
            # The loss without the (B*T, vocab) logits: returned logits are None on this path.
            return None, chunked_cross_entropy(x.view(B * T, -1), self.lm_head.weight, targets.reshape(-1), self.ce_chunk_tokens)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            # Padded vocabulary rows are never targets, so training pushes their logits down on its own.
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def generate(self, idx: torch.Tensor, max_new_tokens: int, top_k: int = 50, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        return generate(self, idx, max_new_tokens, top_k, temperature, generator)


@torch.no_grad()
def generate(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, top_k: int = 50, temperature: float = 1.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Top-k sampling from any of the recipes' models: `model(idx)` gives (logits (B, T, vocab), _) for the last
    `model.config.block_size` tokens at most. Padded vocabulary entries are cut off before sampling, so they can never
    be drawn."""
    for _ in range(max_new_tokens):
        ctx = idx[:, -model.config.block_size :]
        logits, _ = model(ctx)
        logits = logits[:, -1, :GPT2_VOCAB].float() / max(temperature, 1e-8)
        probs = F.softmax(logits, dim=-1)
        topk_probs, topk_idx = torch.topk(probs, min(top_k, probs.size(-1)), dim=-1)
        choice = torch.multinomial(topk_probs, 1, generator=generator)
        idx = torch.cat((idx, torch.gather(topk_idx, -1, choice)), dim=1)
    return idx


# --- chunked cross-entropy ------------------------------------------------------------------------
class _ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `h @ weight.T` against `targets`, `chunk` rows at a time.

    The full logits of a GPT-2 batch are big: 64 x 1024 rows x 50304 columns is 6.6 GB in bf16, and the loss
    and its gradient want fp32 copies on top. Here each chunk's logits live only inside the loop, and the
    gradients (softmax - onehot, pushed through the two matmuls autograd would run anyway) are computed there
    too, so the backward pass only scales them: no logits are kept and no matmul is recomputed.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk: int):
        n = h.size(0)
        acc = torch.promote_types(weight.dtype, torch.float32)  # softmax and sums in fp32 at least
        loss = torch.zeros((), dtype=acc, device=h.device)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        w_mm = None  # the weight in the matmuls' dtype (bf16 under autocast), cast once rather than per chunk
        compiling = torch.compiler.is_compiling()
        cols = torch.arange(weight.size(0), device=h.device) if compiling else None
        for start in range(0, n, chunk):
            hc, tc = h[start : start + chunk], targets[start : start + chunk, None]
            logits = hc @ (weight if w_mm is None else w_mm).t()  # under autocast a bf16 matmul, like the lm_head Linear
            if w_mm is None:
                w_mm = weight.to(logits.dtype)
            lf = logits.to(acc)
            lse = torch.logsumexp(lf, dim=-1, keepdim=True)
            loss = loss + (lse - lf.gather(1, tc)).sum()
            # d(mean loss)/d(logits) = (softmax - onehot) / n, in the logits' dtype as autograd would have it.
            if compiling:
                # One elementwise expression (the onehot as a compare with the target's column), which Inductor
                # compiles into the log-sum-exp's kernel: it reads the logits and writes d once, in bf16. A scatter
                # here would make Inductor write the fp32 softmax and read it back in a second kernel (3x the bytes).
                d = ((lf - lse).exp() - (cols == tc).to(acc)).div(n).to(logits.dtype)
            else:
                # Eager: in place in lf, whose values are not needed any more, so no second fp32 chunk is made.
                d = lf.sub_(lse).exp_()
                d = d.scatter_add_(1, tc, torch.full_like(tc, -1, dtype=d.dtype)).div_(n).to(logits.dtype)
            grad_h[start : start + chunk] = (d @ w_mm).to(h.dtype)
            grad_w += (d.t() @ hc.to(d.dtype)).to(acc)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), (grad_w * grad_out).to(ctx.weight_dtype), None, None


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """F.cross_entropy(h @ weight.T, targets) in chunks of `chunk` rows, never holding all the logits."""
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _ChunkedCrossEntropy.apply(h, weight, targets, chunk)
    # Evaluation: no gradient to prepare, just the chunked sum.
    acc = torch.promote_types(weight.dtype, torch.float32)
    total = torch.zeros((), dtype=acc, device=h.device)
    for start in range(0, h.size(0), chunk):
        logits = (h[start : start + chunk] @ weight.t()).to(acc)
        total = total + F.cross_entropy(logits, targets[start : start + chunk], reduction="sum")
    return total / h.size(0)


# --- Hugging Face conversion ---------------------------------------------------------------------
# HF GPT-2 uses Conv1D modules whose weight is (in, out): these must be transposed for nn.Linear.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_HF_BUFFERS = (".attn.masked_bias", ".attn.bias")  # causal-mask buffers of older transformers versions


def from_hf_state_dict(sd_hf: dict, block_size: int | None = None) -> GPT:
    """Build our GPT from a transformers GPT2LMHeadModel state dict (vocab padded to 50304 on the way)."""
    sd_hf = {k: v for k, v in sd_hf.items() if not k.endswith(_HF_BUFFERS)}
    wte = sd_hf["transformer.wte.weight"]
    n_layer = 1 + max(int(k.split(".")[2]) for k in sd_hf if k.startswith("transformer.h."))
    n_embd = wte.shape[1]
    n_head = _hf_n_head(n_embd)
    if block_size is None:
        block_size = sd_hf["transformer.wpe.weight"].shape[0]
    config = GPTConfig(block_size=block_size, vocab_size=max(PADDED_VOCAB, wte.shape[0]), n_layer=n_layer,
                       n_head=n_head, n_embd=n_embd)
    return load_hf_into(GPT(config), sd_hf)


def _hf_n_head(n_embd: int) -> int:
    for preset in MODEL_PRESETS.values():
        if preset["n_embd"] == n_embd:
            return preset["n_head"]
    raise ValueError(f"cannot infer n_head for n_embd={n_embd}; pass the config explicitly")


def load_hf_into(model: GPT, sd_hf: dict) -> GPT:
    sd = model.state_dict()
    sd_hf = {k: v for k, v in sd_hf.items() if not k.endswith(_HF_BUFFERS)}
    missing = set(sd) - set(sd_hf) - {"lm_head.weight"}
    if missing:
        raise ValueError(f"Hugging Face state dict lacks {sorted(missing)[:3]}")
    with torch.no_grad():
        for k, v in sd_hf.items():
            if k not in sd:
                raise ValueError(f"unexpected key {k} in Hugging Face state dict")
            if k.endswith(_CONV1D):
                v = v.t()
            if k in ("transformer.wte.weight", "lm_head.weight"):
                # Rows beyond GPT-2's 50257 are padding; keep them zero so they never matter.
                sd[k].zero_()
                sd[k][: v.shape[0]].copy_(v)
                continue
            if sd[k].shape[0] < v.shape[0] and k == "transformer.wpe.weight":
                v = v[: sd[k].shape[0]]  # a shorter block size than the checkpoint's: crop positions
            if sd[k].shape != v.shape:
                raise ValueError(f"shape mismatch for {k}: ours {tuple(sd[k].shape)}, HF {tuple(v.shape)}")
            sd[k].copy_(v)
    return model


def to_hf_state_dict(model: GPT) -> dict:
    """Our weights in HF GPT2LMHeadModel layout (vocab cut back to 50257, Conv1D weights transposed)."""
    out = {}
    for k, v in model.state_dict().items():
        v = v.detach()
        if k in ("transformer.wte.weight", "lm_head.weight"):
            v = v[:GPT2_VOCAB]
        elif k.endswith(_CONV1D):
            v = v.t()
        out[k] = v.contiguous().clone()
    return out
