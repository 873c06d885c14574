"""The image records of an insightface ``.rec`` as numpy arrays, built once per node and shared.

At WebFace42M scale (42M images) a Python dict/list index costs ~158 B/entry (~6.7 GB per rank).
``ImageIndex`` holds one int64 offset per image (keys are a ``range`` in insightface files), and
``shared_image_index`` lets local rank 0 parse the ``.idx`` once and save the offsets as ``.npy``
in a node-local cache; the other ranks wait at a barrier and memory-map the file, so the pages are
shared through the page cache instead of being rebuilt on every rank.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from data.atomic import atomic_path, write_text_atomic
from data.recordio import Keys, RecordIOReader, unpack
from data.recordio_index import lookup_offsets

__all__ = ["ImageIndex", "build_image_index", "image_index_of", "shared_image_index"]


@dataclass(frozen=True)
class ImageIndex:
    """Where the image records of a ``.rec`` file are.

    Attributes:
        keys: image record keys in file order: a ``range`` (insightface: ``range(1, first_id)``)
            or an int64 array (N,).
        offsets: int64 array (N,), byte offset of each image record in the ``.rec``.
        identity_keys: ``(first, end)`` key range of the identity records named by insightface's
            header record (key 0), or None without such a header.
        cache: the cache entry the arrays are memory-mapped from (``shared_image_index``), or
            None. Such an index pickles as this path (DataLoader workers started with ``spawn``
            map the same file instead of receiving a copy).
    """

    keys: Keys
    offsets: NDArray[np.int64]
    identity_keys: tuple[int, int] | None = None
    cache: str | None = None

    def __reduce__(self) -> tuple[Callable[..., ImageIndex], tuple[object, ...]]:
        if self.cache is not None:
            return _reload, (self.cache,)
        return ImageIndex, (self.keys, self.offsets, self.identity_keys)

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays (a range of keys costs nothing)."""
        keys = 0 if isinstance(self.keys, range) else self.keys.nbytes
        return self.offsets.nbytes + keys


def _default_idx(rec_path: str) -> str:
    return os.path.splitext(rec_path)[0] + ".idx"


def build_image_index(rec_path: str, idx_path: str | None = None) -> ImageIndex:
    """Parse ``idx_path`` (default: ``rec_path`` with ``.idx``) and keep the image records.

    Raises: as ``image_index_of``; RecordIOError for missing files or a malformed index.
    """
    idx_path = idx_path or _default_idx(rec_path)
    return image_index_of(RecordIOReader(rec_path, idx_path), rec_path)


def image_index_of(reader: RecordIOReader, rec_path: str) -> ImageIndex:
    """The image records of an open ``reader`` (``rec_path`` is the name used in errors).

    insightface writes a header at key 0 with ``flag > 0`` and ``label = [first_identity_key,
    end_identity_key]``: images are keys ``range(1, first_identity_key)``; without such a header
    every key is an image. Reference: insightface arcface_torch ``dataset.py``.

    Raises:
        ValueError: no records, or a header naming image keys missing from the index.
    """
    if not len(reader):
        raise ValueError(f"{rec_path}: the index lists no records")
    if 0 not in reader:
        return ImageIndex(reader.keys, reader.offsets)
    header, _ = unpack(reader.read(0))
    if header.flag <= 0:
        return ImageIndex(reader.keys, reader.offsets)
    label = np.asarray(header.label).reshape(-1)
    end = int(label[0])
    ids = (end, int(label[1])) if label.size >= 2 else None
    keys = range(1, end)
    if not keys:
        raise ValueError(f"{rec_path} key 0: header says there are no images (label={end})")
    if isinstance(reader.keys, range) and reader.keys.start <= 1 and end <= reader.keys.stop:
        start = 1 - reader.keys.start
        return ImageIndex(keys, reader.offsets[start : start + len(keys)], ids)  # a view
    found, offsets = lookup_offsets(reader.keys, reader.offsets, np.arange(1, end), reader._order)
    if not found.all():
        missing = int(np.flatnonzero(~found)[0]) + 1
        raise ValueError(
            f"{rec_path} key 0: header declares image keys 1..{end - 1} but key "
            f"{missing} is not in the index"
        )
    return ImageIndex(keys, offsets, ids)


def _cache_name(rec_path: str, idx_path: str) -> str:
    stamp = "|".join(
        f"{os.path.abspath(p)}:{os.path.getsize(p)}:{os.path.getmtime(p)}"
        for p in (rec_path, idx_path)
    )
    digest = hashlib.sha1(stamp.encode()).hexdigest()[:16]
    return f"{os.path.basename(rec_path)}.{digest}"


def _save(index: ImageIndex, base: str) -> None:
    # nodes may share the cache folder: each file is written, then renamed
    meta: dict[str, int | tuple[int, int] | list[int] | None] = {
        "n": len(index),
        "identity_keys": index.identity_keys,
    }
    with atomic_path(f"{base}.offsets.npy") as tmp:
        np.save(tmp, index.offsets)
    if isinstance(index.keys, range):
        meta["keys"] = [index.keys.start, index.keys.stop]
    else:
        with atomic_path(f"{base}.keys.npy") as tmp:
            np.save(tmp, index.keys)
    write_text_atomic(f"{base}.json", json.dumps(meta))  # last: marks the entry complete


def _load(base: str) -> ImageIndex | None:
    if not os.path.isfile(f"{base}.json"):
        return None
    with open(f"{base}.json") as fh:
        meta = json.load(fh)
    offsets = np.load(f"{base}.offsets.npy", mmap_mode="r")
    keys: Keys
    if "keys" in meta:
        keys = range(*meta["keys"])
    else:
        keys = np.load(f"{base}.keys.npy", mmap_mode="r")
    if len(offsets) != meta["n"] or len(keys) != meta["n"]:
        return None
    ids = meta["identity_keys"]
    return ImageIndex(keys, offsets, (int(ids[0]), int(ids[1])) if ids else None, base)


def _reload(base: str) -> ImageIndex:
    index = _load(base)
    if index is None:
        raise RuntimeError(f"image index cache {base}.json is gone (unpickling an ImageIndex)")
    return index


def shared_image_index(
    rec_path: str,
    idx_path: str | None = None,
    cache_dir: str | None = None,
    local_rank: int = 0,
    barrier: Callable[[], None] | None = None,
) -> ImageIndex:
    """The ``ImageIndex`` of ``rec_path``, parsed by local rank 0 and memory-mapped by all.

    Local rank 0 builds the index unless the cache holds it, saves it, then every rank calls
    ``barrier`` once and the others load it with ``mmap_mode="r"`` (pages shared per node).

    Args:
        rec_path, idx_path: the RecordIO pair (idx default: ``rec_path`` with ``.idx``).
        cache_dir: node-local folder; default ``<tmp>/arcscale_index-<uid>``. Entries are named by a
            hash of the absolute paths, sizes and modification times (a changed file: new entry).
        local_rank: this process' rank on its node. barrier: a collective all processes call
            (e.g. ``torch.distributed.barrier``); None for a single process.

    Returns:
        ``ImageIndex`` with memory-mapped arrays.

    Raises:
        ValueError / RecordIOError: as ``build_image_index`` (on local rank 0; the others raise
            RuntimeError naming the missing cache entry).
    """
    idx_path = idx_path or _default_idx(rec_path)
    if not (os.path.isfile(rec_path) and os.path.isfile(idx_path)):
        return build_image_index(rec_path, idx_path)  # raises RecordIOError naming the file
    user = getattr(os, "getuid", lambda: "")()  # per user: another user's folder is not ours
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), f"arcscale_index-{user}")
    base = os.path.join(cache_dir, _cache_name(rec_path, idx_path))
    error = None
    if local_rank == 0 and _load(base) is None:
        try:
            os.makedirs(cache_dir, exist_ok=True)
            _save(build_image_index(rec_path, idx_path), base)
        except Exception as exc:  # still meet the others at the barrier, then raise
            error = exc
    if barrier is not None:
        barrier()
    if error is not None:
        raise error
    index = _load(base)
    if index is None:
        raise RuntimeError(
            f"{rec_path}: index cache {base}.json missing after the barrier (local rank 0 failed "
            f"to write it, or cache_dir {cache_dir} is not shared by the ranks of this node)"
        )
    return index
