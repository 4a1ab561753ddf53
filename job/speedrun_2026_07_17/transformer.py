"""The record's model: 11 blocks of width 768 (6 heads of 128), with the speedrun's additions, parameter for parameter.

What a forward does, in order (the record's layer numbers, 0-10):

- Embeddings. The token embedding (tied to the output layer until the optimizer splits them), smeared one position
  forward through a learned gate, RMS-normed: x0. A bigram embedding (192 wide) of a hash of (previous token,
  token), each row multiplied by a fixed random ±1 pattern picked by (previous XOR token) mod 8192, is added to x0's
  first 192 dimensions, then again after every attention layer with a learned weight. Five value embeddings are
  added to the values of layers 1, 2, 8, 9 and 10 through per-head gates.
- Blocks. Each is attention then a ReLU² MLP, each scaled residual: x = r x + p f(norm(x)) (+ w x0 after attention).
  Layer 6 has no attention: it adds x3 (the stream after layer 3) through a gate instead. Layers 8-10 attend from
  the stream after layer 7, not from their own input. Layers 0, 2, 5 and 9 pair their heads (two heads read as one
  sequence of twice the length, each token's first head before its second). Layers 3 and 10 use the long window
  and shift the keys' non-rotating half one position forward; the others use the short window. Gated XSA removes a
  learned fraction of each head's output along its value in layers 1, 3, 4, 7, 8 and 10.
- MUDD (dynamic dense connections): a small MLP of the stream gives per-token coefficients at the start of layer 10
  (its values, its residual mix, its value-embedding gate and lambdas) and after the last layer (a mix of the
  streams after the embeddings and layers 3, 7, 9 and of the first value embedding).
- Output. RMS norm, the output layer (FP8 in training), logits soft-capped to 23 sigmoid((z + 5) / 7.5). Training
  returns each position's multi-token loss (mtp_weights[k] times the loss of predicting the token k + 1 ahead);
  evaluation the next-token cross-entropy.

The matrices live in banks (qk_bank, vo_bank, mlp_bank, gate banks) shaped for the optimizer, padded to a multiple
of the record's 8 GPUs. Names, shapes, dtypes, initialisation and the order of the random draws are the record's,
so a seed gives the record's weights and the record's state dict loads unchanged; each parameter carries the
record's optimizer label (.label) and the banks their optimizer shape (.reshape).

Precision is the record's: the matrices and embeddings are bf16, the lambdas float32; the MLPs multiply in FP8 in
training (kernels.ReLUSquareMLP) with the scales that quantize_mlp_fp8 refreshes after each optimizer step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from job.speedrun_2026_07_17 import kernels, varlen
from job.speedrun_2026_07_17.rotary import Yarn

LAYERS = 11
NO_ATTENTION_LAYER = 6
PAIRED_HEAD_LAYERS = (0, 2, 5, 9)
LONG_WINDOW_LAYERS = (3, 10)
XSA_LAYERS = (1, 3, 4, 7, 8, 10)
CACHE_LAYERS = (3, 7)  # streams kept for layer 6's skip, layers 8-10's attention input and MUDD
VALUE_EMBED_LAYERS = (1, 2, 8, 9, 10)  # value embedding k goes to the k-th of these
GATE_DIM = 12  # the gates read the first 12 dimensions
MUDD_DIM, MUDD_COEFS, MUDD_SCALE = 64, 14, 0.1
MLP_ACT_HEADROOM = 1.80  # the activations' FP8 scale: last forward's amax * 1.80 / 448
BF16_PARAMS = ("attn_gate_bank", "ve_gate_bank", "qk_bank", "vo_bank", "mlp_bank", "mudd_w1", "mudd_w2", "mudd_b2")


def next_multiple(v: int, n: int) -> int:
    return math.ceil(v / n) * n


def norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


@dataclass
class GPTConfig:
    vocab_size: int = 50257  # padded to a multiple of 128 (50304)
    num_layers: int = LAYERS
    num_heads: int = 6
    head_dim: int = 128
    model_dim: int = 768
    max_seq_len: int = 4 * 64 * 1024  # the longest sequence (the rotary tables cover twice it): validation's
    bigram_vocab_size: int = 50304 * 15
    bigram_dim: int = 192
    bigram_sign_rows: int = 8192
    shard_multiple: int = 8  # the banks are padded for this many GPUs (the record's 8; any divisor shares them)
    grad_scale: float = 1.0  # what the trainer multiplies the summed loss by: the output layer's e5m2 gradient scale follows it
    fp8: bool = True  # the MLPs in FP8 when training (the record's default; its DISABLE_FP8 turns it off)

    @property
    def block_size(self) -> int:
        """The longest sequence the model takes (paired heads read twice its positions, which the tables cover)."""
        return self.max_seq_len


@dataclass
class ForwardSchedule:
    """What the training schedule sets for a forward: the multi-token weights (1 to 3 of them), the two windows in
    tokens, the longest document in a training batch."""

    mtp_weights: Tensor
    ws_short: int
    ws_long: int
    train_max_seq_len: int


def _amax_scales(w: Tensor) -> Tensor:
    """Per layer of w (layers, ...): its amax / 448, computed in w's dtype (bf16), as the record computes them."""
    return w.reshape(w.size(0), -1).abs().amax(dim=1).clamp(min=1e-12) / kernels.E4M3_MAX


def layer_windows(ws_short: int, ws_long: int) -> list[int | None]:
    """Each layer's window in tokens (None: no attention)."""
    return [None if i == NO_ATTENTION_LAYER else ws_long if i in LONG_WINDOW_LAYERS else ws_short for i in range(LAYERS)]


class CastedLinearT(nn.Module):
    """A bias-free linear whose bf16 weight is stored transposed, (in_features, out_features); x @ weight, in FP8
    (fixed scales x_s, w_s, and grad_s for the gradient) when training with use_fp8, else in x's dtype."""

    def __init__(self, in_features: int, out_features: int, use_fp8: bool = False, x_s: float = 1.0, w_s: float = 1.0, grad_s: float = 1.0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.use_fp8, self.x_s, self.w_s, self.grad_s = use_fp8, x_s, w_s, grad_s
        self.weight = nn.Parameter(torch.zeros(in_features, out_features, dtype=torch.bfloat16))

    def forward(self, x: Tensor) -> Tensor:
        if self.use_fp8 and self.training:
            out = kernels.FP8LinearT.apply(x.flatten(0, -2), self.weight, self.x_s, self.w_s, self.grad_s)
            return out.reshape(*x.shape[:-1], -1)
        return x @ self.weight.type_as(x)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.num_layers != LAYERS:
            raise ValueError(f"the record's layer layout is for {LAYERS} layers, got {cfg.num_layers}")
        if cfg.num_heads * cfg.head_dim != cfg.model_dim or cfg.num_heads % 2:
            raise ValueError(f"need an even number of heads and heads * head_dim == model_dim, got {cfg}")
        self.config = cfg
        self.num_layers, self.num_heads, self.head_dim = cfg.num_layers, cfg.num_heads, cfg.head_dim
        self.vocab_size = next_multiple(cfg.vocab_size, 128)
        dim = cfg.model_dim
        self.lm_head = CastedLinearT(dim, self.vocab_size, use_fp8=cfg.fp8, x_s=100 / 448, w_s=1.6 / 448, grad_s=cfg.grad_scale * 0.75 / 448)
        nn.init.normal_(self.lm_head.weight, mean=0, std=0.005)
        self.embed = nn.Embedding(self.vocab_size, dim)  # its own init is drawn (the record's draws), then replaced
        with torch.no_grad():
            self.embed.weight.copy_(self.lm_head.weight.T)  # tied at the start
        self._init_attention(cfg)
        self._init_mlp(cfg)
        self._init_misc(cfg)
        self._init_mudd(cfg)
        with torch.no_grad():  # the record's dtypes: bf16 matrices and embeddings, float32 lambdas
            for m in self.modules():
                if isinstance(m, nn.Embedding | nn.Linear):
                    m.weight.data = m.weight.data.bfloat16()
            for name in BF16_PARAMS:
                getattr(self, name).data = getattr(self, name).data.bfloat16()
        for name, p in self.named_parameters():
            p.label = name.replace(".weight", "")  # the optimizer's key for the parameter

    def _init_attention(self, cfg: GPTConfig) -> None:
        H, hd, dim = cfg.num_heads, cfg.head_dim, cfg.model_dim
        self.yarn = Yarn(hd, cfg.max_seq_len)
        self.yarn_paired_head = Yarn(hd, cfg.max_seq_len, paired=True)
        self.value_embeds = nn.Parameter(0.01 * torch.randn(5 * self.vocab_size, dim, dtype=torch.bfloat16))
        attn_layers = LAYERS - 1
        self.attn_gate_bank = nn.Parameter(torch.zeros(attn_layers, H, GATE_DIM))
        self.ve_gate_bank = nn.Parameter(torch.zeros(len(VALUE_EMBED_LAYERS), H, GATE_DIM))
        # Q and K: one matrix per pair of heads (2 * hd rows) for each of q and k, each orthogonalised on its own.
        self._num_qk_groups = attn_layers * 2 * (H // 2)
        qk = next_multiple(self._num_qk_groups, cfg.shard_multiple)
        self.qk_bank = nn.Parameter(torch.empty(qk, 2 * hd, dim))
        self.qk_bank.reshape = (qk, 2 * hd, dim)
        vo = next_multiple(attn_layers * 2, cfg.shard_multiple)  # V and O of each layer
        self.vo_bank = nn.Parameter(torch.empty(vo, dim, dim))
        self.vo_bank.reshape = (vo, dim, dim)
        bound = 3**0.5 * 0.5 * dim**-0.5  # uniform with std 0.5 / sqrt(dim)
        with torch.no_grad():
            self.qk_bank[: self._num_qk_groups].uniform_(-bound, bound)
            self.qk_bank[self._num_qk_groups :].zero_()
            self.vo_bank[: attn_layers * 2].uniform_(-bound, bound)
            self.vo_bank[attn_layers * 2 :].zero_()

    def _init_mlp(self, cfg: GPTConfig) -> None:
        dim = cfg.model_dim
        layers = next_multiple(2 * LAYERS, cfg.shard_multiple) // 2  # padded with whole unused layers (the 12th)
        self.mlp_bank = nn.Parameter(torch.empty(layers, 2, 4 * dim, dim))  # [:, 0] up (c_fc), [:, 1] down (c_proj)
        self.mlp_bank.reshape = (2 * layers, 4 * dim, dim)
        bound = 3**0.5 * 0.5 * dim**-0.5
        with torch.no_grad():
            self.mlp_bank[:, 0].uniform_(-bound, bound)
            self.mlp_bank[:, 1].zero_()
        # FP8 scales of the down projections: the activations' (from the last forward), the weights' used and next.
        self.register_buffer("_mlp_down_act_scales", torch.ones(layers, dtype=torch.float32))
        self.register_buffer("_mlp_down_proj_scales", torch.ones(layers, dtype=torch.float32))
        self.register_buffer("_mlp_down_proj_next_scales", torch.ones(layers, dtype=torch.float32))

    def _init_misc(self, cfg: GPTConfig) -> None:
        L = LAYERS
        self.smear_gate = nn.Linear(GATE_DIM, 1, bias=False)
        nn.init.zeros_(self.smear_gate.weight)
        self.skip_gate = nn.Linear(GATE_DIM, 1, bias=False)
        nn.init.zeros_(self.skip_gate.weight)
        self.bigram_embed = nn.Embedding(cfg.bigram_vocab_size, cfg.bigram_dim)
        nn.init.zeros_(self.bigram_embed.weight)
        signs = torch.randn(cfg.bigram_sign_rows, cfg.bigram_dim).sign().to(torch.bfloat16)
        self.register_buffer("bigram_sign_table", signs)
        self.post_lambdas = nn.Parameter(torch.ones(L, 2))  # [:, 0] attention output, [:, 1] MLP output
        self.x0_lambdas = nn.Parameter(torch.zeros(L))
        self.bigram_lambdas = nn.Parameter(0.05 * torch.ones(L))
        self.resid_lambdas = nn.Parameter(torch.full((L, 2), 1.1**0.5))  # the stream, before attention and MLP
        self.xsa_alphas = nn.Parameter(torch.zeros(L, cfg.num_heads))
        pad = (-L * 2 - 2) % cfg.shard_multiple
        sa_lambdas = [torch.tensor([0.5, 1.0]) for _ in range(L)]  # scales of each layer's QKV and O weights
        smear_lambda, skip_lambda = torch.zeros(1), -1.5 * torch.ones(1)
        self.scalars = nn.Parameter(torch.cat([*sa_lambdas, smear_lambda, skip_lambda, torch.ones(pad)]))

    def _init_mudd(self, cfg: GPTConfig) -> None:
        self.mudd_w1 = nn.Parameter(torch.empty(2, MUDD_DIM, cfg.model_dim))
        for j in range(2):
            nn.init.kaiming_uniform_(self.mudd_w1.data[j], a=math.sqrt(5))
        self.mudd_w2 = nn.Parameter(torch.zeros(2, MUDD_COEFS, MUDD_DIM))
        # Biases in units of MUDD_SCALE, set so layer 10's dynamic lambdas start at the other layers' values.
        b = torch.zeros(2, MUDD_COEFS)
        b[0, 6] = b[0, 7] = 2.0 / MUDD_SCALE  # the value-embedding gate (2 sigmoid(0) elsewhere)
        b[0, 8] = b[0, 12] = 1.1**0.5 / MUDD_SCALE  # resid lambdas before attention and MLP
        b[0, 9] = b[0, 13] = 1.0 / MUDD_SCALE  # post lambdas
        b[0, 11] = 0.05 / MUDD_SCALE  # bigram lambda
        b[1, 1] = -0.5 / MUDD_SCALE  # after the last layer: minus half the stream after layer 7
        self.mudd_b2 = nn.Parameter(b)

    # --- the schedule's hooks -----------------------------------------------------------------------------------
    def reset_rotary(self) -> None:
        self.yarn.reset()
        self.yarn_paired_head.reset()

    def rescale_rotary(self, old_window: int, new_window: int) -> None:
        """The long window grew from old_window to new_window tokens (YaRN; both rotary tables)."""
        self.yarn.rescale(old_window, new_window)
        self.yarn_paired_head.rescale(old_window, new_window)

    @torch.no_grad()
    def quantize_mlp_fp8(self, bootstrap_down: bool = False) -> None:
        """The MLPs' FP8 copies, after every optimizer step (and before the first forward): each up projection with
        its own amax; the down projections with the scale measured at the previous call (delayed), or with their own
        amax when bootstrap_down (the record's first 16 steps)."""
        up, down = self.mlp_bank[:, 0], self.mlp_bank[:, 1]
        layers = up.size(0)
        if not hasattr(self, "_mlp_up_proj_f8"):  # made once and updated in place (a compiled forward reads them)
            self._mlp_up_proj_f8 = torch.zeros_like(up, dtype=kernels.E4M3)
            self._mlp_up_proj_scales = torch.ones(layers, dtype=torch.float32, device=up.device)
            storage = torch.empty(layers, down.size(2), down.size(1), dtype=kernels.E4M3, device=up.device)
            self._mlp_down_proj_f8 = storage.transpose(1, 2)  # (layers, hidden, dim), column-major
        up_scales = _amax_scales(up)
        self._mlp_up_proj_scales.copy_(up_scales.float())
        self._mlp_up_proj_f8.copy_((up / up_scales.view(-1, 1, 1)).to(kernels.E4M3))
        if bootstrap_down:
            self._mlp_down_proj_next_scales.copy_(_amax_scales(down).float())
        down8 = kernels.quantize_down_weights(down, self._mlp_down_proj_next_scales, self._mlp_down_proj_scales)
        self._mlp_down_proj_f8.copy_(down8.transpose(1, 2))

    # --- forward ----------------------------------------------------------------------------------------------
    def forward(self, input_seq: Tensor, target_seq: Tensor, seqlens: Tensor, bigram_input_seq: Tensor, schedule: ForwardSchedule) -> Tensor:
        """Per-position losses (float32) of one packed sequence: input_seq (T,) token ids, target_seq (T,) the next
        tokens, seqlens the documents' cumulative lengths (0 first, padded with T), bigram_input_seq
        bos_loader.bigram_hash(input_seq). Training: the multi-token losses; evaluation: the next-token cross-entropy."""
        x = self.trunk(input_seq, seqlens, bigram_input_seq, schedule)
        head = self.lm_head
        if self.training:
            weights = schedule.mtp_weights
            if weights is None:
                weights = torch.ones(1, device=x.device)
            return kernels.SoftcappedCrossEntropy.apply(x.view(-1, x.size(-1)), target_seq, weights, head.weight, head.x_s, head.w_s, head.grad_s)
        logits = self.logits(x).float()
        return F.cross_entropy(logits.view(-1, logits.size(-1)), target_seq, reduction="none")

    def logits(self, x: Tensor) -> Tensor:
        """The soft-capped logits of the trunk's output, in bf16 (evaluation's path)."""
        return 23 * torch.sigmoid((self.lm_head(x) + 5) / 7.5)

    def trunk(self, input_seq: Tensor, seqlens: Tensor, bigram_input_seq: Tensor, schedule: ForwardSchedule) -> Tensor:
        """Everything before the output layer: the normed final stream, (1, T, dim)."""
        if input_seq.ndim != 1:
            raise ValueError(f"the model takes one packed sequence (T,), got {tuple(input_seq.shape)}")
        p = self._unbound()
        x, x0_bigram, ve = self._embed(input_seq, bigram_input_seq, p)
        run = _Run(self, p, seqlens, schedule, x0_bigram, ve, x)
        for i in range(LAYERS):
            x = run.layer(i, x)
        if run.amaxes:
            with torch.no_grad():
                self._mlp_down_act_scales[:LAYERS].copy_(kernels.activation_scales(torch.stack(run.amaxes), MLP_ACT_HEADROOM))
        mu = self.mudd(x, 1, 5)
        cache = run.cache
        ve_bank0 = ve[1][None].to(dtype=x.dtype)
        x = x + mu[0] * cache[0] + mu[1] * cache[7] + mu[2] * cache[9] + mu[3] * ve_bank0 + mu[4] * cache[3]
        return norm(x)

    def mudd(self, x: Tensor, block: int, n: int) -> tuple[Tensor, ...]:
        """n per-token coefficients from MUDD block 0 (start of layer 10) or 1 (after the last layer)."""
        h = F.gelu(F.linear(x, self.mudd_w1[block]))
        return ((F.linear(h, self.mudd_w2[block, :n]) + self.mudd_b2[block, :n]) * MUDD_SCALE).split(1, dim=-1)

    def _unbound(self) -> dict:
        """The forward's per-layer views of the parameters."""
        L = LAYERS
        ag, veg = self.attn_gate_bank.unbind(0), self.ve_gate_bank.unbind(0)
        attn_layers = L - 1
        qk = self.qk_bank[: self._num_qk_groups].view(attn_layers, -1, self.qk_bank.size(-1))
        vo = self.vo_bank[: attn_layers * 2].view(attn_layers, 2, *self.vo_bank.shape[1:]).flatten(1, 2)
        mlp = self.mlp_bank.flatten(0, 1).unbind(0)
        xsa = self.xsa_alphas.unbind(0)
        return dict(
            sa_lambdas=self.scalars[: 2 * L].view(-1, 2),
            smear_lambda=self.scalars[2 * L],
            skip_lambda=self.scalars[2 * L + 1],
            resid_attn=self.resid_lambdas[:, 0].bfloat16().unbind(0),
            resid_mlp=self.resid_lambdas[:, 1].bfloat16().unbind(0),
            post_attn=self.post_lambdas[:, 0].bfloat16().unbind(0),
            post_mlp=self.post_lambdas[:, 1].bfloat16().unbind(0),
            x0_lambdas=self.x0_lambdas.bfloat16().unbind(0),
            bigram_lambdas=self.bigram_lambdas.bfloat16().unbind(0),
            attn_gates=[*ag[:NO_ATTENTION_LAYER], None, *ag[NO_ATTENTION_LAYER:]],
            ve_gates={layer: veg[j] for j, layer in enumerate(VALUE_EMBED_LAYERS)},
            xsa_alphas=[xsa[i] if i in XSA_LAYERS else None for i in range(L)],
            attn_weights=torch.cat([qk, vo], dim=1).unbind(0),  # per attention layer: Q, K, V, O stacked
            mlp_up=mlp[0::2],
            mlp_down=mlp[1::2],
        )

    def _embed(self, input_seq: Tensor, bigram_input_seq: Tensor, p: dict) -> tuple[Tensor, Tensor, dict]:
        """(x, the bigram embedding (1, T, bigram_dim), {layer: value embedding (T, dim)}). x is also x0: the bigram
        injection before layer 0 is part of what every layer mixes back in."""
        x = self.embed(input_seq)
        sign_idx = torch.zeros_like(input_seq)
        sign_idx[1:] = (input_seq[:-1] ^ input_seq[1:]) % self.bigram_sign_table.size(0)
        x0_bigram = (self.bigram_embed(bigram_input_seq) * self.bigram_sign_table[sign_idx])[None]
        values = self.value_embeds.view(5, self.vocab_size, -1)[:, input_seq]
        ve = {layer: values[j] for j, layer in enumerate(VALUE_EMBED_LAYERS)}
        # Smear: each position takes a gated share of the previous token's embedding.
        smear = p["smear_lambda"] * torch.sigmoid(self.smear_gate(x[1:, :GATE_DIM]))
        x = torch.cat([x[:1], x[1:] + smear * x[:-1]])
        x = norm(x[None])
        bd = self.bigram_embed.embedding_dim
        x[..., :bd] = x[..., :bd] + x0_bigram * p["bigram_lambdas"][0]  # in place: x0 is this x, bigram included
        return x, x0_bigram, ve


class _Run:
    """One forward's state across the layers: the kept streams (cache), the injections, the FP8 amaxes."""

    def __init__(self, model: GPT, p: dict, seqlens: Tensor, schedule: ForwardSchedule, x0_bigram: Tensor, ve: dict, x0: Tensor):
        self.m, self.p, self.seqlens, self.ve, self.x0_bigram = model, p, seqlens, ve, x0_bigram
        self.windows = layer_windows(schedule.ws_short, schedule.ws_long)
        self.key_offset = [w == schedule.ws_long for w in self.windows]  # the long-window layers shift their keys
        self.fp8 = model.training and model.config.fp8
        if self.fp8 and not hasattr(model, "_mlp_up_proj_f8"):
            raise RuntimeError("FP8 training needs the MLPs' FP8 copies: call model.quantize_mlp_fp8(bootstrap_down=True) first")
        self.x0_inject = [x0 * p["x0_lambdas"][i] for i in range(LAYERS)]
        self.bg_inject = [None] + [x0_bigram * p["bigram_lambdas"][i] for i in range(1, LAYERS)]
        skip_gate = torch.sigmoid(model.skip_gate(x0[..., :GATE_DIM]))
        self.skip_gate_out = torch.sigmoid(p["skip_lambda"]) * 2 * skip_gate
        self.cache = {0: x0}
        self.amaxes: list[Tensor] = []

    def layer(self, i: int, x: Tensor) -> Tensor:
        mu = None
        if i == NO_ATTENTION_LAYER:
            x = x + self.skip_gate_out * self.cache[3]
        else:
            x, mu = self.attention(i, x)
        normed = norm(x)
        mlp_out = self.mlp(i, normed)
        if mu is not None:
            x = mu[12] * x + mu[13] * mlp_out
        else:
            x = self.p["resid_mlp"][i] * x + self.p["post_mlp"][i] * mlp_out
        if i in CACHE_LAYERS:
            self.cache[i] = x
        return x

    def attention(self, i: int, x: Tensor) -> tuple[Tensor, tuple | None]:
        m, p, cache = self.m, self.p, self.cache
        attn_in = norm(cache.get(7, x))  # layers 8-10 attend from the stream after layer 7
        B, T = attn_in.shape[:2]
        H, hd = m.num_heads, m.head_dim
        mu = None
        if i == LAYERS - 1:
            cache[9] = x
            mu = m.mudd(x, 0, MUDD_COEFS)
            v_mudd = (mu[0] * cache[0] + mu[1] * cache[7] + mu[2] * x).view(B, T, H, hd)
            x = (1 + mu[5]) * x + mu[3] * cache[0] + mu[4] * cache[7]
            ve_gate = torch.cat([mu[6], mu[7]], dim=-1).repeat_interleave(H // 2, dim=-1).unsqueeze(-1)
            aux_v = (ve_gate * self.ve[i].view(B, T, H, hd) + v_mudd).view(B, T, -1)
        elif i in self.ve:
            # The value embedding's per-head gate reads the input's and the embedding's first six dimensions.
            gate_in = torch.cat([attn_in[..., :6], self.ve[i][None, ..., :6]], dim=-1)
            gate = 2 * torch.sigmoid(F.linear(gate_in, p["ve_gates"][i])).view(B, T, H, 1)
            aux_v = (gate * self.ve[i].view(B, T, H, hd)).view(B, T, -1)
        else:
            aux_v = None
        yarn = m.yarn_paired_head if i in PAIRED_HEAD_LAYERS else m.yarn
        out = attention(
            attn_in,
            p["attn_weights"][i - (i > NO_ATTENTION_LAYER)],
            p["sa_lambdas"][i],
            yarn,
            paired=i in PAIRED_HEAD_LAYERS,
            window=self.windows[i],
            key_offset=self.key_offset[i],
            gate_w=p["attn_gates"][i],
            aux_v=aux_v,
            xsa_alpha=p["xsa_alphas"][i],
            seqlens=self.seqlens,
            num_heads=H,
        )
        bd = self.x0_bigram.size(-1)
        if mu is not None:
            x = mu[8] * x + mu[9] * out + mu[10] * cache[0]
            x[..., :bd] = x[..., :bd] + mu[11] * self.x0_bigram
        else:
            x = p["resid_attn"][i] * x + p["post_attn"][i] * out + self.x0_inject[i]
            if self.bg_inject[i] is not None:
                x[..., :bd] = x[..., :bd] + self.bg_inject[i]
        return x, mu

    def mlp(self, i: int, normed: Tensor) -> Tensor:
        m = self.m
        fp8 = None
        if self.fp8:
            amax = normed.detach().abs().max().clamp(min=1e-12)
            fp8 = kernels.MLPFP8(
                x8=(normed.detach() * (kernels.E4M3_MAX / amax)).to(kernels.E4M3),
                w_up8=m._mlp_up_proj_f8[i],
                dequant=m._mlp_up_proj_scales[i : i + 1] * amax / kernels.E4M3_MAX,
                w_down8=m._mlp_down_proj_f8[i],
                w_down_scale=m._mlp_down_proj_scales[i : i + 1],
                act_scale=m._mlp_down_act_scales[i : i + 1],
            )
        out, amax = kernels.ReLUSquareMLP.apply(normed, self.p["mlp_up"][i], self.p["mlp_down"][i], fp8)
        if self.fp8:
            self.amaxes.append(amax)
        return out


def attention(
    x: Tensor,
    qkvo_w: Tensor,
    sa_lambdas: Tensor,
    yarn: Yarn,
    *,
    paired: bool,
    window: int,
    key_offset: bool,
    gate_w: Tensor,
    aux_v: Tensor | None,
    xsa_alpha: Tensor | None,
    seqlens: Tensor,
    num_heads: int,
) -> Tensor:
    """One attention layer on x (1, T, dim) (normed) with its stacked Q, K, V, O weights (4 dim, dim)."""
    B, T, dim = x.shape
    H, hd = num_heads, dim // num_heads
    q, k, v = F.linear(x, sa_lambdas[0] * qkvo_w[: dim * 3].type_as(x)).view(B, T, 3 * H, hd).chunk(3, dim=-2)
    q, k = norm(q), norm(k)
    if not paired:
        q, k = yarn.rotary(q), yarn.rotary(k)
        if key_offset:  # each key's non-rotating half comes from the previous position: a one-layer induction head
            half = hd // 2
            k = torch.cat([k[..., :half], torch.cat([k[:, :1, :, half:], k[:, :-1, :, half:]], dim=1)], dim=-1)
    else:
        # Heads 2h and 2h + 1 of token t become positions 2t and 2t + 1 of one head in a sequence twice as long, so
        # each pair attends across its two heads; the window counts in that sequence's positions.
        q, k = q.view(B, T, H // 2, 2 * hd), k.view(B, T, H // 2, 2 * hd)
        v = v.reshape(B, T * 2, H // 2, hd)
        q, k = yarn.rotary(q), yarn.rotary(k)
        q, k = q.view(B, T * 2, H // 2, hd), k.view(B, T * 2, H // 2, hd)
        seqlens = 2 * seqlens
    if aux_v is not None:
        v = v + aux_v.view_as(v)
    y = varlen.varlen_attention(q[0], k[0], v[0], seqlens, window, yarn.attn_scale).view(B, T, H, hd)
    if xsa_alpha is not None and not paired:
        # Gated XSA: remove tanh(alpha) of each head's output along its (normalised) value.
        vn = F.normalize(v, dim=-1, eps=1e-4)
        proj = (y * vn).sum(-1, keepdim=True)
        y = y - torch.tanh(xsa_alpha).type_as(y).view(1, 1, H, 1) * proj * vn
    y = y * torch.sigmoid(F.linear(x[..., :GATE_DIM], gate_w)).view(B, T, H, 1)
    y = y.contiguous().view(B, T, H * hd)
    return F.linear(y, sa_lambdas[1] * qkvo_w[dim * 3 :].type_as(y))
