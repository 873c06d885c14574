"""CPU training loader: DataLoader workers decode and flip, and hand over uint8 NHWC batches.

Workers ship uint8 (4x smaller than float32, pinned by the DataLoader on CUDA hosts); the step
normalizes on the device (``trainer/device_batch.py``). The flip decision of a sample is a hash
of ``(seed, epoch, sample index)``, so it is the same for any worker count and after a resume;
the sampler tags each index with its epoch so that the workers can compute it.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader

from data.augment import AugmentSpec, apply_cpu, sample_params, splitmix64
from data.datasets import CorruptRecordError
from data.sampler import DistributedShardSampler

__all__ = ["ResumableLoader", "TrainLoader", "build_cpu_loader", "flip_mask"]

_MASK64 = (1 << 64) - 1


def flip_mask(indices: np.ndarray | torch.Tensor, seed: int, epoch: int) -> np.ndarray:
    """Horizontal-flip decisions (p = 0.5) for dataset ``indices`` in ``epoch``.

    Returns:
        bool array of the same length; a pure function of ``(seed, epoch, index)``.
    """
    idx = np.asarray(indices, dtype=np.int64).astype(np.uint64)
    key = splitmix64(np.array([seed & _MASK64], dtype=np.uint64))
    key = splitmix64(key ^ np.uint64(epoch & _MASK64))
    return (splitmix64(idx ^ key) >> np.uint64(63)).astype(bool)


class _EpochTagged:
    """Sampler view yielding ``(index, epoch)``: the workers need the epoch for the flips."""

    def __init__(self, sampler: DistributedShardSampler) -> None:
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.sampler.epoch
        return ((i, epoch) for i in self.sampler)


class _IndexedUint8:
    """Dataset view of ``(index, epoch)`` keys returning ``(uint8 HWC image, label, index, epoch,
    corrupt message or None)``, checking the image shape. With ``skip_corrupt`` a
    ``CorruptRecordError`` item is replaced by the next readable index (the batch keeps its
    size, which the all-gather needs)."""

    def __init__(self, dataset: Any, image_size: int, skip_corrupt: bool = False) -> None:
        self.dataset = dataset
        self.shape = (image_size, image_size, 3)
        self.skip_corrupt = skip_corrupt

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[np.ndarray, int, int, int, str | None]:
        index, epoch = key
        try:
            image, label = self.dataset[index]
            note = None
        except CorruptRecordError as e:
            if not self.skip_corrupt:
                raise
            index, image, label = self._replacement(index, e)
            note = str(e)
        if (
            not isinstance(image, np.ndarray)
            or image.dtype != np.uint8
            or image.shape != self.shape
        ):
            got = (
                type(image).__name__,
                getattr(image, "dtype", None),
                getattr(image, "shape", None),
            )
            raise ValueError(
                f"{type(self.dataset).__name__} index {index}: the CPU loader needs uint8 images "
                f"of shape {self.shape} (no dataset transform), got {got}"
            )
        return image, int(label), int(index), epoch, note

    def _replacement(self, index: int, first: Exception) -> tuple[int, Any, Any]:
        n = len(self.dataset)
        for step in range(1, min(n, 64)):
            try:
                j = (index + step) % n
                return (j, *self.dataset[j])
            except CorruptRecordError:
                continue
        raise RuntimeError(f"data.skip_corrupt: no readable record near index {index}: {first}")


class _FlipCollate:
    """Batch collation in the worker: augments (``data.augment``, when a step is enabled) and
    stacks the uint8 images, mirroring those that ``flip_mask`` picks (``cv2.flip``: ~0.6 ms per
    128 images of 112x112, where ``np.stack`` of reversed views or a masked torch flip take
    ~6 ms).

    Returns ``(images uint8 (B, H, W, 3), labels int64 (B,), corrupt messages)``.
    """

    def __init__(self, seed: int, flip: bool, augment: AugmentSpec | None = None) -> None:
        self.seed = seed
        self.flip = flip
        self.augment = augment if augment is not None and augment.enabled else None

    def __call__(
        self, items: list[tuple[np.ndarray, int, int, int, str | None]]
    ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        images = [it[0] for it in items]
        ids, epoch = np.array([it[2] for it in items]), items[0][3]
        if self.augment is not None:
            size = images[0].shape[0]
            params = sample_params(self.augment, ids, self.seed, epoch, size)
            images = [apply_cpu(img, params, i) for i, img in enumerate(images)]
        if self.flip:
            mask = flip_mask(ids, self.seed, epoch)
            images = [cv2.flip(img, 1) if m else img for img, m in zip(images, mask)]
        labels = torch.tensor([it[1] for it in items], dtype=torch.int64)
        corrupt = [it[4] for it in items if it[4] is not None]
        return torch.from_numpy(np.stack(images)), labels, corrupt


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader generator; align numpy/random for transforms
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class ResumableLoader:
    """Epoch selection and mid-epoch resume of a loader over a ``DistributedShardSampler``
    (the CPU and the DALI loader): ``state_dict()`` is ``{"epoch", "offset"}`` with offset in
    global samples, counting only the batches handed out (``_batches``) since the iteration
    started at global offset ``_start``; subclasses set both in ``__iter__``."""

    sampler: DistributedShardSampler
    batch_size: int
    _start: int
    _batches: int

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (a pending mid-epoch resume survives only the same epoch)."""
        if int(epoch) != self.sampler.epoch:
            self._start = 0
            self._batches = 0
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict[str, int]:
        """``{"epoch": e, "offset": global samples handed out in epoch e}``."""
        if self.sampler.start_offset:  # loaded, not yet iterated
            return self.sampler.state_dict()
        return self.sampler.state_after(self._batches * self.batch_size, start=self._start)

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue epoch ``state["epoch"]`` at ``state["offset"]`` on the next ``iter()``; call
        ``set_epoch`` with the same epoch.

        Raises:
            ValueError: missing keys or an offset outside the epoch (from the sampler).
        """
        self.sampler.load_state_dict(state)
        self._start = self.sampler.start_offset
        self._batches = 0


class TrainLoader(ResumableLoader):
    """Iterable over ``(images, labels)`` batches of one rank, resumable mid-epoch.

    Yields:
        images: uint8 (B, H, W, 3) RGB, randomly flipped, pinned when the DataLoader pins
            (``trainer.device_batch.to_device`` normalizes them on the device).
        labels: int64 (B,).

    ``len()`` is the number of batches per rank in a full epoch. ``state_dict()`` is
    ``{"epoch", "offset"}`` with offset in global samples (see ``DistributedShardSampler``),
    counting only the batches already handed out, not the ones prefetched by workers.
    ``corrupt`` lists the messages of the records this rank skipped in the current iteration
    (``skip_corrupt``; each was replaced by the next readable sample).
    """

    def __init__(
        self,
        loader: DataLoader[Any],
        sampler: DistributedShardSampler,
        batch_size: int,
    ) -> None:
        self.loader = loader
        self.sampler = sampler
        self.batch_size = batch_size
        self._start = 0
        self._batches = 0
        self.corrupt: list[str] = []  # records skipped by this rank in the current iteration

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.sampler.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._start = self.sampler.start_offset
        self._batches = 0
        self.corrupt = []
        for images, labels, corrupt in self.loader:
            self.corrupt.extend(corrupt)
            self._batches += 1
            yield images, labels


def build_cpu_loader(
    dataset: Any,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    num_workers: int = 2,
    shuffle: bool = True,
    drop_last: bool = True,
    flip: bool = True,
    persistent_workers: bool = False,
    pin_memory: bool = False,
    prefetch_factor: int = 2,
    image_size: int = 112,
    skip_corrupt: bool = False,
    augment: AugmentSpec | None = None,
) -> TrainLoader:
    """Build the CPU training loader of one rank.

    Args:
        dataset: map-style dataset yielding ``(uint8 (H, W, 3) RGB, int label)`` with no
            transform (e.g. ``RecordDataset``, ``ImageFolderDataset``, ``SyntheticDataset``).
        batch_size: per-rank batch size B.
        rank, world_size: this process' place among the data-parallel ranks.
        seed: fixes the epoch permutations (shared by ranks) and the flips.
        num_workers: DataLoader worker processes (0 decodes in the main process).
        shuffle, drop_last: see ``DistributedShardSampler``; drop_last also drops a short last
            batch, so every rank yields the same number of full batches.
        flip: random horizontal flip with p = 0.5 per sample.
        persistent_workers, prefetch_factor: passed to ``DataLoader``.
        pin_memory: pin each uint8 batch in the DataLoader for asynchronous copies to a GPU
            (only when CUDA is available; ignored otherwise).
        image_size: expected H = W of the decoded images.
        skip_corrupt: replace a sample whose record raises ``CorruptRecordError`` by the next
            readable one and list it in ``TrainLoader.corrupt`` (else the error stops the run).
        augment: ``data.augment`` steps, applied in the workers before the flip (None or all
            probabilities 0: none); parameters from ``data.augment.sample_params``.

    Returns:
        ``TrainLoader`` yielding uint8 (B, image_size, image_size, 3) and int64 (B,).

    Raises:
        ValueError: bad batch size or worker count, or from the sampler; a wrong image shape or
            dtype raises when the batch is loaded.
    """
    if batch_size < 1:
        raise ValueError(f"build_cpu_loader: batch_size must be positive, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"build_cpu_loader: num_workers must be >= 0, got {num_workers}")
    sampler = DistributedShardSampler(len(dataset), rank, world_size, seed, shuffle, drop_last)
    generator = torch.Generator()
    generator.manual_seed(int(seed) * 1000 + int(rank))
    extra: dict[str, Any] = {"prefetch_factor": prefetch_factor} if num_workers > 0 else {}
    loader: DataLoader[Any] = DataLoader(
        _IndexedUint8(dataset, image_size, skip_corrupt),  # type: ignore[arg-type]  # map-style
        batch_size=batch_size,
        sampler=_EpochTagged(sampler),
        num_workers=num_workers,
        collate_fn=_FlipCollate(seed, flip, augment),
        pin_memory=pin_memory and torch.cuda.is_available(),
        drop_last=drop_last,
        worker_init_fn=_seed_worker,
        generator=generator,
        persistent_workers=persistent_workers and num_workers > 0,
        **extra,
    )
    return TrainLoader(loader, sampler, batch_size)
