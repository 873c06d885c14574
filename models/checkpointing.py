"""Activation checkpointing shared by every backbone.

`checkpoint_module(module, x)` runs `module(x)` under non-reentrant `torch.utils.checkpoint`, so
its activations are freed after the forward and recomputed in the backward. Recomputing a module
that holds BatchNorm layers in train mode would update their running statistics a second time
(momentum applied twice per step, `num_batches_tracked` counted twice); the recompute context
below freezes those buffers so that a checkpointed model ends a step with exactly the same
parameters, gradients *and* buffers as an uncheckpointed one. Dropout / drop-path draw the same
random numbers on recompute because `preserve_rng_state=True`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["checkpoint_module", "units_run_by"]

# (module, x) -> module(x): how checkpointed units run (None: torch.utils.checkpoint).
UnitRunner = Callable[[nn.Module, torch.Tensor], torch.Tensor]
_unit_runner: UnitRunner | None = None


@contextlib.contextmanager
def units_run_by(runner: UnitRunner) -> Iterator[None]:
    """Within the context every ``checkpoint_module(module, x)`` call returns
    ``runner(module, x)`` instead: a planner measuring what each checkpointed unit saves (e.g.
    ``trainer/memory_plan.py``) sees the units without the recompute machinery. Not thread-safe;
    contexts do not nest (the inner one wins until it exits)."""
    global _unit_runner
    previous, _unit_runner = _unit_runner, runner
    try:
        yield
    finally:
        _unit_runner = previous


@contextlib.contextmanager
def _frozen_batchnorm_stats(module: nn.Module) -> Iterator[None]:
    """Keep BatchNorm running stats of `module` unchanged while the context is open.

    momentum=0 makes the running-average update a no-op (new = 1*old + 0*batch);
    `num_batches_tracked` is restored on exit since the update still increments it.
    """
    saved: list[tuple[nn.modules.batchnorm._BatchNorm, float | None, torch.Tensor | None]] = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            count = None if m.num_batches_tracked is None else m.num_batches_tracked.clone()
            saved.append((m, m.momentum, count))
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, count in saved:
            m.momentum = momentum
            tracked = m.num_batches_tracked
            if count is not None and tracked is not None:
                tracked.copy_(count)


def checkpoint_module(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run `module(x)` with activation checkpointing (non-reentrant, RNG state preserved).

    Args:
        module: any sub-module taking one tensor (a residual block, a transformer block).
        x: its input, any shape/dtype the module accepts.

    Returns:
        `module(x)`, numerically identical to the plain call; in the backward pass the forward is
        recomputed with BatchNorm running statistics frozen (see module docstring).

    Reference: Chen et al., "Training Deep Nets with Sublinear Memory Cost", 2016.
    """

    if _unit_runner is not None:
        return _unit_runner(module, x)
    if torch.compiler.is_compiling():
        # Traced as one graph (torch.compile): the recompute happens inside the compiled
        # backward, where BatchNorm's buffer updates are not replayed (they are applied once,
        # at the end of the forward graph), so no freezing context is needed; dynamo accepts
        # no custom `context_fn` here.
        traced: torch.Tensor = checkpoint(module, x, use_reentrant=False, preserve_rng_state=True)
        return traced

    def contexts() -> tuple[
        contextlib.AbstractContextManager[None], contextlib.AbstractContextManager[None]
    ]:
        return contextlib.nullcontext(), _frozen_batchnorm_stats(module)

    out: torch.Tensor = checkpoint(
        module, x, use_reentrant=False, preserve_rng_state=True, context_fn=contexts
    )
    return out
