"""Process-group plumbing for the model-parallel head: topology, class shards, all-gathers.

Everything here takes the process group explicitly (``None`` means the default group when
``torch.distributed`` is initialized, else a single process), so the head never reads globals.

Gradient convention (docs/design.md, "Gradient and loss-scale conventions"): the distributed CE in
``heads/dist_softmax.py`` has a *local* backward, so each head shard receives exactly its rows of
the single-process gradient. The embedding gradient then has to be summed over ranks (every rank
holds a partial sum over its classes) and multiplied by the world size W, because DeepSpeed/DDP
average backbone gradients over W ranks. ``gather_embeddings`` implements exactly that backward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

__all__ = [
    "Topology",
    "resolve_group",
    "shard_range",
    "all_gather_sizes",
    "all_gather_rows",
    "gather_embeddings",
    "all_true",
    "all_true_tensor",
]


class Topology:
    """Rank and world size of one process group.

    Attributes:
        group: the ``ProcessGroup`` to pass to collectives (``None`` for the default group or
            a single process).
        rank: this process's rank in ``group`` (0 without distribution).
        world_size: number of ranks in ``group`` (1 without distribution).
    """

    __slots__ = ("group", "rank", "world_size")

    def __init__(self, group: ProcessGroup | None, rank: int, world_size: int):
        self.group = group
        self.rank = rank
        self.world_size = world_size

    def __repr__(self) -> str:
        return f"Topology(rank={self.rank}, world_size={self.world_size})"


def resolve_group(process_group: ProcessGroup | None = None) -> Topology:
    """Rank and world size for ``process_group``.

    Args:
        process_group: a ``torch.distributed.ProcessGroup``; ``None`` selects the default group
            when ``torch.distributed`` is initialized, otherwise a world of one process.

    Raises:
        RuntimeError: a group is given but ``torch.distributed`` is not initialized.
    """
    initialized = dist.is_available() and dist.is_initialized()
    if process_group is None and not initialized:
        return Topology(None, 0, 1)
    if not initialized:
        raise RuntimeError("a process_group was given but torch.distributed is not initialized")
    return Topology(process_group, dist.get_rank(process_group), dist.get_world_size(process_group))


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """Class shard of ``rank``: ``(start, count)`` with ``count = C//W + (rank < C%W)``.

    Ranks hold contiguous, ordered ranges, so rank r covers ``[start, start + count)``.

    Raises:
        ValueError: ``num_classes`` < 1, ``world_size`` < 1 or ``rank`` outside ``[0, W)``.
    """
    if num_classes < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            "shard request needs num_classes >= 1 and 0 <= rank < world_size, got "
            f"num_classes={num_classes}, rank={rank}, world_size={world_size}"
        )
    base, extra = divmod(num_classes, world_size)
    count = base + (rank < extra)
    start = rank * base + min(rank, extra)
    return start, count


def all_gather_sizes(n: int, topo: Topology, device: torch.device) -> list[int]:
    """Gather one integer (a local batch size) from every rank; returns W python ints."""
    if topo.world_size == 1:
        return [n]
    local = torch.tensor([n], dtype=torch.int64, device=device)
    out = [torch.empty_like(local) for _ in range(topo.world_size)]
    dist.all_gather(out, local, group=topo.group)
    return [int(t.item()) for t in out]


def all_gather_rows(x: torch.Tensor, sizes: list[int], topo: Topology) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0 in rank order; rank r contributes ``sizes[r]``.

    Sizes may differ (the last batch of an epoch): each rank pads to ``max(sizes)`` so a plain
    ``all_gather`` works on any backend, then the padding is dropped. No autograd.

    Args:
        x: ``(sizes[rank], ...)`` tensor, any dtype, on the group's device.
        sizes: per-rank row counts from ``all_gather_sizes``.

    Returns:
        ``(sum(sizes), ...)`` tensor, same dtype and device as ``x``.
    """
    if topo.world_size == 1:
        return x
    width = max(sizes)
    padded = x.new_zeros((width,) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(topo.world_size)]
    dist.all_gather(parts, padded.contiguous(), group=topo.group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)


class _GatherEmbeddings(torch.autograd.Function):
    """All-gather; backward sums the gradient over ranks and scales it by W (module doc)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, sizes: list[int], topo: Topology) -> torch.Tensor:
        ctx.sizes = sizes
        ctx.topo = topo
        return all_gather_rows(x, sizes, topo)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        topo, sizes = ctx.topo, ctx.sizes
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=topo.group)
        offset = sum(sizes[: topo.rank])
        local = grad[offset : offset + sizes[topo.rank]]
        # Undo the 1/W that DeepSpeed/DDP apply when averaging backbone gradients over ranks.
        return local * topo.world_size, None, None


def gather_embeddings(
    x: torch.Tensor, topo: Topology, sizes: list[int] | None = None
) -> tuple[torch.Tensor, list[int]]:
    """Autograd-aware all-gather of local embeddings.

    Args:
        x: ``(B_local, D)`` float tensor; ``B_local`` may differ between ranks.
        topo: from ``resolve_group``.
        sizes: the per-rank row counts when the caller knows them (e.g. equal batches agreed
            once at start-up); ``None`` exchanges them, which reads W values back from the
            device (a host sync on CUDA).

    Returns:
        ``(gathered, sizes)``: ``gathered`` is ``(sum(sizes), D)`` in rank order; ``sizes`` the
        per-rank row counts. The backward returns ``W * sum_over_ranks(grad)[local rows]``, i.e.
        the exact single-process gradient times W, which the backbone's gradient averaging over
        W ranks brings back to the exact value.
    """
    if sizes is None:
        sizes = all_gather_sizes(x.shape[0], topo, x.device)
    if topo.world_size == 1:
        return x, sizes
    return _GatherEmbeddings.apply(x, sizes, topo), sizes


def all_true(flag: bool, topo: Topology, device: torch.device) -> bool:
    """Logical AND of a python bool over all ranks of ``topo``."""
    if topo.world_size == 1:
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=topo.group)
    return bool(t.item() == 0.0)


def all_true_tensor(flag: torch.Tensor, topo: Topology) -> torch.Tensor:
    """Logical AND of a 0-dim bool device tensor over all ranks, left on the device (no host
    read: the result can gate an update with ``torch.where`` and be read later, batched)."""
    if topo.world_size == 1:
        return flag
    t = (~flag).to(torch.float32).reshape(1)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=topo.group)
    return t[0] == 0
