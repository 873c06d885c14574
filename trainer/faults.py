"""Fault injection for the reliability tests (docs/reliability.md); never active in a normal run.

`trainer.train.main` installs a `FaultInjector` only when an `ARCSCALE_FAULT_*` variable is set, so
the training step and loop carry no test-only parameters:

- `ARCSCALE_FAULT_NAN_LOSS="5-100"` (or "3,7-9"): the head loss is NaN at those 1-based steps
  (a forward hook on the head).
- `ARCSCALE_FAULT_EXIT="rank=1,step=4"`: that rank calls `os._exit(1)` before that step.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from trainer.config import ConfigError


@dataclass
class FaultInjector:
    """The faults of one run: NaN-loss steps and a (rank, step) that exits."""

    nan_steps: set[int] = field(default_factory=set)
    exit_at: tuple[int, int] | None = None
    step: int = 0  # the 1-based step being run, set by `before_step`

    def install(self, head: torch.nn.Module) -> None:
        """Hooks `head` so that its loss (first output) is NaN during the chosen steps."""
        if self.nan_steps:
            head.register_forward_hook(self._nan_hook)

    def _nan_hook(
        self, module: torch.nn.Module, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, ...] | None:
        if self.step not in self.nan_steps:
            return None
        loss, *rest = output
        return (loss * math.nan, *rest)

    def before_step(self, rank: int, step: int) -> None:
        """Called before step `step` (1-based) runs; may end this process at once."""
        self.step = step
        if self.exit_at == (rank, step):
            print(f"arcscale: fault injection: rank {rank} exits at step {step}", file=sys.stderr)
            sys.stderr.flush()
            os._exit(1)


def parse_faults(env: Mapping[str, str] | None = None) -> FaultInjector | None:
    """The `FaultInjector` the environment asks for, or None when no fault variable is set.

    Raises:
        ConfigError: a malformed value, naming the variable.
    """
    env = os.environ if env is None else env
    nan_steps: set[int] = set()
    spec = env.get("ARCSCALE_FAULT_NAN_LOSS", "").strip()
    try:
        for part in filter(None, spec.split(",")):
            lo, _, hi = part.partition("-")
            nan_steps.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ConfigError(
            f"ARCSCALE_FAULT_NAN_LOSS: expected steps like '5-100', got {spec!r}"
        ) from None
    exit_at = None
    spec = env.get("ARCSCALE_FAULT_EXIT", "").strip()
    if spec:
        try:
            fields = dict(item.split("=", 1) for item in spec.split(","))
            exit_at = (int(fields["rank"]), int(fields["step"]))
        except (ValueError, KeyError):
            raise ConfigError(
                f"ARCSCALE_FAULT_EXIT: expected 'rank=R,step=S', got {spec!r}"
            ) from None
    if not nan_steps and exit_at is None:
        return None
    return FaultInjector(nan_steps, exit_at)
