"""NVIDIA DALI training loader for insightface ``.rec`` files (GPU decode, CPU fallback).

The pipeline is ``fn.readers.mxnet`` (sharded by rank, buffer-shuffled) -> ``fn.decoders.image``
(``mixed`` on a GPU, ``cpu`` otherwise) -> ``fn.crop_mirror_normalize`` (coin-flip mirror,
``(x - 127.5) / 127.5`` = ``(x/255 - 0.5)/0.5``, NCHW float32). A fresh pipeline is built per
epoch with a seed derived from ``(seed, epoch, rank)``, and each epoch's shard is
``(rank + epoch) % world_size``, so a run is reproducible and every rank sees all shards.

DALI reads the byte size of a record from the next offset in the index and fails on the
empty-payload header/identity records of insightface files, so the reader gets a filtered
index with only the image keys, written to a cache folder.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import torch

from data.datasets import image_keys_of
from data.recordio import RecordIOReader

__all__ = ["DaliLoader", "build_dali_loader", "write_image_index"]

_READER = "Reader"


def _import_dali() -> Any:
    try:
        import nvidia.dali as dali
        import nvidia.dali.plugin.pytorch  # noqa: F401  (registers the torch iterator)
    except ImportError as exc:
        raise ImportError(
            "data/dali_loader.py needs NVIDIA DALI: pip install 'nvidia-dali-cuda120==2.4.0' "
            "(the project's 'dali' extra), or use the CPU loader (data.build_cpu_loader)"
        ) from exc
    return dali


def _default_idx(rec_path: str) -> str:
    return os.path.splitext(rec_path)[0] + ".idx"


def write_image_index(rec_path: str, idx_path: str | None = None, cache_dir: str | None = None):
    """Write an index with only the image records of ``rec_path`` (see module doc).

    Args:
        rec_path, idx_path: the RecordIO pair (idx default: ``rec_path`` with ``.idx``).
        cache_dir: where to write; default ``<tmp>/arcscale_dali``. The file name hashes the
            absolute paths, sizes and modification times, so a changed dataset gets a new file.

    Returns:
        ``(path, num_images)``: the filtered ``.idx`` and its number of entries.

    Raises:
        ValueError: a malformed index line (naming file and line) or a header record that does
            not match the index. FileNotFoundError: missing files.
    """
    idx_path = idx_path or _default_idx(rec_path)
    keys = set(image_keys_of(RecordIOReader(rec_path, idx_path), rec_path))
    stamp = "|".join(
        f"{os.path.abspath(p)}:{os.path.getsize(p)}:{os.path.getmtime(p)}"
        for p in (rec_path, idx_path)
    )
    digest = hashlib.sha1(stamp.encode()).hexdigest()[:16]
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "arcscale_dali")
    os.makedirs(cache_dir, exist_ok=True)
    out = os.path.join(cache_dir, f"{os.path.basename(rec_path)}.{digest}.images.idx")
    if os.path.isfile(out):
        with open(out) as fh:
            return out, sum(1 for _ in fh)
    lines = []
    with open(idx_path) as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.split()
            if not parts:
                continue  # trailing blank line
            if len(parts) != 2 or not parts[0].isdigit() or not parts[1].isdigit():
                raise ValueError(
                    f"{idx_path} line {lineno}: expected 'key<TAB>offset', got {line!r}"
                )
            if int(parts[0]) in keys:
                lines.append(f"{parts[0]}\t{parts[1]}\n")
    if len(lines) != len(keys):
        raise ValueError(f"{idx_path}: {len(keys)} image keys but {len(lines)} found in the index")
    tmp = f"{out}.{os.getpid()}.tmp"  # ranks may race on a shared cache: write, then rename
    with open(tmp, "w") as fh:
        fh.writelines(lines)
    os.replace(tmp, out)
    return out, len(lines)


def _seed_for(seed: int, epoch: int, rank: int) -> int:
    digest = hashlib.sha1(f"{seed}:{epoch}:{rank}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class DaliLoader:
    """Iterable over ``(images, labels)`` batches of one rank, same protocol as ``TrainLoader``.

    Yields:
        images: float32 (B, 3, H, W) in [-1, 1]; labels: int64 (B,). On ``cuda:device_id`` when
        a device is given, else on the CPU.

    ``len()`` is ``(num_images // world_size) // batch_size`` on every rank (the shards DALI cuts
    may differ by one sample; the extra batches are not read). ``state_dict()`` is
    ``{"epoch", "offset"}`` with offset in global samples; resuming fast-forwards by running
    (and discarding) the consumed batches of the epoch, so it needs the same world size and
    batch size. Labels are not range-checked here (``RecordDataset`` checks them on the CPU path).
    """

    def __init__(
        self,
        rec_path: str,
        index_path: str,
        num_images: int,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        device_id: int | None,
        num_threads: int,
        flip: bool,
        image_size: int,
        initial_fill: int,
        shuffle: bool = True,
    ) -> None:
        self.rec_path = rec_path
        self.index_path = index_path
        self.num_images = num_images
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.device_id = device_id
        self.num_threads = num_threads
        self.flip = flip
        self.image_size = image_size
        self.initial_fill = initial_fill
        self.shuffle = shuffle
        self.epoch = 0
        self._skip = 0  # batches to fast-forward on the next iteration (after a resume)
        self._batches = 0

    def __len__(self) -> int:
        return (self.num_images // self.world_size) // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; a pending resume survives only the same epoch."""
        if int(epoch) != self.epoch:
            self.epoch = int(epoch)
            self._skip = 0
            self._batches = 0

    def state_dict(self) -> dict:
        """``{"epoch": e, "offset": global samples handed out in epoch e}``."""
        done = self._skip or self._batches
        return {"epoch": self.epoch, "offset": done * self.batch_size * self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue epoch ``state["epoch"]`` at ``state["offset"]`` on the next ``iter()``.

        Raises:
            ValueError: missing keys, or an offset that is not a whole number of global batches
                of this loader (it was saved under another world size or batch size).
        """
        if not {"epoch", "offset"} <= set(state):
            raise ValueError(f"DaliLoader.load_state_dict: need 'epoch' and 'offset', got {state}")
        step = self.batch_size * self.world_size
        offset = int(state["offset"])
        if offset % step or offset // step > len(self):
            raise ValueError(
                f"DaliLoader.load_state_dict: offset {offset} is not a whole number of global "
                f"batches ({step} samples) within the epoch; DALI resumes only with the same "
                "world size and batch size"
            )
        self.epoch = int(state["epoch"])
        self._skip = offset // step
        self._batches = 0

    def _build(self) -> Any:
        dali = _import_dali()
        fn, types = dali.fn, dali.types
        gpu = self.device_id is not None
        pipe = dali.Pipeline(
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=self.device_id,
            seed=_seed_for(self.seed, self.epoch, self.rank),
            prefetch_queue_depth=2,
        )
        with pipe:
            jpegs, labels = fn.readers.mxnet(
                path=[self.rec_path],
                index_path=[self.index_path],
                shard_id=(self.rank + self.epoch) % self.world_size,
                num_shards=self.world_size,
                random_shuffle=self.shuffle,
                initial_fill=self.initial_fill,
                name=_READER,
            )
            images = fn.decoders.image(
                jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB
            )
            mirror = fn.random.coin_flip(probability=0.5) if self.flip else 0
            images = fn.crop_mirror_normalize(
                images,
                dtype=types.FLOAT,
                output_layout="CHW",
                mean=[127.5] * 3,
                std=[127.5] * 3,
                mirror=mirror,
            )
            labels = fn.cast(labels[0], dtype=types.INT64)  # first element = class id
            pipe.set_outputs(images, labels.gpu() if gpu else labels)
        pipe.build()
        return pipe

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        pipe = self._build()
        it = DALIGenericIterator(
            pipe,
            ["images", "labels"],
            reader_name=_READER,
            last_batch_policy=LastBatchPolicy.DROP,
        )
        total, skip = len(self), self._skip
        self._skip = 0
        self._batches = skip
        try:
            for i, out in enumerate(it):
                if i >= total:
                    break
                if i < skip:
                    continue
                images, labels = out[0]["images"], out[0]["labels"].reshape(-1)
                if tuple(images.shape[1:]) != (3, self.image_size, self.image_size):
                    raise ValueError(
                        f"{self.rec_path}: DALI loader expects {self.image_size}x"
                        f"{self.image_size} images, got shape {tuple(images.shape)}"
                    )
                self._batches += 1
                yield images, labels
        finally:
            del it, pipe  # release the per-epoch pipeline's threads and buffers


def build_dali_loader(
    rec_path: str,
    idx_path: str | None,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    device_id: int | None = None,
    num_threads: int = 2,
    flip: bool = True,
    image_size: int = 112,
    initial_fill: int = 4096,
    cache_dir: str | None = None,
    shuffle: bool = True,
) -> DaliLoader:
    """Build the DALI training loader of one rank for an insightface/MXNet ``.rec`` file.

    Args:
        rec_path, idx_path: the RecordIO pair (idx default: ``rec_path`` with ``.idx``).
        batch_size: per-rank batch size B.
        rank, world_size: this process' place among the data-parallel ranks.
        seed: fixes shuffling and flips (with the epoch and rank).
        device_id: CUDA device for ``mixed`` decoding and GPU outputs; None: CPU only.
        num_threads: DALI CPU worker threads.
        flip: random horizontal flip with p = 0.5.
        image_size: expected H = W of the stored images.
        initial_fill: DALI shuffle-buffer size (samples); the shuffle is local to it.
        cache_dir: folder for the filtered index (see ``write_image_index``).
        shuffle: buffer-shuffle the shard (off: index order, e.g. to compare with the CPU path).

    Returns:
        ``DaliLoader``.

    Raises:
        ImportError: DALI not installed. ValueError: bad sizes or a malformed index/header.
    """
    _import_dali()
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"build_dali_loader: need batch_size >= 1 and 0 <= rank < world_size, got "
            f"batch_size={batch_size}, rank={rank}, world_size={world_size}"
        )
    index, n = write_image_index(rec_path, idx_path, cache_dir)
    if (n // world_size) // batch_size < 1:
        raise ValueError(
            f"{rec_path}: {n} images cannot fill one batch of {batch_size} on {world_size} ranks"
        )
    return DaliLoader(
        rec_path,
        index,
        n,
        batch_size,
        rank,
        world_size,
        seed,
        device_id,
        num_threads,
        flip,
        image_size,
        initial_fill,
        shuffle,
    )
