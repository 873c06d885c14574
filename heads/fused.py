"""Fused memory passes of the head step, compiled by ``torch.compile`` (Inductor).

The head's step is memory-bound outside its three GEMMs (docs/benchmarks.md, issue 13 item 13):
eager PyTorch reads and writes each ``(K, D)`` array of the sampled rows once per operation. Two
kernels here do in one pass what eager does in several:

- ``radial_coef``: the per-center dot product of the centers' gradient with the centers (one read
  of each array, no ``(K, D)`` product written);
- ``sgd_rows``: the row-sparse SGD update (weight decay, radial correction, momentum, weight
  step, write-back of weights and momentum rows) as one loop over rows.

Inductor emits C++/OpenMP on CPU and Triton on CUDA from the same definition. Compiling costs
seconds to a minute once per process (then cached on disk), so ``resolve_fused("auto", device)``
turns the kernels on for CUDA only; CPU runs opt in with ``head.kernels: compiled``. When
compilation fails (no C++ compiler, no Triton), the first call warns once and every later call
runs the eager equivalent, so a run never stops for it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["FUSED_MODES", "resolve_fused", "radial_coef", "sgd_rows"]

FUSED_MODES = ("auto", "compiled", "eager")


def resolve_fused(mode: str, device: torch.device | str) -> bool:
    """Whether the head uses the compiled kernels for a config value (``head.kernels``).

    ``auto``: compiled on CUDA only (compile time is paid back within a few steps there; on CPU
    a short run would spend longer compiling than it saves); ``compiled``; ``eager``.

    Raises:
        ValueError: a value outside ``FUSED_MODES``.
    """
    if mode not in FUSED_MODES:
        raise ValueError(f"kernels must be one of {FUSED_MODES}, got {mode!r}")
    if mode == "auto":
        return torch.device(device).type == "cuda"
    return mode == "compiled"


def _radial_coef_math(
    grad: torch.Tensor, rows: torch.Tensor, inv: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    coef = (grad * rows).sum(dim=1) * inv * inv
    return coef, coef.sum()


def _sgd_rows_math(
    weight: torch.Tensor,
    momentum: torch.Tensor,
    index: torch.Tensor,
    w: torch.Tensor,
    grad: torch.Tensor,
    coef: torch.Tensor,
    b: torch.Tensor,
    hyper: torch.Tensor,
    ok: torch.Tensor,
) -> None:
    lr, m, wd = hyper[0], hyper[1], hyper[2]
    # Same association as the eager path (optim.py _sgd_rows): d = a + w (wd - coef); d + m b.
    d = grad + w * (wd - coef).unsqueeze(1)
    d = torch.where(ok, d + b * m, b)  # a skipped step writes the buffer back unchanged
    momentum[index] = d
    weight[index] = torch.where(ok, w - lr * d, w)


class _Kernel:
    """A function compiled on first call; eager after a failed compile (warned once)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.compiled: Callable[..., Any] | None = None
        self.failed = False

    def __call__(self, *args: Any) -> Any:
        if self.failed:
            return self.fn(*args)
        if self.compiled is None:
            # dynamic=None: static first, then one dynamic recompile if a shape changes.
            self.compiled = torch.compile(self.fn, fullgraph=True, dynamic=None)
        try:
            return self.compiled(*args)
        except Exception as e:  # compile errors surface at the first call
            self.failed = True
            warnings.warn(
                f"torch.compile of {self.fn.__name__} failed, the head runs "
                f"its eager path (slower, same result): {type(e).__name__}: {e}",
                RuntimeWarning,
                stacklevel=2,
            )
            return self.fn(*args)


_RADIAL = _Kernel(_radial_coef_math)
_SGD = _Kernel(_sgd_rows_math)


def radial_coef(
    grad: torch.Tensor, rows: torch.Tensor, inv: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``coef_j = (grad_j . rows_j) * inv_j**2`` and ``coef.sum()``, one read of each array.

    The radial part of center j's gradient through ``cos = e . w_j / |w_j|`` is
    ``coef_j * w_j`` (``heads/cosine_kernel.py`` ``_CosineLinear``).

    Args:
        grad: ``(K, D)`` fp32 gradient of the cosines w.r.t. the centers before the radial
            correction (``a = g^T e``).
        rows: ``(K, D)`` fp32 centers.
        inv: ``(K,)`` fp32 ``1 / |rows_j|``.

    Returns:
        ``(coef (K,), probe ())`` fp32; ``probe`` is finite iff every coefficient is.
    """
    coef, probe = _RADIAL(grad, rows, inv)
    return coef, probe


def sgd_rows(
    weight: torch.Tensor,
    momentum: torch.Tensor,
    index: torch.Tensor,
    w: torch.Tensor,
    grad: torch.Tensor,
    coef: torch.Tensor,
    b: torch.Tensor,
    hyper: torch.Tensor,
    ok: torch.Tensor,
) -> None:
    """Row-sparse SGD with momentum on ``index``, as one pass (``torch.optim.SGD``'s math).

    ``d = grad - coef w + wd w``; ``b = m b + d``; ``w -= lr b`` for the rows ``index`` of
    ``weight``/``momentum``, both updated in place; when ``ok`` is false nothing changes.

    Args:
        weight: ``(n_r, D)`` fp32 centers of the shard, updated in place.
        momentum: ``(n_r, D)`` fp32 momentum buffer, updated in place.
        index: ``(K,)`` int64 unique shard-local rows.
        w: ``(K, D)`` fp32 current centers of ``index`` (the forward's gathered copy).
        grad: ``(K, D)`` fp32 gradient before the radial correction (already unscaled).
        coef: ``(K,)`` fp32 radial coefficients (``radial_coef``, unscaled).
        b: ``(K, D)`` fp32 ``momentum[index]``, gathered by the caller: reading the rows that
            the kernel also writes would make Inductor stage the update in a temporary and
            scatter it in a second pass (measured 1.5-2x slower than gathering first).
        hyper: ``(3,)`` fp32 ``(lr, momentum, weight_decay)`` on the device (a tensor, so a
            new learning rate each step does not recompile).
        ok: 0-dim bool on the device: false skips the step (non-finite gradient).
    """
    _SGD(weight, momentum, index, w, grad, coef, b, hyper, ok)
