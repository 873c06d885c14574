"""ElasticFace: Boutros et al., "ElasticFace: Elastic Margin Loss for Deep Face Recognition",
CVPRW 2022.

Each row's margin is drawn from ``N(m, sigma^2)`` at every training forward: ElasticFace-Arc
``s * cos(theta_y + m_i)``, ElasticFace-Cos ``s * (cos theta_y - m_i)``. The "+" variants sort the
draws so that the row with the r-th largest target cosine gets the r-th smallest margin (the
paper's rule; the authors' code indexes the sorted margins with the sort permutation instead of
its inverse). The draws come from one CPU generator seeded with ``seed``, the same on every rank and
advanced by ``N`` normals per forward, so every rank gives row i the same margin; its state is
saved with the head (``get_extra_state``), so a resumed run draws what the run would have.
Evaluation forwards use ``m`` itself.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from heads.margins.base import Margin, Rows, safe_arccos

__all__ = ["ElasticFace", "draw_margins"]


def draw_margins(generator: torch.Generator, n: int, m: float, std: float) -> torch.Tensor:
    """``(n,)`` fp32 CPU margins from ``N(m, std^2)`` (the single definition tests reproduce:
    ``torch.normal(m, std, (n,), generator=g)``)."""
    return torch.normal(m, std, (n,), generator=generator)


class ElasticFace(Margin):
    """ElasticFace margin (module doc).

    Args:
        s: scale (64).
        m: mean margin: radians for ``kind="arc"`` (0.5), cosine for ``"cos"`` (0.35).
        std: its standard deviation (> 0; the authors use 0.05, and 0.0175 / 0.025 for Arc+ /
            Cos+).
        kind: ``"arc"`` or ``"cos"``.
        plus: sort the margins against the target cosines (the "+" variant).
        seed: seeds the margin generator (same on every rank).
        **base: ``Margin`` options.

    Raises:
        ValueError: a parameter outside the ranges above.
    """

    def __init__(
        self,
        s: float = 64.0,
        m: float = 0.5,
        std: float = 0.05,
        kind: str = "arc",
        plus: bool = False,
        seed: int = 0,
        **base: Any,
    ) -> None:
        super().__init__(s, **base)
        if kind not in ("arc", "cos"):
            raise ValueError(f"kind must be arc or cos, got {kind!r}")
        if not 0 <= m < (math.pi if kind == "arc" else 1.0) or not std > 0:
            raise ValueError(
                f"ElasticFace needs 0 <= m < {'pi' if kind == 'arc' else 1} and "
                f"std > 0, got m={m}, std={std}"
            )
        self.m, self.std, self.kind, self.plus = float(m), float(std), kind, bool(plus)
        self.needs_global_target = self.plus
        self.generator = torch.Generator().manual_seed(int(seed))

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}, std={self.std}, kind={self.kind}, plus={self.plus}"

    def get_extra_state(self) -> torch.Tensor:
        """The margin generator's state (uint8 CPU tensor)."""
        return self.generator.get_state()

    def set_extra_state(self, state: torch.Tensor) -> None:
        """Restores a state from ``get_extra_state``."""
        self.generator.set_state(state.cpu())

    @torch.no_grad()
    def prepare(
        self, n: int, cos_target: torch.Tensor | None, norms: torch.Tensor | None, update: bool
    ) -> Rows:
        """Draws this forward's ``(N,)`` margins (training) or returns ``m`` for every row."""
        if not update:
            return {"m": torch.tensor(self.m)}
        margins = draw_margins(self.generator, n, self.m, self.std)
        if self.plus:  # the r-th largest target cosine gets the r-th smallest margin
            assert cos_target is not None
            margins = margins.to(cos_target.device)  # sort there: no device-to-host read
            order = torch.argsort(cos_target, descending=True, stable=True)
            margins = margins.sort().values[torch.argsort(order)]
        return {"m": margins}

    def margin_cosine(
        self, cos_t: torch.Tensor, norms: torch.Tensor | None, rows: Rows
    ) -> torch.Tensor:
        m = rows["m"].to(cos_t.device)
        if self.kind == "arc":
            return torch.cos(safe_arccos(cos_t) + m)
        out: torch.Tensor = cos_t - m
        return out
