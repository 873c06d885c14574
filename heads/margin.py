"""Combined angular margin: ``s * (cos(m1 * theta + m2) - m3)`` on the target logit.

References: SphereFace (m1, Liu et al. CVPR 2017), ArcFace (m2, Deng et al. CVPR 2019),
CosFace (m3, Wang et al. CVPR 2018); the combined form and the inter-class filtering follow
insightface arcface_torch ``losses.CombinedMarginLoss``. ArcFace is ``(1, 0.5, 0)``, CosFace
``(1, 0, 0.4)``.

Differences from arcface_torch, on purpose: the margin is differentiated exactly (arcface_torch
rewrites the logits in place under ``no_grad``, so its gradient ignores the margin's slope), and
the slope of ``arccos`` is taken at ``cos`` clamped away from +-1, so neither value nor gradient
can be NaN/inf at theta = 0 or pi (the value stays exact).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CombinedMarginLoss", "ARCCOS_EPS"]

# arccos'(x) = -1/sqrt(1-x^2) is infinite at +-1; taking it at 1-1e-6 caps it at ~707.
ARCCOS_EPS = 1e-6


class CombinedMarginLoss(nn.Module):
    """Margin-penalized, scaled cosine logits (ArcFace/CosFace/SphereFace and combinations).

    Args:
        s: logit scale (> 0), 64 in arcface_torch.
        m1: multiplicative angular margin (> 0); 1 disables it.
        m2: additive angular margin in radians (>= 0); ArcFace uses 0.5.
        m3: additive cosine margin (>= 0); CosFace uses 0.4.
        interclass_filtering_threshold: in ``[0, 1)``; when > 0, non-target cosines above it are
            set to 0 before scaling (arcface_torch semantics: they are treated as probable label
            noise, and their gradient is zero). 0 disables filtering.

    Raises:
        ValueError: a parameter outside the ranges above.
    """

    def __init__(
        self,
        s: float = 64.0,
        m1: float = 1.0,
        m2: float = 0.5,
        m3: float = 0.0,
        interclass_filtering_threshold: float = 0.0,
    ):
        super().__init__()
        if not s > 0:
            raise ValueError(f"heads/margin.py: s must be > 0, got {s}")
        if not m1 > 0:
            raise ValueError(f"heads/margin.py: m1 must be > 0, got {m1}")
        if m2 < 0 or m3 < 0:
            raise ValueError(f"heads/margin.py: m2 and m3 must be >= 0, got m2={m2}, m3={m3}")
        if not 0.0 <= interclass_filtering_threshold < 1.0:
            raise ValueError(
                "heads/margin.py: interclass_filtering_threshold must be in [0, 1), got "
                f"{interclass_filtering_threshold}"
            )
        self.s = float(s)
        self.m1 = float(m1)
        self.m2 = float(m2)
        self.m3 = float(m3)
        self.interclass_filtering_threshold = float(interclass_filtering_threshold)

    def extra_repr(self) -> str:
        return (
            f"s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}, "
            f"interclass_filtering_threshold={self.interclass_filtering_threshold}"
        )

    @property
    def is_angular(self) -> bool:
        """True when the margin needs ``theta`` (``m1 != 1`` or ``m2 != 0``)."""
        return self.m1 != 1.0 or self.m2 != 0.0

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        """Final target logit ``s * (cos(m1 * arccos(c) + m2) - m3)``, differentiable.

        Args:
            cos_target: ``(P,)`` cosines of each row with its own class center, fp32.

        Returns:
            ``(P,)`` fp32. For pure CosFace (``m1 == 1, m2 == 0``) no ``arccos`` is taken, so the
            gradient is exactly ``s``. Otherwise the value is the formula at ``c`` clamped to
            ``[-1, 1]``, and the gradient is the formula's derivative at ``c`` clamped to
            ``[-1 + eps, 1 - eps]`` (``eps = ARCCOS_EPS``): exact away from theta = 0 and pi,
            finite (capped) at them, where the true slope is infinite.
        """
        if not self.is_angular:
            return (cos_target - self.m3) * self.s
        # Straight-through clamp: value at the safe point, gradient passed unchanged.
        c_safe = (
            cos_target - (cos_target - cos_target.clamp(-1 + ARCCOS_EPS, 1 - ARCCOS_EPS)).detach()
        )
        theta = torch.arccos(c_safe)
        # Exact angle as the value; the capped slope of the safe point as the gradient.
        theta = theta + (torch.arccos(cos_target.detach().clamp(-1.0, 1.0)) - theta).detach()
        return (torch.cos(self.m1 * theta + self.m2) - self.m3) * self.s

    def filter_mask(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """Boolean ``(N, K)`` mask of non-target cosines above the filtering threshold.

        Args:
            cos: ``(N, K)`` cosines.
            labels: ``(N,)`` int64 target column of each row, -1 when the row's target is not
                among these ``K`` columns (all its entries are non-target). Fixed shapes: no
                host sync.

        Returns:
            the mask, or ``None`` when filtering is disabled.
        """
        if self.interclass_filtering_threshold <= 0:
            return None
        with torch.no_grad():
            dirty = cos > self.interclass_filtering_threshold
            if cos.shape[1] > 0:
                col = labels.clamp_min(0).unsqueeze(1)
                # the target entry is never filtered; column 0 of target-less rows keeps its bit
                keep = dirty.gather(1, col) & (labels < 0).unsqueeze(1)
                dirty.scatter_(1, col, keep)
        return dirty

    def forward(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scaled logits with the margin on each row's target (plain autograd, out of place).

        Args:
            cos: ``(N, K)`` cosine logits (fp32 recommended).
            labels: ``(N,)`` int64 column of each row's target in ``[0, K)``, or -1 when the
                target is not among these ``K`` columns (that row is only scaled and filtered).

        Returns:
            ``(N, K)`` logits: ``s * cos`` with filtered entries 0 and targets replaced by
            ``target_logit``.

        Raises:
            ValueError: shape mismatch or a label outside ``[-1, K)``.
        """
        if cos.dim() != 2 or labels.shape != (cos.shape[0],):
            raise ValueError(
                f"heads/margin.py: expected cos (N, K) and labels (N,), got {tuple(cos.shape)} "
                f"and {tuple(labels.shape)}"
            )
        if labels.numel() and (int(labels.min()) < -1 or int(labels.max()) >= cos.shape[1]):
            raise ValueError(
                f"heads/margin.py: labels must be in [-1, {cos.shape[1]}), got "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )
        rows = torch.nonzero(labels != -1).squeeze(1)
        cols = labels[rows]
        mask = self.filter_mask(cos, labels)
        if mask is not None:
            cos = cos.masked_fill(mask, 0.0)
        logits = cos * self.s
        return logits.index_put((rows, cols), self.target_logit(cos[rows, cols]))
