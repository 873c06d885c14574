"""Save and load the sharded head in global class order, across world-size changes.

Every rank writes ``<directory>/head/shard_<start>_<end>.pt`` (atomically: temporary name, then
``os.replace``) holding its rows ``[start, end)`` of the centers (fp32), the optimizer's per-row
state, its hyper-parameters, the sampling RNG state and the margin loss's state (EMA buffers,
CurricularFace's t, ElasticFace's RNG: identical on every rank, so each shard has a copy).
``load_head`` reads, for each rank, the rows of its own class range from whichever saved shards
overlap it, so a checkpoint written by W ranks resumes on any W' (2 -> 1, 2 -> 3, ...). Files
are opened with ``mmap=True`` so only the overlapping rows are read from disk. Ranges are in
classes; with S sub-centers per class (``PartialFC.num_subcenters``) a shard's rows are its
classes' S rows each, class-major, so re-sharding moves whole classes.
"""

from __future__ import annotations

import os
import re
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from data.atomic import atomic_path
from heads.optim import HeadOptimizer
from heads.partial_fc import PartialFC
from models.weights import load_error

__all__ = ["save_head", "load_head", "head_dir", "open_centers", "centers_of", "SavedCenters",
           "FORMAT"]  # fmt: skip

FORMAT = "arcscale.head.v1"
_SHARD_RE = re.compile(r"^shard_(\d+)_(\d+)\.pt$")


def head_dir(directory: str) -> str:
    """Folder holding the shard files of a checkpoint directory."""
    return os.path.join(directory, "head")


def save_head(directory: str, head: PartialFC, head_opt: HeadOptimizer | None = None) -> str:
    """Write this rank's shard of ``head`` (and ``head_opt``'s state) under ``directory/head``.

    Collective when the head's world size is > 1: ranks meet at a barrier after writing, so on
    return every shard of the checkpoint is complete.

    Args:
        directory: checkpoint directory (created if missing).
        head: the ``PartialFC`` to save.
        head_opt: its ``HeadOptimizer``, or ``None`` to save the centers only.

    Returns:
        path of the shard file written by this rank.
    """
    folder = head_dir(directory)
    os.makedirs(folder, exist_ok=True)
    start, end = head.class_start, head.class_start + head.num_local
    if head_opt is not None:
        head_opt.flush()  # rows lagging behind a dense decay must be current before the read
    payload = {
        "format": FORMAT,
        "num_classes": head.num_classes,
        "embedding_size": head.embedding_size,
        "num_subcenters": head.num_subcenters,
        "start": start,
        "end": end,
        "world_size": head.topo.world_size,
        "weight": head.weight.detach().float().cpu().contiguous(),
        "rng_state": head.get_rng_state().cpu(),
        "rng_device": head.weight.device.type,
        "optimizer": None,
        # identical on every rank (EMA buffers, t, margin RNG): any shard restores it
        "margin": {
            "class": type(head.margin_loss).__name__,
            "state": {k: v.detach().cpu() for k, v in head.margin_loss.state_dict().items()},
        },
    }
    if head_opt is not None:
        sd = head_opt.state_dict()
        sd["state"] = {k: v.detach().cpu().contiguous() for k, v in sd["state"].items()}
        payload["optimizer"] = sd
    path = os.path.join(folder, f"shard_{start}_{end}.pt")
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    if head.topo.world_size > 1:
        dist.barrier(group=head.topo.group)
    return path


def _list_shards(folder: str) -> list[tuple[int, int, str]]:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no head checkpoint folder {folder}")
    shards = []
    for name in os.listdir(folder):
        m = _SHARD_RE.match(name)
        if m:
            shards.append((int(m.group(1)), int(m.group(2)), os.path.join(folder, name)))
    shards.sort()
    for (_, e0, p0), (s1, _, p1) in zip(shards, shards[1:]):
        if s1 < e0:
            raise ValueError(
                f"overlapping shards in {folder}: {os.path.basename(p0)} and "
                f"{os.path.basename(p1)} (two saves into one directory?)"
            )
    return shards


def _gaps(shards: list[tuple[int, int, str]], start: int, end: int) -> list[tuple[int, int]]:
    """Class ranges of ``[start, end)`` that none of the sorted ``shards`` covers."""
    gaps, cursor = [], start
    for s, e, _ in shards:
        if s > cursor:
            gaps.append((cursor, s))
        cursor = max(cursor, e)
    if cursor < end:
        gaps.append((cursor, end))
    return gaps


_SIZE_KEYS = ("num_classes", "embedding_size", "num_subcenters")


def _read_shard(path: str) -> dict[str, Any]:
    """A shard file's payload, memory-mapped, ``weights_only`` (no code runs).

    Raises:
        ValueError: unreadable or refused file (one line, `models.weights.load_error`), or not
            a dict.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises several types for unreadable or hostile files
        raise ValueError(f"head shard: {load_error(path, e)}") from None
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: not a head shard (a dict expected)")
    return payload


def _saved_sizes(payload: dict[str, Any], path: str) -> dict[str, int]:
    """``_SIZE_KEYS`` -> value of a shard file; ValueError for a format other than ours."""
    if payload.get("format") != FORMAT:
        raise ValueError(f"{path}: format {payload.get('format')!r} unknown")
    # files older than sub-centers have one row a class
    return {key: int(payload.get(key, 1)) for key in _SIZE_KEYS}


def check_tensor(
    path: str, name: str, saved: object, shape: Any, dtype: torch.dtype, owner: str = "the head's"
) -> None:
    """A loaded `saved` is a tensor of `shape` and `dtype` (the live one's) before it is copied.

    Raises:
        ValueError: one line naming `path` and `name`, the saved and the live shape and dtype.
    """
    if not isinstance(saved, torch.Tensor):
        raise ValueError(f"{path}: '{name}' is a {type(saved).__name__}, not a tensor")
    if tuple(saved.shape) != tuple(shape) or saved.dtype != dtype:
        raise ValueError(
            f"{path}: '{name}' is {tuple(saved.shape)} {saved.dtype} but {owner} is "
            f"{tuple(shape)} {dtype}"
        )


def _check_meta(
    payload: dict[str, Any], path: str, head: PartialFC, head_opt: HeadOptimizer | None
) -> None:
    """Sizes, margin and optimizer of a shard file against ``head``; then every tensor the load
    copies: ``weight`` and each optimizer state are ``((end - start) S, D)`` fp32 for the file's
    class range (the name's), margin state tensors have the live ones' shapes and dtypes."""
    saved_sizes = _saved_sizes(payload, path)
    for key in _SIZE_KEYS:
        saved, want = saved_sizes[key], getattr(head, key)
        if saved != want:
            raise ValueError(f"{path}: {key}={saved} but the head has {want}")
    m = _SHARD_RE.match(os.path.basename(path))
    rows = 0 if m is None else (int(m.group(2)) - int(m.group(1))) * head.num_subcenters
    shape = (rows, head.embedding_size)
    check_tensor(path, "weight", payload.get("weight"), shape, torch.float32)
    want_margin = head.margin_loss.state_dict()
    if want_margin:
        saved_margin = payload.get("margin") or {}
        name = type(head.margin_loss).__name__
        state = saved_margin.get("state")
        if (
            saved_margin.get("class") != name
            or not isinstance(state, dict)
            or (set(state) != set(want_margin))
        ):
            raise ValueError(
                f"{path}: saved margin {saved_margin.get('class')!r} has "
                f"no state for the head's {name} (keys {sorted(want_margin)})"
            )
        for key, live in want_margin.items():
            check_tensor(path, f"margin.{key}", state[key], live.shape, live.dtype)
    if head_opt is None:
        return
    saved_opt = payload.get("optimizer")
    if not isinstance(saved_opt, dict) or saved_opt.get("name") != head_opt.name:
        raise ValueError(
            f"{path}: saved optimizer "
            f"{saved_opt.get('name') if isinstance(saved_opt, dict) else None!r} but loading into "
            f"{head_opt.name!r}"
        )
    missing = set(head_opt.state_keys()) - set(saved_opt.get("state") or {})
    if missing:
        raise ValueError(f"{path}: optimizer state lacks {sorted(missing)}")
    for key in head_opt.state_keys():  # per-row Adam step counts are (rows,) int64
        want, dtype = ((rows,), torch.int64) if key == "step" else (shape, torch.float32)
        check_tensor(path, f"optimizer.{key}", saved_opt["state"][key], want, dtype)


@torch.no_grad()
def load_head(directory: str, head: PartialFC, head_opt: HeadOptimizer | None = None) -> None:
    """Fill this rank's rows of ``head`` (and ``head_opt``'s state) from ``directory/head``.

    Works for any saved world size: the rows ``[class_start, class_start + num_local)`` are
    assembled from every saved shard that overlaps them. Hyper-parameters (lr, ...) come from
    the checkpoint, and so does the margin loss's state (any shard's copy: it is the same on
    every rank); the sampling RNG state is restored when a shard has exactly this range and
    was saved from the same device type.

    Raises:
        FileNotFoundError: ``directory/head`` is missing.
        ValueError: an unreadable shard file, shard files overlap,
            num_classes/embedding_size/num_subcenters/optimizer mismatch, a tensor of another
            shape or dtype than the one it is copied into (the file and tensor named), a stateful
            margin loss without its saved state, or the saved shards do not cover this rank's
            range (the message names the directory and the missing class ranges).
    """
    folder = head_dir(directory)
    start, end = head.class_start, head.class_start + head.num_local
    shards = [s for s in _list_shards(folder) if s[0] < end and s[1] > start]
    # Check every file before touching the head, so a failed load leaves it unchanged.
    payloads = []
    for s, e, path in shards:
        payload = _read_shard(path)
        _check_meta(payload, path, head, head_opt)
        payloads.append((s, e, payload))
    gaps = _gaps(shards, start, end)
    if gaps:
        raise ValueError(
            f"{folder} does not cover classes {gaps} of this rank's range [{start}, {end})"
        )
    if head_opt is not None:
        head_opt._ensure_state()
    for s, e, payload in payloads:
        lo, hi = max(s, start), min(e, end)
        k = head.num_subcenters  # rows per class
        src, dst = slice((lo - s) * k, (hi - s) * k), slice((lo - start) * k, (hi - start) * k)
        head.weight[dst].copy_(payload["weight"][src])
        if head_opt is not None:
            for key in head_opt.state_keys():
                head_opt.state[key][dst].copy_(payload["optimizer"]["state"][key][src])
        same_rng = payload.get("rng_device") == head.weight.device.type
        if (s, e) == (start, end) and same_rng:
            head.set_rng_state(payload["rng_state"])
    if payloads and head.margin_loss.state_dict():
        state = payloads[0][2]["margin"]["state"]
        head.margin_loss.load_state_dict({k: v.clone() for k, v in state.items()})
    if head_opt is not None and payloads:
        hyper = payloads[0][2]["optimizer"]
        head_opt.lr = float(hyper["lr"])
        head_opt.momentum = float(hyper["momentum"])
        head_opt.weight_decay = float(hyper["weight_decay"])
        b1, b2 = (float(b) for b in hyper["betas"])
        head_opt.betas = (b1, b2)
        head_opt.eps = float(hyper["eps"])


class SavedCenters(NamedTuple):
    """The class centers of a head checkpoint, memory-mapped (``open_centers``).

    Attributes:
        num_classes (C), num_subcenters (S), embedding_size (D): as saved.
        starts: first class of each shard file, ascending, ``starts[0] == 0``.
        weights: per shard, its ``((end - start) S, D)`` fp32 rows (class-major), memory-mapped.
    """

    num_classes: int
    num_subcenters: int
    embedding_size: int
    starts: list[int]
    weights: list[torch.Tensor]


def open_centers(directory: str) -> SavedCenters:
    """Map the centers of the head checkpoint under ``directory/head`` without a ``PartialFC``
    or a process group (offline tools); only the rows that are read come from disk.

    Raises:
        FileNotFoundError: ``directory/head`` is missing or holds no shard file.
        ValueError: overlapping shards, an unknown format, shards that disagree on
            num_classes/embedding_size/num_subcenters, a weight of the wrong shape, or classes
            no shard covers (the message names the file or the ranges).
    """
    folder = head_dir(directory)
    shards = _list_shards(folder)
    if not shards:
        raise FileNotFoundError(f"no shard_<start>_<end>.pt in {folder}")
    starts, weights, meta = [], [], None
    for s, e, path in shards:
        payload = _read_shard(path)
        sizes = _saved_sizes(payload, path)
        if meta not in (None, sizes):
            raise ValueError(f"{path}: {sizes} but other shards of {folder} have {meta}")
        meta = sizes
        weight = payload["weight"]
        rows = ((e - s) * sizes["num_subcenters"], sizes["embedding_size"])
        if tuple(weight.shape) != rows:
            raise ValueError(f"{path}: weight {tuple(weight.shape)}, expected {rows}")
        starts.append(s)
        weights.append(weight)
    assert meta is not None
    gaps = _gaps(shards, 0, meta["num_classes"])
    if gaps:
        raise ValueError(f"{folder} does not cover classes {gaps}")
    return SavedCenters(
        meta["num_classes"], meta["num_subcenters"], meta["embedding_size"], starts, weights
    )


def centers_of(saved: SavedCenters, classes: torch.Tensor) -> torch.Tensor:
    """The ``(M, S, D)`` fp32 centers (all S sub-centers) of the ``(M,)`` int64 global class
    ids ``classes``, any order, repeats allowed.

    Raises:
        ValueError: a class id outside ``[0, num_classes)``.
    """
    classes = classes.long().reshape(-1)
    if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= saved.num_classes):
        raise ValueError(
            f"class ids must be in [0, {saved.num_classes}), got "
            f"[{int(classes.min())}, {int(classes.max())}]"
        )
    k, d = saved.num_subcenters, saved.embedding_size
    starts = torch.tensor(saved.starts, dtype=torch.long)
    shard = torch.searchsorted(starts, classes, right=True) - 1
    out = torch.empty(classes.numel(), k, d)
    for i in torch.unique(shard).tolist():
        sel = torch.nonzero(shard == i).squeeze(1)
        out[sel] = saved.weights[i].view(-1, k, d)[classes[sel] - saved.starts[i]]
    return out
