"""The sparse reduce-scatter of an embedding's gradient, as modded-nanogpt's record of 2026-07-17 does it for its
bigram hash embedding (754,560 rows, of which one step's tokens touch a small fraction).

Each rank owns a contiguous shard of the rows (rank r: rows r*N/world to (r+1)*N/world). Instead of reduce-scattering
the whole gradient, a rank sends to each other rank only the rows of that rank's shard its own tokens touched (the
other rows of its gradient are exactly zero), and adds what it receives onto its own gradient's shard: its own
contribution is never sent. The row numbers travel first (their counts, then the rows), so that the gradients'
exchange needs no more than one collective once the backward pass is done.

The touched rows accumulate over every micro-batch since the last exchange: the embedding is Adam's, stepped every
other step, and its gradient accumulates over both steps, so the rows of both travel. A rank that leaves a touched row
unmarked loses that row's gradient: `mark` must see every batch's rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class Reduction:
    """One parameter's gradient on its way: the collectives to wait for, and this rank's share of the averaged
    gradient once they are done (`merge` makes it, where the received parts still have to be added)."""

    works: list
    grad: Tensor | None = None
    merge: object = None  # () -> Tensor

    def result(self) -> Tensor:
        for work in self.works:
            work.wait()
        return self.merge() if self.merge is not None else self.grad


@dataclass
class _Indexes:
    send: Tensor  # the touched rows of other ranks' shards, in rank order (int32, on the device)
    send_counts: list[int]
    recv_counts: list[int] = field(default_factory=list)
    recv: Tensor | None = None  # the rows of this rank's shard that other ranks send, in rank order
    works: list = field(default_factory=list)


class SparseRows:
    def __init__(self, rows: int, rank: int, world: int, device: torch.device):
        if rows % world:
            raise ValueError(f"{rows} rows do not divide among {world} ranks")
        self.rank, self.world, self.device = rank, world, torch.device(device)
        self.per_rank = rows // world
        self.touched = np.zeros(rows, dtype=np.uint8)
        # The counts are a few integers: with a backend for CPU tensors (gloo, or the record's "cuda:nccl,cpu:gloo")
        # they travel from host memory and reading them needs no wait for the GPU.
        self.counts_device = torch.device("cpu") if "gloo" in str(dist.get_backend()) else self.device
        self._counts: tuple | None = None  # (indexes, received counts, work) between begin() and share()
        self._indexes: _Indexes | None = None

    def mark(self, rows: np.ndarray) -> None:
        self.touched[rows] = 1

    def begin(self) -> None:
        """Send each rank how many of its rows this rank touched (the record starts this before the forward pass)."""
        rows = np.flatnonzero(self.touched).astype(np.int32)
        self.touched.fill(0)
        bounds = np.searchsorted(rows, np.arange(0, self.per_rank * (self.world + 1), self.per_rank, dtype=np.int32))
        send_counts = torch.from_numpy(bounds[1:] - bounds[:-1])
        send_counts[self.rank] = 0  # this rank's own rows stay: its gradient's shard is where the others' are added
        send = np.concatenate([rows[: bounds[self.rank]], rows[bounds[self.rank + 1] :]])
        send_counts = send_counts.to(self.counts_device)
        recv_counts = torch.empty_like(send_counts)
        work = dist.all_to_all_single(recv_counts, send_counts, async_op=True)
        self._counts = (_Indexes(torch.from_numpy(send).to(self.device), send_counts.tolist()), recv_counts, work)

    def share(self) -> None:
        """Send the row numbers themselves (the record does this between the forward and the backward pass)."""
        if self._counts is None:
            self.begin()
        indexes, recv_counts, work = self._counts
        self._counts = None
        work.wait()
        indexes.recv_counts = recv_counts.tolist()
        indexes.recv = torch.empty(sum(indexes.recv_counts), dtype=torch.int32, device=self.device)
        indexes.works.append(
            dist.all_to_all_single(
                indexes.recv, indexes.send, output_split_sizes=indexes.recv_counts, input_split_sizes=indexes.send_counts, async_op=True
            )
        )
        self._indexes = indexes

    def reduce(self, grad: Tensor) -> Reduction:
        """Send the touched rows' gradients; the result is this rank's shard of the gradient averaged over ranks."""
        if self._indexes is None:
            self.share()
        ix, self._indexes = self._indexes, None
        d = grad.size(1)
        recv = torch.empty(sum(ix.recv_counts) * d, dtype=grad.dtype, device=grad.device)
        work = dist.all_to_all_single(
            recv,
            grad[ix.send].view(-1),
            output_split_sizes=[n * d for n in ix.recv_counts],
            input_split_sizes=[n * d for n in ix.send_counts],
            async_op=True,
        )

        def merge() -> Tensor:
            grad.index_add_(0, ix.recv, recv.view(-1, d))
            return grad[self.per_rank * self.rank : self.per_rank * (self.rank + 1)].mul_(1 / self.world)

        return Reduction([*ix.works, work], merge=merge)
