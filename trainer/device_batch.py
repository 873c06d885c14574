"""Input batches onto the training device: one same-dtype copy, then normalize and cast there.

The CPU loader hands over uint8 NHWC batches (pinned on CUDA hosts). Copying them first and
normalizing on the device moves 4x fewer bytes than a float32 copy and keeps the copy a plain,
asynchronous memcpy (a copy with a dtype change from pinned memory goes through a pageable
temporary and blocks the host). ``DevicePrefetcher`` issues the next batch's copy and
normalization on a side CUDA stream while the current step computes; each batch records its own
event, so the step waits for its batch only, never for the one being copied behind it. The DALI
loader hands over uint8 NHWC too (already on the GPU: normalized here, on the current stream);
floating batches are only moved and cast.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from data.decode import normalize

__all__ = ["DevicePrefetcher", "StreamOps", "TrainingLoader", "cuda_stream_ops", "to_device"]

Batch = tuple[torch.Tensor, torch.Tensor]  # (images, labels)


class TrainingLoader(Protocol):
    """What ``DevicePrefetcher`` needs of a loader (``TrainLoader``, ``DaliLoader``)."""

    @property
    def epoch(self) -> int: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Batch]: ...

    def set_epoch(self, epoch: int) -> None: ...

    def state_dict(self) -> dict[str, int]: ...

    def load_state_dict(self, state: dict[str, int]) -> None: ...


def to_device(
    images: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    memory_format: torch.memory_format = torch.preserve_format,
) -> torch.Tensor:
    """The training input on ``device``: (B, 3, H, W) in [-1, 1], ``dtype``, ``memory_format``.

    Args:
        images: uint8 (B, H, W, 3) RGB from the CPU loader (copied as uint8 with
            ``non_blocking=True``, then normalized on ``device`` by ``data.decode.normalize``),
            or a floating (B, 3, H, W) batch that is already normalized (DALI), only moved and
            cast (a no-op when device, dtype and layout already match).
        device: the engine's device.
        dtype: the engine's parameter dtype.
        memory_format: layout on the device; ``preserve_format`` keeps a float batch's layout
            and gives uint8 batches ``torch.channels_last`` (see ``normalize``).

    Raises:
        ValueError: a uint8 batch that is not (B, H, W, 3) (from ``normalize``).
    """
    if images.dtype == torch.uint8:
        images = images.to(device, non_blocking=True)  # same dtype: a plain async memcpy
        return normalize(images, dtype, memory_format)
    return images.to(device, dtype, non_blocking=True, memory_format=memory_format)


@dataclass(frozen=True)
class StreamOps:
    """The stream and event calls ``DevicePrefetcher`` makes (CUDA's by default); a test injects
    recording fakes to check the ordering on a CPU.

    Attributes:
        new_stream: ``device -> stream`` (the side stream).
        use_stream: ``stream -> context manager`` making it current (``torch.cuda.stream``).
        current_stream: ``device -> stream`` the caller computes on.
        new_event: ``() -> event`` with ``record(stream)``; streams have ``wait_event(event)``.
    """

    new_stream: Callable[[torch.device], Any]
    use_stream: Callable[[Any], AbstractContextManager[Any]]
    current_stream: Callable[[torch.device], Any]
    new_event: Callable[[], Any]


def cuda_stream_ops() -> StreamOps:
    """``StreamOps`` of ``torch.cuda``."""
    return StreamOps(
        torch.cuda.Stream, torch.cuda.stream, torch.cuda.current_stream, torch.cuda.Event
    )


class DevicePrefetcher:
    """Wraps a training loader (``TrainLoader`` / ``DaliLoader`` protocol) so that it yields
    ``(images, labels)`` already on ``device`` in the step's dtype and layout (``to_device``).

    On CUDA, for batches still on the host, the next batch's copy and normalization run on a
    side stream while the caller computes on the current one. Each batch's work ends with an
    event recorded on the side stream; the caller's stream waits on that batch's event only
    (batch i+1's copy, issued before batch i is handed out, does not delay batch i's step).
    ``stream_ops`` replaces the CUDA stream/event calls (tests; default ``cuda_stream_ops()``
    on a CUDA device, none elsewhere).
    Prefetching pulls one batch ahead of the loader, so ``state_dict()`` reports the loader's
    state from before that pull: a checkpoint never skips the prefetched batch. On other
    devices each batch is converted when it is taken (nothing runs ahead).

    ``len``, ``epoch``, ``set_epoch``, ``load_state_dict`` and ``corrupt`` are the loader's.
    """

    def __init__(
        self,
        loader: TrainingLoader,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        memory_format: torch.memory_format = torch.preserve_format,
        stream_ops: StreamOps | None = None,
    ) -> None:
        self.loader = loader
        self.device = device
        self.dtype = dtype
        self.memory_format = memory_format
        if stream_ops is None and device.type == "cuda":
            stream_ops = cuda_stream_ops()
        self.ops = stream_ops
        self.stream: Any = None if stream_ops is None else stream_ops.new_stream(device)
        self._state: dict[str, int] | None = None  # loader state before the pending prefetch

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def epoch(self) -> int:
        return self.loader.epoch

    @property
    def corrupt(self) -> list[str]:
        corrupt: list[str] = getattr(self.loader, "corrupt", [])  # DaliLoader has none
        return corrupt

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._state = None
        self.loader.load_state_dict(state)

    def state_dict(self) -> dict[str, int]:
        """The loader's state counting only the batches this wrapper has handed out."""
        return dict(self._state) if self._state is not None else self.loader.state_dict()

    def _convert(self, batch: Batch) -> Batch:
        images, labels = batch
        images = to_device(images, self.device, self.dtype, self.memory_format)
        return images, labels.to(self.device, non_blocking=True)

    def __iter__(self) -> Iterator[Batch]:
        it = iter(self.loader)
        first = next(it, None)
        if first is None:
            return
        if not self._prefetches(first):
            yield self._convert(first)
            for batch in it:
                yield self._convert(batch)
            return
        try:
            pending = self._issue(first)
            while pending is not None:
                current = pending
                state = self.loader.state_dict()  # after `current`, before the next pull
                pending = self._issue(next(it, None))
                self._state = state
                yield self._take(*current)
        finally:
            self._state = None

    def _prefetches(self, batch: Batch) -> bool:
        """Copy ahead only host batches bound for CUDA (DALI's are already on the GPU)."""
        return self.ops is not None and not batch[0].is_cuda

    def _issue(self, batch: Batch | None) -> tuple[Batch, Any] | None:
        """Start ``batch``'s copy and normalization on the side stream; returns it with the
        event that marks the end of exactly this work."""
        if batch is None or self.ops is None:
            return None
        with self.ops.use_stream(self.stream):
            out = self._convert(batch)
            done = self.ops.new_event()
            done.record(self.stream)
        return out, done

    def _take(self, batch: Batch, done: Any) -> Batch:
        """Make the current stream wait for ``batch``'s own event and own its memory."""
        assert self.ops is not None  # only prefetched (side-stream) batches are taken
        current = self.ops.current_stream(self.device)
        current.wait_event(done)
        for t in batch:
            if t.device.type == "cuda":
                t.record_stream(current)  # freed only after the current stream's uses
        return batch
