"""Throughput of a training data loader: start-up time, images/s and identities per batch.

Used by ``benchmarks/bench_data.py`` (CPU loader and DALI CPU pipeline on the LFW demo ``.rec``)
and ``benchmarks/gpu_check.py`` (DALI ``mixed`` decode). Any iterable of ``(images, labels)``
batches works: ``images`` has a leading batch dimension (``.shape[0]`` images), ``labels`` a
``.tolist()``. Speed only, never pass/fail.
"""

from __future__ import annotations

import time

__all__ = ["measure"]


def measure(loader, batches: int) -> dict:
    """Time ``batches`` batches after the first one; returns start-up seconds and images/s.

    Args:
        loader: an iterable of ``(images, labels)`` batches; iterated once (``iter(loader)``).
        batches: timed batches after the untimed first one (fewer when the loader runs out).

    Returns:
        dict: ``startup_s`` (seconds to ``iter`` + the first batch), ``images`` (timed images),
        ``seconds`` (timed wall time), ``img_per_s`` and ``ids_per_batch`` (mean distinct labels
        per batch, the first batch included).

    Raises:
        StopIteration: the loader yields no batch at all.
    """
    t0 = time.perf_counter()
    it = iter(loader)
    images, labels = next(it)
    startup = time.perf_counter() - t0
    ids = [len(set(labels.tolist()))]
    n, t1 = 0, time.perf_counter()
    for _ in range(batches):
        try:
            images, labels = next(it)
        except StopIteration:
            break
        n += images.shape[0]
        ids.append(len(set(labels.tolist())))  # distinct identities in the batch
    elapsed = time.perf_counter() - t1
    del it
    return {
        "startup_s": startup,
        "images": n,
        "seconds": elapsed,
        "img_per_s": n / elapsed,
        "ids_per_batch": sum(ids) / len(ids),
    }
