"""The combined angular margin ``s * (cos(m1 * theta + m2) - m3)`` on the target logit.

References: SphereFace (m1, Liu et al. CVPR 2017), ArcFace (m2, Deng et al. CVPR 2019),
CosFace (m3, Wang et al. CVPR 2018); the combined form and the inter-class filtering follow
insightface arcface_torch ``losses.CombinedMarginLoss``. ArcFace is ``(1, 0.5, 0)``, CosFace
``(1, 0, 0.4)``. Exact margin gradient and clamped ``arccos`` slope by default (``base.py``).
"""

from __future__ import annotations

import torch

from heads.margins.base import Margin, Rows, safe_arccos

__all__ = ["CombinedMarginLoss"]


class CombinedMarginLoss(Margin):
    """Margin-penalized, scaled cosine logits (ArcFace/CosFace/SphereFace and combinations).

    Args:
        s: logit scale (> 0), 64 in arcface_torch.
        m1: multiplicative angular margin (> 0); 1 disables it.
        m2: additive angular margin in radians (>= 0); ArcFace uses 0.5.
        m3: additive cosine margin (>= 0); CosFace uses 0.4.
        interclass_filtering_threshold, margin_gradient, clamping: see ``Margin``.

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
        margin_gradient: str = "exact",
        clamping: str = "none",
    ):
        super().__init__(s, interclass_filtering_threshold, margin_gradient, clamping)
        if not m1 > 0:
            raise ValueError(f"m1 must be > 0, got {m1}")
        if m2 < 0 or m3 < 0:
            raise ValueError(f"m2 and m3 must be >= 0, got m2={m2}, m3={m3}")
        self.m1 = float(m1)
        self.m2 = float(m2)
        self.m3 = float(m3)

    def extra_repr(self) -> str:
        return (
            f"s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}, "
            f"interclass_filtering_threshold={self.interclass_filtering_threshold}"
        )

    @property
    def is_angular(self) -> bool:
        """True when the margin needs ``theta`` (``m1 != 1`` or ``m2 != 0``)."""
        return self.m1 != 1.0 or self.m2 != 0.0

    def margin_cosine(
        self, cos_t: torch.Tensor, norms: torch.Tensor | None, rows: Rows
    ) -> torch.Tensor:
        """``cos(m1 * theta + m2) - m3`` (see ``target_logit``)."""
        if not self.is_angular:
            return cos_t - self.m3
        return torch.cos(self.m1 * safe_arccos(cos_t) + self.m2) - self.m3

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
        return self.target_logits(cos_target)

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
                f"expected cos (N, K) and labels (N,), got {tuple(cos.shape)} "
                f"and {tuple(labels.shape)}"
            )
        if labels.numel() and (int(labels.min()) < -1 or int(labels.max()) >= cos.shape[1]):
            raise ValueError(
                f"labels must be in [-1, {cos.shape[1]}), got "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )
        rows = torch.nonzero(labels != -1).squeeze(1)
        cols = labels[rows]
        mask = self.filter_mask(cos, labels)
        if mask is not None:
            cos = cos.masked_fill(mask, 0.0)
        logits = cos * self.s
        return logits.index_put((rows, cols), self.target_logit(cos[rows, cols]))
