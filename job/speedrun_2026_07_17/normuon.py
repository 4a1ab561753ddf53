"""NorMuon and Adam in one optimizer, as modded-nanogpt's record of 2026-07-17 steps them.

NorMuon (https://arxiv.org/abs/2510.05491) for the blocks' weight banks: Nesterov momentum, orthogonalised by Polar
Express (polar_express.py), then normalised per row (or column) by a running second moment, as Adafactor keeps one,
rescaled to keep the update's norm; a learning rate times sqrt(max(1, rows / cols)), twice that for the MLP's down
projections. Adam, with bias correction, for the embeddings, the output layer, the gates and the scalars. Both decay
weights cautiously: only where the update and the weight have the same sign. NorMuon's bf16 weights keep the 16 bits
that bf16 drops in a second tensor (the "mantissa"), so together they are float32 weights updated in float32.

A parameter is named by a label, and the label's entry in the table says everything about it (ParamConfig): which
optimizer, its multipliers on the learning rate and the weight decay, Adam's betas, and how its gradient travels
between ranks:

- "replicated": all-reduced (the average), and every rank computes the whole update;
- "sharded": reduce-scattered along the first dimension (a bank's matrices, an embedding's rows); each rank updates
  its shard and an all-gather hands every rank the whole parameter;
- "sharded_sparse": sharded, with only the touched rows of an embedding's gradient travelling (sparse_rows.py);
- "none": one process, no collective.

The order is the record's. Reductions are launched in the table's order (the banks first: they are the largest), then
updates are computed in `work_order` (small parameters first, while the banks' reductions are still on the wire), each
sharded update's all-gather launched as soon as it is done. Adam's parameters are updated every other step (the
trainer says which), and their gradients are not cleared in between, so they accumulate over two steps.

The embedding and the output layer are one weight until the trainer unties them: the output layer is stored
transposed (model width x vocabulary), the embedding's gradient is added to its own transposed, and after its update
the embedding is its transpose again. At the untying step the embedding takes the output layer's Adam state,
transposed, and goes its own way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from job.speedrun_2026_07_17 import kernels
from job.speedrun_2026_07_17.polar_express import polar_express
from job.speedrun_2026_07_17.sparse_rows import Reduction, SparseRows

COMMS = ("none", "replicated", "sharded", "sharded_sparse")


@dataclass
class ParamConfig:
    """One parameter's settings, from its table entry; `lr` (and NorMuon's `momentum`) change every step."""

    label: str
    optim: str  # "adam" or "normuon"
    comms: str  # one of COMMS
    lr_mul: float  # NorMuon's includes sqrt(max(1, rows / cols))
    wd_mul: float
    lr: float
    initial_lr: float
    weight_decay: float
    adam_betas: tuple[float, float] | None = None
    eps: float | None = None
    bank_shape: tuple[int, ...] | None = None  # NorMuon: (matrices, rows, cols), the matrices split among the ranks
    chunk: int | None = None  # rows (Adam) or matrices (NorMuon) of this rank's shard
    momentum: float | None = None
    beta2: float | None = None
    per_matrix_lr_mul: list[float] | None = None  # NorMuon: a multiplier for each matrix of this rank's shard


def adam_update_(
    p: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, beta1: float, beta2: float, eps: float, step_size: Tensor, wd: Tensor
) -> None:
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    update = exp_avg.div(exp_avg_sq.sqrt().add_(eps)).mul_(step_size)
    mask = (update * p) > 0  # cautious weight decay: only where the step moves the weight towards zero anyway
    update.addcmul_(p, mask, value=wd)
    p.add_(other=update, alpha=-1.0)


def normuon_scale_(v: Tensor, second_moment: Tensor, beta2: float, dim: int) -> Tensor:
    """Divide each row (dim -1) or column (dim -2) of the orthogonalised update by the root of its running mean
    square, then give each matrix back its norm before this."""
    v_mean = v.float().square().mean(dim=dim, keepdim=True)
    n = v.size(dim)
    v_norm = v_mean.sum(dim=(-2, -1), keepdim=True).mul_(n).sqrt_()
    second_moment.lerp_(v_mean.to(dtype=second_moment.dtype), 1 - beta2)
    step_size = second_moment.clamp_min(1e-10).rsqrt_()
    new_norm = ((v_mean * n) * step_size.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt_()
    return v.mul_((step_size * (v_norm / new_norm.clamp_min_(1e-10))).type_as(v))


def cautious_update_(p: Tensor, mantissa: Tensor | None, update: Tensor, wd: Tensor, lr: Tensor) -> None:
    """p -= lr * (update + wd * p where update and p agree in sign), in float32. A bf16 `p` and its int16 `mantissa`
    are the high and low halves of a float32 weight: the low bits of every update are kept, not rounded away (and
    the new bf16 weight is the float32 one truncated, as the record's is)."""
    update, wd, lr = update.float(), wd.to(torch.float32), lr.to(torch.float32)
    if mantissa is None:
        x = p
    else:
        # int32 bit arithmetic (the record's is uint32, which the CPU's kernels do not shift): the same 32 bits.
        bits = (p.view(torch.int16).to(torch.int32) << 16) | (mantissa.to(torch.int32) & 0xFFFF)
        x = bits.view(torch.float32)
    mask = (update * x) >= 0
    x.copy_(x - (x * mask * wd * lr) - (update * lr))
    if mantissa is not None:
        p.view(torch.int16).copy_((bits >> 16).to(torch.int16))
        low = bits & 0xFFFF
        mantissa.copy_((low - ((low >> 15) << 16)).to(torch.int16))  # 0..65535 as the int16 of the same bits


def bank_shape(param: Tensor) -> tuple[int, ...]:
    """A bank of matrices as NorMuon sees it: every leading dimension is one of matrices (the record's MLP bank,
    layers x (up, down) x rows x cols, is 2 x layers matrices, up and down alternating)."""
    return (math.prod(param.shape[:-2]), *param.shape[-2:])


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class NorMuonAndAdam:
    def __init__(
        self,
        params: dict[str, torch.nn.Parameter],
        table: dict[str, dict],
        work_order: list[str],
        adam: dict,
        normuon: dict,
        sparse_comms: bool = False,
        tied: tuple[str, str] = ("lm_head", "embed"),
        compile: bool = False,
    ):
        """`params`: label -> parameter; `table`: label -> its entry, in the order reductions are launched;
        `adam`, `normuon`: each optimizer's lr, weight_decay (and eps; momentum, beta2). `sparse_comms`: send only
        the touched rows of "sharded_sparse" embeddings (the record does where each step is one micro-batch on
        eight ranks); otherwise they are reduce-scattered whole. `tied`: the labels of the output layer and the
        embedding that share a weight until `untie`. `compile`: torch.compile the update's arithmetic (CUDA)."""
        if set(params) != set(table) or set(work_order) != set(table):
            raise ValueError(f"parameters, table and work order must name the same labels: {sorted(params)}, {sorted(table)}, {sorted(work_order)}")
        self.rank, self.world = rank_and_world()
        self.params, self.table, self.work_order = params, table, work_order
        self.adam_defaults, self.normuon_defaults = adam, normuon
        self.cfgs = {label: self._config(label, param, table[label], sparse_comms) for label, param in params.items()}
        self.head, self.embed = (label if label in params else None for label in tied)
        self.tied = self.head is not None and self.embed is not None
        self.state = {label: self._init_state(param, self.cfgs[label]) for label, param in params.items()}
        self.rows = {
            label: SparseRows(params[label].size(0), self.rank, self.world, params[label].device)
            for label, cfg in self.cfgs.items()
            if cfg.comms == "sharded_sparse"
        }
        # 0-d float32 tensors: every value is rounded to float32 as in the record, and a compiled update takes a new
        # value without recompiling.
        self._step_size, self._wd, self._lr, self._momentum = (torch.zeros((), dtype=torch.float32) for _ in range(4))
        self._pending: dict[str, Reduction] = {}
        fns = (adam_update_, polar_express, normuon_scale_, cautious_update_)
        if compile:
            # A graph per shape and dtype, as the record's static shapes have it: Adam alone has more parameters than
            # dynamo's default limit of recompilations (the record raises it for the whole process; here, for these).
            more = torch._dynamo.config.patch(recompile_limit=64)
            fns = tuple(more(torch.compile(f, dynamic=False, fullgraph=True)) for f in fns)
        self._adam_update, self._polar_express, self._normuon_scale, self._cautious_update = fns

    # ---- configuration and state -------------------------------------------------------------------------------

    def _config(self, label: str, param: Tensor, entry: dict, sparse_comms: bool) -> ParamConfig:
        comms = entry["comms"]
        if comms not in COMMS:
            raise ValueError(f"{label}: comms {comms!r} is not one of {COMMS}")
        if comms == "sharded_sparse" and not sparse_comms:
            comms = "sharded"
        sharded = comms.startswith("sharded")
        if self.world == 1:
            comms = "none"  # the shard is the whole parameter
        base = dict(
            label=label,
            optim=entry["optim"],
            comms=comms,
            wd_mul=entry.get("wd_mul", 1.0),
            adam_betas=tuple(entry["adam_betas"]) if entry.get("adam_betas") else None,
        )
        lr_mul = entry.get("lr_mul", 1.0)
        if entry["optim"] == "adam":
            d = self.adam_defaults
            if sharded and param.size(0) % self.world:
                raise ValueError(f"{label}: {param.size(0)} rows do not divide among {self.world} ranks")
            chunk = param.size(0) // self.world if sharded else None
            return ParamConfig(**base, lr_mul=lr_mul, lr=d["lr"], initial_lr=d["lr"], weight_decay=d["weight_decay"], eps=d["eps"], chunk=chunk)
        if entry["optim"] != "normuon":
            raise ValueError(f"{label}: unknown optimizer {entry['optim']!r}")
        d, shape = self.normuon_defaults, entry.get("bank_shape") or bank_shape(param)
        if shape[0] % self.world:
            raise ValueError(f"{label}: a bank of {shape[0]} matrices does not divide among {self.world} ranks")
        chunk = shape[0] // self.world
        lr_mul = max(1.0, shape[-2] / shape[-1]) ** 0.5 * lr_mul  # the same RMS step for tall matrices
        pattern = entry.get("per_matrix_lr_mul")  # by the matrix's index in the whole bank, cycling
        per_matrix = [pattern[(self.rank * chunk + i) % len(pattern)] for i in range(chunk)] if pattern else None
        return ParamConfig(
            **base,
            lr_mul=lr_mul,
            lr=d["lr"],
            initial_lr=d["lr"],
            weight_decay=d["weight_decay"],
            bank_shape=tuple(shape),
            chunk=chunk,
            momentum=d["momentum"],
            beta2=d["beta2"],
            per_matrix_lr_mul=per_matrix,
        )

    @staticmethod
    def _init_state(param: Tensor, cfg: ParamConfig) -> dict:
        if cfg.optim == "adam":
            shard = param[: cfg.chunk] if cfg.comms.startswith("sharded") else param
            exp_avg = torch.zeros_like(shard, dtype=torch.float32)
            return dict(step=0, exp_avg=exp_avg, exp_avg_sq=torch.zeros_like(exp_avg))
        shape = (cfg.chunk, *cfg.bank_shape[1:])
        rows, cols = shape[-2:]
        # The second moment is kept per row of a tall (or square) matrix, per column of a wide one.
        second = (*shape[:-1], 1) if rows >= cols else (*shape[:-2], 1, cols)
        mantissa = torch.zeros(shape, dtype=torch.int16, device=param.device) if param.dtype == torch.bfloat16 else None
        return dict(
            momentum_buffer=torch.zeros(shape, dtype=torch.float32, device=param.device),
            second_momentum_buffer=torch.zeros(second, dtype=torch.float32, device=param.device),
            mantissa=mantissa,
        )

    def reset(self) -> None:
        """Zero NorMuon's buffers and tie the embedding again (the record does after warming its kernels up)."""
        self.tied = self.head is not None and self.embed is not None
        for label, cfg in self.cfgs.items():
            if cfg.optim == "normuon":
                for buf in self.state[label].values():
                    if buf is not None:
                        buf.zero_()

    def set_step(self, lr: float, muon_momentum: float) -> None:
        """One step's learning-rate factor (on every parameter's initial rate) and NorMuon's momentum."""
        for cfg in self.cfgs.values():
            cfg.lr = cfg.initial_lr * lr
            if cfg.optim == "normuon":
                cfg.momentum = muon_momentum

    # ---- the sparse rows ---------------------------------------------------------------------------------------

    def mark_rows(self, label: str, rows) -> None:
        """The rows of a "sharded_sparse" embedding one micro-batch touched (a no-op where it travels whole)."""
        if label in self.rows:
            self.rows[label].mark(rows)

    def begin_row_exchange(self) -> None:
        """Start the exchange of touched rows' counts: on an Adam step, once the last micro-batch's rows are marked."""
        for rows in self.rows.values():
            rows.begin()

    def share_row_indexes(self) -> None:
        """Send the touched rows' numbers (after the forward pass); step() does whatever was not done before it."""
        for rows in self.rows.values():
            rows.share()

    # ---- one step ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, adam: bool = True) -> None:
        """Update NorMuon's parameters, and Adam's too where `adam`; then clear the gradients of what was updated."""
        self._launch_reductions(adam)
        head_gather, gathers = self._update(adam)
        if head_gather is not None:  # the output layer first: the embedding copies it while the rest arrive
            head_gather.wait()
        if adam and self.tied:
            kernels.transpose_copy(self.params[self.head].data, self.params[self.embed].data)
        for work in gathers:
            work.wait()
        self._pending.clear()
        for label, param in self.params.items():
            if adam or self.cfgs[label].optim != "adam":
                param.grad = None

    def _launch_reductions(self, adam: bool) -> None:
        for label in self.table:  # the table's order
            param, cfg = self.params[label], self.cfgs[label]
            if (cfg.optim == "adam" and not adam) or param.grad is None:
                continue
            if self.tied and label == self.head:
                embed = self.params[self.embed]
                if embed.grad is not None:
                    kernels.transpose_add(embed.grad, param.grad)
            elif self.tied and label == self.embed:
                continue  # its gradient went into the output layer's
            self._pending[label] = self._reduce(label, param.grad, cfg)

    def _reduce(self, label: str, grad: Tensor, cfg: ParamConfig) -> Reduction:
        if cfg.optim == "normuon":
            grad = grad.view(cfg.bank_shape)
        if cfg.comms == "none":
            return Reduction([], grad)
        if cfg.comms == "replicated":
            return Reduction([dist.all_reduce(grad, op=dist.ReduceOp.AVG, async_op=True)], grad)
        if cfg.comms == "sharded_sparse":
            return self.rows[label].reduce(grad)
        shard = torch.empty((cfg.chunk, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
        return Reduction([dist.reduce_scatter_single(shard, grad.contiguous(), op=dist.ReduceOp.AVG, async_op=True)], shard)

    def _update(self, adam: bool) -> tuple:
        head_gather, gathers = None, []
        for label in self.work_order:
            cfg = self.cfgs[label]
            if label not in self._pending or (cfg.optim == "adam" and not adam):
                continue
            grad = self._pending[label].result()
            param = self.params[label]
            shard = self._adam(param, grad, cfg) if cfg.optim == "adam" else self._normuon(param, grad, cfg)
            if cfg.comms.startswith("sharded"):
                full = param.data.view(cfg.bank_shape) if cfg.optim == "normuon" else param.data
                work = dist.all_gather_single(full, shard.contiguous(), async_op=True)
                if label == self.head:
                    head_gather = work
                else:
                    gathers.append(work)
        return head_gather, gathers

    def _shard(self, param: Tensor, cfg: ParamConfig) -> Tensor:
        full = param.data.view(cfg.bank_shape) if cfg.optim == "normuon" else param
        return full[self.rank * cfg.chunk : (self.rank + 1) * cfg.chunk] if cfg.comms.startswith("sharded") else full

    def _adam(self, param: Tensor, grad: Tensor, cfg: ParamConfig) -> Tensor:
        beta1, beta2 = cfg.adam_betas
        lr = cfg.lr * cfg.lr_mul
        shard = self._shard(param, cfg)
        state = self.state[cfg.label]
        state["step"] += 1
        t = state["step"]
        bias1, bias2 = 1 - beta1**t, 1 - beta2**t
        self._step_size.fill_(lr * (bias2**0.5 / bias1))
        self._wd.fill_(lr * lr * cfg.weight_decay * cfg.wd_mul)  # the record's: decay scales with lr squared
        self._adam_update(shard, grad, state["exp_avg"], state["exp_avg_sq"], beta1, beta2, cfg.eps, self._step_size, self._wd)
        return shard

    def _normuon(self, param: Tensor, grad: Tensor, cfg: ParamConfig) -> Tensor:
        state = self.state[cfg.label]
        rows, cols = grad.shape[-2:]
        self._momentum.fill_(cfg.momentum)
        self._wd.fill_(cfg.wd_mul * cfg.weight_decay * cfg.lr)
        # float32 momentum; the record splits X B + a X into two kernels for matrices of more than 1024 rows
        v = self._polar_express(grad.float(), state["momentum_buffer"], self._momentum, split=rows > 1024)
        v = self._normuon_scale(v, state["second_momentum_buffer"], cfg.beta2, -1 if rows >= cols else -2)
        shard = self._shard(param, cfg)
        mantissa = state["mantissa"]
        if cfg.per_matrix_lr_mul is None:
            self._lr.fill_(cfg.lr_mul * cfg.lr)
            self._cautious_update(shard, mantissa, v, self._wd, self._lr)
            return shard
        for i, mul in enumerate(cfg.per_matrix_lr_mul):
            self._lr.fill_(cfg.lr_mul * mul * cfg.lr)
            self._cautious_update(shard[i], None if mantissa is None else mantissa[i], v[i], self._wd, self._lr)
        return shard

    # ---- untying, checkpoints ----------------------------------------------------------------------------------

    def untie(self) -> None:
        """The embedding takes the output layer's Adam state, transposed (the weights are already each other's
        transpose), and is updated on its own from now on."""
        head, embed = self.state[self.head], self.state[self.embed]
        embed["step"] = head["step"]  # the bias correction goes on where it was
        for key in ("exp_avg", "exp_avg_sq"):
            full = self._gathered(head[key], self.cfgs[self.head])  # model width x vocabulary
            chunk = self.cfgs[self.embed].chunk
            embed[key].copy_(full.T if chunk is None else full.T[self.rank * chunk : (self.rank + 1) * chunk])
        self.tied = False

    def _gathered(self, shard: Tensor, cfg: ParamConfig) -> Tensor:
        """The whole of a sharded state tensor, on every rank (a collective: every rank calls it)."""
        if not cfg.comms.startswith("sharded"):
            return shard
        # The all-gather moves bits, not numbers: a 16-bit integer travels as a 16-bit float (NCCL has no int16).
        wire = shard.view(torch.bfloat16) if shard.dtype == torch.int16 else shard
        full = torch.empty((self.world * wire.size(0), *wire.shape[1:]), dtype=wire.dtype, device=wire.device)
        dist.all_gather_single(full, wire.contiguous())
        return full.view(shard.dtype)

    def state_dict(self) -> dict:
        """The whole state, every shard gathered (a collective: every rank calls it; each gets the same dict), keyed
        by label: a checkpoint from any rank resumes on any number of ranks."""
        params = {
            label: {k: self._gathered(v, self.cfgs[label]).to("cpu", copy=True) if isinstance(v, Tensor) else v for k, v in state.items()}
            for label, state in self.state.items()
        }
        return {"tied": self.tied, "params": params}

    def load_state_dict(self, state: dict) -> None:
        if set(state["params"]) != set(self.state):
            raise ValueError(f"the optimizer state is for {sorted(state['params'])}, not {sorted(self.state)}")
        for label, saved in state["params"].items():
            cfg = self.cfgs[label]
            for k, v in saved.items():
                if not isinstance(v, Tensor):
                    self.state[label][k] = v
                    continue
                if cfg.comms.startswith("sharded"):
                    v = v[self.rank * cfg.chunk : (self.rank + 1) * cfg.chunk]
                self.state[label][k].copy_(v)
        self.tied = state["tied"]
