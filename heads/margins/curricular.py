"""CurricularFace: Huang et al., "CurricularFace: Adaptive Curriculum Learning Loss for Deep
Face Recognition", CVPR 2020.

Target logit: ``s * cos(theta_y + m)`` where ``theta_y + m < pi``, else ``s * (cos theta_y -
m sin m)`` (the authors' fallback, ``cos(pi - m)`` threshold). A non-target ``cos theta_j`` above
``cos(theta_y + m)`` is hard and becomes ``cos theta_j (t + cos theta_j)``; ``t`` is the EMA of
the batch's mean target cosine, ``t <- alpha * mean + (1 - alpha) * t`` (alpha 0.01, ``t_0 = 0``),
updated before use in every training forward, with no gradient. Under class sharding the mean is
that of the whole gathered batch (one ``(N,)`` all-reduce), so ``t`` is identical on every rank.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from heads.margins.base import Margin, Rows, safe_arccos

__all__ = ["CurricularFace"]


class CurricularFace(Margin):
    """CurricularFace margin (module doc).

    Args:
        s: scale (64 in the paper).
        m: additive angular margin in radians, in ``(0, pi)`` (0.5 in the paper).
        alpha: EMA momentum of ``t`` in ``(0, 1]`` (0.01 in the paper).
        **base: ``Margin`` options (filtering, margin_gradient, clamping).

    Buffers:
        t: 0-dim fp32, saved with the head.

    Raises:
        ValueError: a parameter outside the ranges above.
    """

    needs_global_target = True
    has_nontarget = True
    t: torch.Tensor

    def __init__(self, s: float = 64.0, m: float = 0.5, alpha: float = 0.01, **base: Any) -> None:
        super().__init__(s, **base)
        if not 0 < m < math.pi:
            raise ValueError(f"m must be in (0, pi), got {m}")
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.m, self.alpha = float(m), float(alpha)
        self.register_buffer("t", torch.zeros(()))

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}, alpha={self.alpha}"

    @torch.no_grad()
    def prepare(
        self, n: int, cos_target: torch.Tensor | None, norms: torch.Tensor | None, update: bool
    ) -> Rows:
        """Updates ``t`` (training) and returns the hard threshold ``cos(theta_y + m)`` ``(N,)``."""
        assert cos_target is not None
        if update and cos_target.numel():
            self.t.mul_(1 - self.alpha).add_(cos_target.mean(), alpha=self.alpha)
        theta = torch.arccos(cos_target.clamp(-1.0, 1.0))
        return {"hard": torch.cos(theta + self.m), "t": self.t.clone()}

    def margin_cosine(
        self, cos_t: torch.Tensor, norms: torch.Tensor | None, rows: Rows
    ) -> torch.Tensor:
        """``cos(theta + m)`` where ``cos theta > cos(pi - m)``, else ``cos theta - m sin m``."""
        arc = torch.cos(safe_arccos(cos_t) + self.m)
        return torch.where(
            cos_t > math.cos(math.pi - self.m), arc, cos_t - self.m * math.sin(self.m)
        )

    def nontarget(
        self, cos: torch.Tensor, rows: Rows, sl: slice, scratch: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``f = c (t + c)`` where ``c > cos(theta_y + m)`` of the row, else ``c``; slope
        ``f' = t + 2c`` or 1. Written as ``g = t + c`` or 1, ``f = c g``, ``f' = g + [hard] c``
        (fewest passes over the block)."""
        hard = torch.gt(cos, rows["hard"][sl].unsqueeze(1), out=scratch("hard", cos))  # 1.0 or 0.0
        g = torch.sub(cos, 1.0 - rows["t"], out=scratch("g", cos))
        g.mul_(hard).add_(1.0)  # t + c on hard entries, 1 elsewhere
        value = torch.mul(cos, g, out=scratch("value", cos))
        return value, g.addcmul_(cos, hard)
