"""NVIDIA DALI training loader for insightface ``.rec`` files (GPU decode, CPU fallback).

The pipeline is ``fn.external_source`` (encoded images and labels of this rank's next batch) ->
``fn.decoders.image`` (``mixed`` on a GPU, ``cpu`` otherwise) -> with ``data.augment``: resize,
Gaussian blur and HSV operators fed the CPU loader's per-sample parameters ->
``fn.crop_mirror_normalize`` as a mirror only (the CPU loader's flips), uint8 NHWC out.

Batches leave DALI as uint8 ``(B, H, W, 3)``, the CPU loader's hand-over: the step normalizes
them once, on the device, straight into its dtype (bf16/fp16/fp32) and memory format
(``trainer/device_batch.py``, ``data.decode.normalize``). A float32 NCHW hand-over made 4x the
bytes in DALI's output buffers and cost the step a second pass (cast + re-layout to
channels_last) before the backbone.

The sample order is the CPU loader's: ``DistributedShardSampler`` over the image index (a global
permutation per epoch, rank r takes every W-th position), so DALI and CPU runs see the same
batches. DALI's own ``fn.readers.mxnet`` cannot do that: it sorts the index by offset, shards it
into contiguous ranges and shuffles only inside a buffer (``initial_fill``), which on an
identity-sorted ``.rec`` puts a few hundred identities in each window. Records are read with
``os.pread`` at the offsets of a numpy ``ImageIndex`` (8 B/image, memory-mapped and shared per
node, see ``data.image_index``), so a resume starts reading at its offset: skipped batches are
neither read nor decoded. Flips are the CPU loader's ``flip_mask(sample, seed, epoch)``, so they
too survive a resume and match the CPU loader.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from typing import Any

import numpy as np
import torch

from data.augment import AugmentSpec, sample_params
from data.image_index import ImageIndex, shared_image_index
from data.loader import ResumableLoader, flip_mask
from data.recordio import RecordIOError, RecordIOReader, record_label, unpack
from data.sampler import DistributedShardSampler

__all__ = ["DaliLoader", "build_dali_loader"]


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


def _seed_for(seed: int, epoch: int, rank: int) -> int:
    digest = hashlib.sha1(f"{seed}:{epoch}:{rank}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class DaliLoader(ResumableLoader):
    """Iterable over ``(images, labels)`` batches of one rank, same protocol as ``TrainLoader``.

    Yields:
        images: uint8 (B, H, W, 3) RGB, flipped (``trainer.device_batch.to_device`` normalizes
        them to the step's dtype and layout); labels: int64 (B,). On ``cuda:device_id`` when a
        device is given, else on the CPU.

    ``len()`` is ``(num_images // world_size) // batch_size`` (the sampler's full epoch).
    ``state_dict()`` is the sampler's ``{"epoch", "offset"}`` (offset in global samples handed
    out), so a run resumes under any world size; the next ``iter()`` reads from that offset on.
    ``records_read`` counts the records the current/last iteration read (prefetch included).
    Labels are not range-checked here (``RecordDataset.scan_labels`` samples them at start-up).
    """

    def __init__(
        self,
        rec_path: str,
        index: ImageIndex,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        device_id: int | None,
        num_threads: int,
        flip: bool,
        image_size: int,
        shuffle: bool = True,
        augment: AugmentSpec | None = None,
    ) -> None:
        self.rec_path = rec_path
        self.index = index
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.device_id = device_id
        self.num_threads = max(1, int(num_threads))  # DALI needs >= 1 (data.num_workers may be 0)
        self.flip = flip
        self.image_size = image_size
        self.augment = augment if augment is not None and augment.enabled else None
        self.sampler = DistributedShardSampler(
            len(index), rank, world_size, seed, shuffle=shuffle, drop_last=True
        )
        self.records_read = 0
        self._start = 0  # global offset the current iteration started at
        self._batches = 0  # batches handed out by the current iteration

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def _source(self, order: Iterator[int], num_batches: int) -> Iterator[tuple[Any, ...]]:
        """Encoded payloads (uint8 arrays), int64 labels and int32 mirror flags per batch, and
        with ``augment`` the per-sample arguments of the augmentation operators (``_AUG``).

        Records are read by ``num_threads`` threads (``os.pread`` releases the GIL, which hides
        network-storage latency) one batch ahead of the batch handed to DALI.
        """
        reader = RecordIOReader(self.rec_path)
        reader._pread(0, 0)  # open the shared descriptor once, before the threads use it
        offsets, keys, epoch = self.index.offsets, self.index.keys, self.sampler.epoch

        def read(i: int) -> tuple[int, np.ndarray]:
            try:
                header, payload = unpack(reader.read_at(int(offsets[i]))[0])
            except RecordIOError as e:
                raise RecordIOError(f"{e} (key {int(keys[i])})") from None
            return record_label(header), np.frombuffer(payload, dtype=np.uint8)

        def finish(
            ids: np.ndarray, futures: list[Future[tuple[int, np.ndarray]]]
        ) -> tuple[Any, ...]:
            records = [f.result() for f in futures]
            labels = np.array([label for label, _ in records], dtype=np.int64)
            mirror = flip_mask(ids, self.seed, epoch) if self.flip else np.zeros(len(ids))
            self.records_read += len(records)
            out: tuple[Any, ...] = (
                [payload for _, payload in records],
                labels,
                mirror.astype(np.int32),
            )
            if self.augment is None:
                return out
            return out + _augment_args(self.augment, ids, self.seed, epoch, self.image_size)

        pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="dali-read")
        ahead: deque[tuple[np.ndarray, list[Future[tuple[int, np.ndarray]]]]] = deque()
        try:
            for _ in range(num_batches):
                ids = np.fromiter(islice(order, self.batch_size), dtype=np.int64)
                ahead.append((ids, [pool.submit(read, i) for i in ids.tolist()]))
                if len(ahead) == 2:
                    yield finish(*ahead.popleft())
            while ahead:
                yield finish(*ahead.popleft())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            reader.close()

    def _build(self, source: Iterator[tuple[Any, ...]]) -> Any:
        dali = _import_dali()
        fn, types = dali.fn, dali.types
        gpu = self.device_id is not None
        pipe = dali.Pipeline(
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=self.device_id,
            seed=_seed_for(self.seed, self.sampler.epoch, self.rank),
            prefetch_queue_depth=2,
        )
        extra = len(_AUG) if self.augment is not None else 0
        with pipe:
            jpegs, labels, mirror, *args = fn.external_source(
                source=source,
                num_outputs=3 + extra,
                batch=True,
                dtype=[types.UINT8, types.INT64, types.INT32]
                + [getattr(types, t) for _, t in _AUG[:extra]],
            )
            images = fn.decoders.image(
                jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB
            )
            if args:
                named = dict(zip((name for name, _ in _AUG), args))
                images = _augment_ops(fn, images, named, self.image_size)
            # mirror only: normalization runs in the step's dtype on the device
            images = fn.crop_mirror_normalize(
                images, dtype=types.UINT8, output_layout="HWC", mirror=mirror
            )
            pipe.set_outputs(images, labels.gpu() if gpu else labels)
        pipe.build()
        return pipe

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        self._start = self.sampler.start_offset
        self._batches = 0
        self.records_read = 0
        num_batches = self.sampler.per_rank(self._start) // self.batch_size
        order = iter(self.sampler)  # starts at a resumed offset: skipped samples are never read
        if num_batches == 0:
            return
        pipe = self._build(self._source(order, num_batches))
        it = DALIGenericIterator(pipe, ["images", "labels"], last_batch_policy=LastBatchPolicy.DROP)
        try:
            for out in it:
                images, labels = out[0]["images"], out[0]["labels"].reshape(-1)
                if tuple(images.shape[1:]) != (self.image_size, self.image_size, 3):
                    raise ValueError(
                        f"{self.rec_path}: DALI loader expects {self.image_size}x"
                        f"{self.image_size} images, got shape {tuple(images.shape)}"
                    )
                self._batches += 1
                yield images, labels
        finally:
            del it, pipe  # release the per-epoch pipeline's threads and buffers


# per-sample argument inputs of the augmentation operators: (name, DALI type name)
_AUG = (
    ("roi_start", "FLOAT"),
    ("roi_end", "FLOAT"),
    ("side", "FLOAT"),
    ("window", "INT32"),
    ("sigma", "FLOAT"),
    ("hue", "FLOAT"),
    ("saturation", "FLOAT"),
)


def _augment_args(
    spec: AugmentSpec, ids: np.ndarray, seed: int, epoch: int, size: int
) -> tuple[list[np.ndarray], ...]:
    """``data.augment.sample_params`` of a batch as DALI argument inputs (lists of arrays)."""
    p = sample_params(spec, ids, seed, epoch, size)
    roi = p["roi"].astype(np.float32)
    columns = {
        "roi_start": roi[:, [1, 0]],  # DALI's ROI follows the shape order: (y, x)
        "roi_end": roi[:, [3, 2]],
        "side": p["side"].astype(np.float32),
        "window": p["window"],
        "sigma": p["sigma"],
        "hue": p["hue"],
        "saturation": p["saturation"],
    }
    return tuple([np.ascontiguousarray(v) for v in columns[name]] for name, _ in _AUG)


def _augment_ops(fn: Any, images: Any, a: dict[str, Any], size: int) -> Any:
    """``data.augment.apply_cpu`` in DALI operators: crop + resize to ``side`` (antialiased when
    shrinking), back to ``size``, Gaussian blur (window 1: identity), ``fn.hsv`` (hue 0 and
    saturation 1: identity). Each is exact for the samples that did not draw it."""
    images = fn.resize(
        images,
        roi_start=a["roi_start"],
        roi_end=a["roi_end"],
        roi_relative=False,
        resize_x=a["side"],
        resize_y=a["side"],
    )
    images = fn.resize(images, resize_x=size, resize_y=size)
    images = fn.gaussian_blur(images, window_size=a["window"], sigma=a["sigma"])
    return fn.hsv(images, hue=a["hue"], saturation=a["saturation"])


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
    cache_dir: str | None = None,
    shuffle: bool = True,
    index: ImageIndex | None = None,
    local_rank: int = 0,
    barrier: Callable[[], None] | None = None,
    augment: AugmentSpec | None = None,
) -> DaliLoader:
    """Build the DALI training loader of one rank for an insightface/MXNet ``.rec`` file.

    Args:
        rec_path, idx_path: the RecordIO pair (idx default: ``rec_path`` with ``.idx``).
        batch_size: per-rank batch size B.
        rank, world_size: this process' place among the data-parallel ranks.
        seed: fixes the epoch permutation (same as the CPU loader's) and, with epoch and rank,
            the flips.
        device_id: CUDA device for ``mixed`` decoding and GPU outputs; None: CPU only.
        num_threads: DALI CPU worker threads (0 is taken as 1).
        flip: random horizontal flip with p = 0.5.
        image_size: expected H = W of the stored images.
        cache_dir: node-local folder for the shared image index (``shared_image_index``).
        shuffle: a new global permutation per epoch (off: index order).
        index: a prebuilt ``ImageIndex`` (e.g. the dataset's); default: ``shared_image_index``
            with ``local_rank`` and ``barrier``.
        augment: ``data.augment`` steps after decoding, with the CPU loader's parameters
            (``data.augment.sample_params``; None or all probabilities 0: none).

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
    if index is None:
        index = shared_image_index(rec_path, idx_path, cache_dir, local_rank, barrier)
    n = len(index)
    if (n // world_size) // batch_size < 1:
        raise ValueError(
            f"{rec_path}: {n} images cannot fill one batch of {batch_size} on {world_size} ranks"
        )
    return DaliLoader(
        rec_path,
        index,
        batch_size,
        rank,
        world_size,
        seed,
        device_id,
        num_threads,
        flip,
        image_size,
        shuffle,
        augment,
    )
