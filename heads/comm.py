"""Process-group plumbing for the model-parallel head: topology, class shards, all-gathers.

Everything here takes the process group explicitly (``None`` means the default group when
``torch.distributed`` is initialized, else a single process), so the head never reads globals.

Gradient convention (docs/design.md, "Gradient and loss-scale conventions"): the distributed CE in
``heads/dist_softmax.py`` has a *local* backward, so each head shard receives exactly its rows of
the single-process gradient. The embedding gradient then has to be summed over ranks (every rank
holds a partial sum over its classes) and multiplied by the world size W, because DeepSpeed/DDP
average backbone gradients over W ranks. ``gather_batch`` implements exactly that backward.
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
    "gather_batch",
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

    Sizes may differ (the last batch of an epoch): each rank pads to ``max(sizes)`` so one
    ``all_gather_single`` works on any backend, then the padding is dropped (no copy when the
    sizes are equal, the training case). No autograd.

    Args:
        x: ``(sizes[rank], ...)`` tensor, any dtype, on the group's device.
        sizes: per-rank row counts from ``all_gather_sizes``.

    Returns:
        ``(sum(sizes), ...)`` tensor, same dtype and device as ``x``.
    """
    if topo.world_size == 1:
        return x
    width = max(sizes)
    if x.shape[0] == width:
        padded = x.contiguous()
    else:
        padded = x.new_zeros((width,) + tuple(x.shape[1:]))
        padded[: x.shape[0]] = x
    out = x.new_empty((topo.world_size * width,) + tuple(x.shape[1:]))
    dist.all_gather_single(out, padded, group=topo.group)
    if all(n == width for n in sizes):
        return out
    return torch.cat([out[r * width : r * width + n] for r, n in enumerate(sizes)], dim=0)


def _reduce_scatter_rows(grad: torch.Tensor, sizes: list[int], topo: Topology) -> torch.Tensor:
    """Rank r's rows ``[sum(sizes[:r]), + sizes[r])`` of ``grad`` summed over all ranks: one
    ``reduce_scatter_single`` over blocks padded to ``max(sizes)`` (no copy when equal)."""
    width = max(sizes)
    if all(n == width for n in sizes):
        blocks = grad.contiguous()
    else:
        blocks = grad.new_zeros((topo.world_size * width,) + tuple(grad.shape[1:]))
        start = 0
        for r, n in enumerate(sizes):
            blocks[r * width : r * width + n] = grad[start : start + n]
            start += n
    out = grad.new_empty((width,) + tuple(grad.shape[1:]))
    dist.reduce_scatter_single(out, blocks, op=dist.ReduceOp.SUM, group=topo.group)
    return out[: sizes[topo.rank]]


def _pack(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(B, D + 8 / itemsize)`` rows of ``x``'s dtype: the embedding, then the int64 label's
    bytes reinterpreted (a collective copies bytes, so they come back unchanged)."""
    return torch.cat([x, labels.contiguous().reshape(-1, 1).view(x.dtype)], dim=1)


class _GatherBatch(torch.autograd.Function):
    """One all-gather of embeddings + labels; backward: reduce-scatter in fp32, times W."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, labels: torch.Tensor, sizes: list[int], topo: Topology
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.sizes, ctx.topo, ctx.in_dtype = sizes, topo, x.dtype
        rows = all_gather_rows(_pack(x, labels), sizes, topo)
        d = x.shape[1]
        gathered_labels = rows[:, d:].contiguous().view(torch.int64).reshape(-1)
        ctx.mark_non_differentiable(gathered_labels)
        return rows[:, :d].float().contiguous(), gathered_labels

    @staticmethod
    def backward(
        ctx: Any, grad: torch.Tensor, _: torch.Tensor | None
    ) -> tuple[torch.Tensor, None, None, None]:
        topo, sizes = ctx.topo, ctx.sizes
        local = _reduce_scatter_rows(grad.float(), sizes, topo)
        # Undo the 1/W that DeepSpeed/DDP apply when averaging backbone gradients over ranks.
        return (local * topo.world_size).to(ctx.in_dtype), None, None, None


def gather_batch(
    x: torch.Tensor, labels: torch.Tensor, topo: Topology, sizes: list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Autograd-aware all-gather of local embeddings and their labels, in one collective.

    Wire formats (``benchmarks/bench_comm.py`` counts and times them):

    - forward: the embeddings travel in their own dtype (bf16/fp16 under those engines: half
      of fp32's bytes) and the cast to fp32 happens after the gather. That is lossless: every
      bf16/fp16 value is exact in fp32, so the head sees bit-for-bit the embeddings that a
      gather of ``x.float()`` gives. The int64 labels ride in the same buffer (8 bytes per row
      appended to each row), which saves a second collective's latency per step.
    - backward: a reduce-scatter of the ``(N, D)`` embedding gradient, in fp32 whatever ``x``'s
      dtype. Each rank's contribution is a partial sum over its class shard; the positive
      class's term on one rank largely cancels the negatives' on the others, so a sum in bf16
      (8-bit mantissa) loses the difference, and under fp16 the partials carry the loss scale
      (up to 2^16) and overflow 65504. The engines reduce backbone gradients in fp32 for the
      same reasons (``trainer/engine.py``). Only the local rows are reduced onto each rank:
      ``(W-1)/W * N * D * 4`` bytes per rank on a ring, half of an all-reduce's.

    Args:
        x: ``(B_local, D)`` float tensor (fp32/fp16/bf16); ``B_local`` may differ between ranks.
        labels: ``(B_local,)`` int64.
        topo: from ``resolve_group``.
        sizes: the per-rank row counts when the caller knows them (e.g. equal batches agreed
            once at start-up); ``None`` exchanges them, which reads W values back from the
            device (a host sync on CUDA).

    Returns:
        ``(embeddings, labels, sizes)``: ``embeddings`` ``(N, D)`` fp32 and ``labels`` ``(N,)``
        int64 in rank order, ``N = sum(sizes)``; ``sizes`` the per-rank row counts. The
        backward gives ``x`` (in ``x``'s dtype) ``W * sum_over_ranks(grad)[local rows]``, i.e.
        the exact single-process gradient times W, which the backbone's gradient averaging
        over W ranks brings back to the exact value.
    """
    if sizes is None:
        sizes = all_gather_sizes(x.shape[0], topo, x.device)
    if topo.world_size == 1:
        return x.float(), labels, sizes
    emb, gathered = _GatherBatch.apply(x, labels, sizes, topo)
    return emb, gathered, sizes


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
