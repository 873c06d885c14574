"""Embedding one set of items across every rank: each embeds a contiguous slice, all gather.

Used by the in-training verification callback (``evaluation/callback.py``) and by
``tools/eval_ijb.py``. Under ZeRO-3 every forward gathers parameters collectively, so every rank
must make the same forwards: the slices are padded to one common length
(``slice_bounds``), and a rank with an empty slice still takes part in every collective here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from numpy.typing import NDArray

__all__ = ["broadcast_buffers", "embed_sharded", "gather_slices", "slice_bounds"]


def slice_bounds(num: int, rank: int, world_size: int) -> tuple[int, int, int]:
    """``(start, stop, padded_len)`` of rank's contiguous slice of ``num`` items.

    Every rank gets ``padded_len = ceil(num / world_size)`` rows to embed; the last ranks may get
    fewer real rows (possibly none) and pad the rest.
    """
    per = -(-num // world_size)
    start = min(rank * per, num)
    return start, min(start + per, num), per


def _device(group: Any) -> torch.device:
    # NCCL collectives take CUDA tensors only, on the current device.
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_buffers(module: torch.nn.Module, group: Any = None) -> None:
    """Copy the buffers (BatchNorm running mean/var, counters) of the group's first rank to all.

    Collective: every rank of ``group`` (default: the world) must call it. A no-op without an
    initialized process group.
    """
    if not dist.is_available() or not dist.is_initialized():
        return
    src = dist.get_global_rank(group, 0) if group is not None else 0
    for buf in module.buffers():
        dist.broadcast(buf.data, src, group=group)


def gather_slices(
    local: NDArray[Any], num: int, rank: int, world_size: int, group: Any = None
) -> NDArray[Any]:
    """All-gather the rows every rank computed for its ``slice_bounds`` slice of ``num`` items.

    Args:
        local: (padded_len, ...) array of this rank: its real rows first, then any padding.
        num: total number of items; rank r's real rows are items ``slice_bounds(num, r, W)``.
        group: process group (None = world); NCCL groups go through the current CUDA device.
    Returns:
        (num, ...) array of all real rows in item order, on every rank.
    Raises:
        ValueError: ``local`` does not have ``padded_len`` rows.
    """
    _, _, per = slice_bounds(num, rank, world_size)
    if local.shape[0] != per:
        raise ValueError(f"rank {rank}: {local.shape[0]} rows, expected the padded {per}")
    if world_size == 1:
        return local[:num]
    t = torch.from_numpy(np.ascontiguousarray(local)).to(_device(group))
    parts = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(parts, t, group=group)
    full = torch.cat(parts).cpu().numpy()  # (per * W, ...), rank-major
    keep = []
    for r in range(world_size):
        r_start, r_stop, _ = slice_bounds(num, r, world_size)
        keep.append(full[r * per : r * per + (r_stop - r_start)])
    return np.concatenate(keep)


def _agreed_width(local: NDArray[np.float32], world_size: int, group: Any) -> int:
    """D, agreed by every rank (a rank with an empty slice has none of its own)."""
    if world_size == 1:
        return int(local.shape[1])
    d = torch.tensor([local.shape[1] if local.shape[0] else 0], device=_device(group))
    dist.all_reduce(d, op=dist.ReduceOp.MAX, group=group)
    return int(d.item())


def embed_sharded(
    num: int,
    embed_rows: Callable[[int, int, int], NDArray[np.float32]],
    rank: int,
    world_size: int,
    group: Any = None,
) -> NDArray[np.float32]:
    """Rows of ``num`` items computed slice by slice on every rank, gathered in item order.

    Args:
        num: number of items (images, faces).
        embed_rows: ``(start, stop, padded_len) -> (k, D) float32``: this rank's rows for items
            ``[start, stop)``, with ``k == stop - start`` (zero-padded here) or
            ``k == padded_len`` (the caller padded, e.g. by repeating images so that every rank
            makes the same forwards, as ZeRO-3 needs). Called once, also for an empty slice.
        rank, world_size, group: this process's place (``world_size == 1``: no process group).
    Returns:
        (num, D) float32, identical on every rank.
    Raises:
        ValueError: ``embed_rows`` returned a row count other than the two allowed.
    """
    start, stop, per = slice_bounds(num, rank, world_size)
    local = np.asarray(embed_rows(start, stop, per), dtype=np.float32)
    if local.ndim != 2 or local.shape[0] not in (stop - start, per):  # before any collective
        raise ValueError(
            f"rank {rank}: embed_rows gave {local.shape} for items [{start}, {stop}) "
            f"(expected {stop - start} or {per} rows)"
        )
    width = _agreed_width(local, world_size, group)  # collective: every rank, every call
    if local.shape[0] < per:
        padded = np.zeros((per, width), np.float32)
        padded[: local.shape[0]] = local
        local = padded
    return gather_slices(local, num, rank, world_size, group)
