"""Muon: SGD with Nesterov momentum whose update is replaced by its nearest semi-orthogonal matrix, computed by five
Newton-Schulz iterations in bf16 (https://kellerjordan.github.io/posts/muon/), as the record runs it.

Not torch.optim.Muon: that one takes only 2-D parameters (the record's q, k, v weights are one 3-D tensor,
orthogonalised as three matrices), normalises by max(norm, eps) instead of norm + eps, and fuses the iteration's
additions into addmm, which rounds differently in bf16.

Across ranks, the record's layout: gradients arrive averaged (DDP), every rank keeps the momentum of every matrix
(so any rank's state is the whole state, and a checkpoint from rank 0 resumes on any number of ranks), rank r
orthogonalises matrices r, r + world, ... and an all-gather hands every rank every update. One rank computes them all.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(G: Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """An approximately orthogonal matrix with G's singular vectors (for a batch of matrices: each one's). The
    quintic's coefficients push small singular values up fast rather than converging exactly: the result is
    U S' V^T with S' roughly in [0.7, 1.2], not U V^T (tests/test_speedrun_2025_05_24.py measures it against the SVD).

    bf16 is the record's precision; an fp32 run on a CPU (which has no fast bf16 matmul) iterates in fp32."""
    a, b, c = NS_COEFFICIENTS
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm at most 1
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.mT if tall else X


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 orthogonalize=newton_schulz, ns_dtype: torch.dtype = torch.bfloat16):
        super().__init__(list(params), dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))
        self.orthogonalize = orthogonalize  # torch.compile'd on CUDA by the recipe
        self.ns_dtype = ns_dtype

    @staticmethod
    def _world() -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    @torch.no_grad()
    def step(self) -> None:
        rank, world = self._world()
        for group in self.param_groups:
            params = group["params"]
            updates = [self._direction(p, group) for p in params]  # momentum for all; Newton-Schulz below
            for base in range(0, len(params), world):
                mine = base + rank
                if world == 1:
                    out = [self.orthogonalize(updates[mine], group["ns_steps"], self.ns_dtype)]
                else:
                    out = self._gather(params, updates, base, mine, world, group["ns_steps"])
                for p, u in zip(params[base:base + world], out, strict=False):
                    scale = max(1, p.size(-2) / p.size(-1)) ** 0.5  # the same RMS step for tall matrices
                    p.add_(u.view_as(p), alpha=-group["lr"] * scale)

    def _direction(self, p: Tensor, group: dict) -> Tensor:
        g = p.grad
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(g)
        buf = state["momentum_buffer"]
        buf.lerp_(g, 1 - group["momentum"])
        return g.lerp_(buf, group["momentum"]) if group["nesterov"] else buf

    def _gather(self, params, updates, base, mine, world, ns_steps) -> list[Tensor]:
        """Each rank orthogonalises its matrix of this round; the all-gather hands all of them to every rank.
        Rounds are within one parameter group, whose matrices the recipe makes equal in size."""
        numel = params[base].numel()
        if mine < len(params):
            local = self.orthogonalize(updates[mine], ns_steps, self.ns_dtype).flatten()
        else:  # the last round can have fewer matrices than ranks: send anything of the right size
            local = torch.zeros(numel, dtype=self.ns_dtype, device=params[base].device)
        gathered = torch.empty(world * numel, dtype=local.dtype, device=local.device)
        dist.all_gather_into_tensor(gathered, local.contiguous())
        return list(gathered.view(world, numel).unbind(0))
