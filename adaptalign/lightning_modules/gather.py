"""Gathering rows across ranks: with gradients for the local loss, without for callbacks.

Each rank scores its own rows against every rank's columns, so the negatives are the global batch
while the work per rank stays ``B x (world * B)``. The gather keeps the autograd graph: its backward
sums, into each rank's rows, the gradients every rank computed for them; DDP's averaging of
parameter gradients then makes the result equal to one process on the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def distributed_world() -> tuple[int, int]:
    """(rank, world size), (0, 1) outside an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(x: Tensor) -> Tensor:
    """``x`` summed over all ranks (a copy; ``x`` itself is left as it is); ``x`` on one process.

    A collective call: every rank must make it.
    """
    if distributed_world()[1] > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


def _row_counts(x: Tensor, world: int) -> list[int]:
    """Every rank's number of rows of ``x`` (a collective call)."""
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    return [int(s) for s in sizes]


def _all_gather_rows(x: Tensor, counts: list[int]) -> Tensor:
    """All ranks' rows in rank order: padded to the longest count for the collective, then cut."""
    longest = max(counts)
    padded = x
    if x.shape[0] < longest:
        padded = torch.cat([x, x.new_zeros((longest - x.shape[0], *x.shape[1:]))])
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])


def gather_rows(x: Tensor) -> Tensor:
    """All ranks' rows of ``x`` in rank order, outside autograd; ``x`` itself on one process.

    Ranks may hold different numbers of rows. A collective call: every rank must make it.
    """
    _, world = distributed_world()
    if world == 1:
        return x
    return _all_gather_rows(x, _row_counts(x, world))


class _GatherRows(torch.autograd.Function):
    """All ranks' rows (padded to ``longest``) forward; backward, the summed gradient of own rows.

    The backward all-reduces the full gradient and keeps this rank's slice, which every backend
    (gloo included) supports; embeddings are small, so the extra traffic over a reduce-scatter is
    negligible.
    """

    @staticmethod
    def forward(ctx, x: Tensor, counts: list[int], rank: int) -> Tensor:  # type: ignore[override]
        ctx.counts, ctx.rank = counts, rank
        return _all_gather_rows(x, counts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = sum(ctx.counts[: ctx.rank])
        return grad[start : start + ctx.counts[ctx.rank]], None, None


def gather_with_grad(x: Tensor) -> tuple[Tensor, int]:
    """Concatenate ``x`` from all ranks along dim 0, differentiably; also this rank's row offset.

    Ranks may hold different numbers of rows (a short last batch): rows are padded to the largest
    count for the collective and the padding is cut away again.
    """
    rank, world = distributed_world()
    if world == 1:
        return x, 0
    counts = _row_counts(x, world)
    return _GatherRows.apply(x, counts, rank), sum(counts[:rank])
