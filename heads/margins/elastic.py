"""ElasticFace: Boutros et al., "ElasticFace: Elastic Margin Loss for Deep Face Recognition",
CVPRW 2022.

Each row's margin is drawn from ``N(m, sigma^2)`` at every training forward: ElasticFace-Arc
``s * cos(theta_y + m_i)``, ElasticFace-Cos ``s * (cos theta_y - m_i)``. The "+" variants sort the
draws so that the row with the r-th largest target cosine gets the r-th smallest margin (the
paper's rule; the authors' code indexes the sorted margins with the sort permutation instead of
its inverse). The draws come from one generator on the embeddings' device, seeded with ``seed``,
the same on every rank and advanced by ``N`` normals per forward, so every rank gives row i the
same margin without a host-to-device copy per step; its state is saved with the head
(``get_extra_state``), so a resumed run draws what the run would have (on the same device type;
elsewhere the generator restarts from ``seed``, as the head's sampling RNG does). Evaluation
forwards use ``m`` itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from heads.margins.base import Margin, Rows, safe_arccos

__all__ = ["ElasticFace", "draw_margins"]


def draw_margins(
    generator: torch.Generator,
    n: int,
    m: float,
    std: float,
    device: torch.device | None = None,
) -> torch.Tensor:
    """``(n,)`` fp32 margins from ``N(m, std^2)`` on ``device`` (the generator's; CPU by default),
    the single definition tests reproduce: ``torch.normal(m, std, (n,), generator=g)``."""
    return torch.normal(m, std, (n,), generator=generator, device=device)


def _device_generator(device: torch.device) -> torch.Generator:
    return torch.Generator(device=device)


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
        self.seed = int(seed)
        # Builds the generator on the embeddings' device; replaceable where no driver is present
        # (the fake-CUDA dry run hands out a CPU one: tests/unit/trainer/test_fake_cuda.py).
        self.generator_factory: Callable[[torch.device], torch.Generator] = _device_generator
        self._generator: torch.Generator | None = None
        self._generator_device: torch.device | None = None
        self._saved: torch.Tensor | None = None  # a loaded state, applied when the device is known
        # m as a 0-dim tensor that moves with the head (not saved): the draws' device, eval's m.
        self.mean_margin: torch.Tensor
        self.register_buffer("mean_margin", torch.tensor(self.m), persistent=False)

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}, std={self.std}, kind={self.kind}, plus={self.plus}"

    def generator(self, device: torch.device) -> torch.Generator:
        """The margin generator on ``device``: seeded with ``seed`` (or given the loaded state when
        it is one of this device type's generator) at first use."""
        g = self._generator
        if g is None or self._generator_device != device:
            g = self.generator_factory(device).manual_seed(self.seed)
            saved = self._saved if self._saved is not None else self.get_extra_state()
            if saved.numel() == g.get_state().numel():
                g.set_state(saved)
            self._generator, self._generator_device, self._saved = g, device, None
        return g

    def get_extra_state(self) -> torch.Tensor:
        """The margin generator's state (uint8 CPU tensor; a CPU generator's before the first
        draw)."""
        if self._generator is not None:
            return self._generator.get_state()
        if self._saved is not None:
            return self._saved.clone()
        return torch.Generator().manual_seed(self.seed).get_state()

    def set_extra_state(self, state: torch.Tensor) -> None:
        """Restores a state from ``get_extra_state`` (applied at the next draw)."""
        self._saved = state.detach().cpu().clone()
        self._generator = None

    @torch.no_grad()
    def prepare(
        self, n: int, cos_target: torch.Tensor | None, norms: torch.Tensor | None, update: bool
    ) -> Rows:
        """Draws this forward's ``(N,)`` margins (training) or returns ``m`` for every row."""
        if not update:
            return {"m": self.mean_margin}
        device = self.mean_margin.device
        margins = draw_margins(self.generator(device), n, self.m, self.std, device)
        if self.plus:  # the r-th largest target cosine gets the r-th smallest margin
            assert cos_target is not None
            order = torch.argsort(cos_target, descending=True, stable=True)
            margins = margins.sort().values[torch.argsort(order)]
        return {"m": margins}

    def margin_cosine(
        self, cos_t: torch.Tensor, norms: torch.Tensor | None, rows: Rows
    ) -> torch.Tensor:
        m = rows["m"]  # on the head's device: no copy
        if self.kind == "arc":
            return torch.cos(safe_arccos(cos_t) + m)
        out: torch.Tensor = cos_t - m
        return out
