"""The margin interface (``Margin``): what the distributed softmax CE asks of a margin loss,
and the clamped ``arccos`` the angular margins share. Every loss of this package subclasses
``Margin``; ``registry.py`` chooses one by name.

Reference: the inter-class filtering follows insightface arcface_torch
``losses.CombinedMarginLoss``. Differences from arcface_torch, on purpose: the margin is
differentiated exactly (arcface_torch rewrites the logits in place under ``no_grad``, so its
gradient ignores the margin's slope), and the slope of ``arccos`` is taken at ``cos`` clamped away
from +-1, so neither value nor gradient can be NaN/inf at theta = 0 or pi (the value stays exact).
Both differences can be switched off (issue #15): ``margin_gradient="arcface_torch"`` and
``clamping="arcface_torch"``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = [
    "Margin",
    "Rows",
    "ARCCOS_EPS",
    "MARGIN_GRADIENTS",
    "CLAMPINGS",
    "safe_arccos",
]

# arccos'(x) = -1/sqrt(1-x^2) is infinite at +-1; taking it at 1-1e-6 caps it at ~707.
ARCCOS_EPS = 1e-6
# head.margin_gradient: "exact" differentiates the margin; "arcface_torch" gives the target logit
# the slope s of a plain scaled cosine (arcface_torch edits the logits under no_grad).
MARGIN_GRADIENTS = ("exact", "arcface_torch")
# head.clamping: "arcface_torch" clamps cosines to [-1, 1] and each row's target probability at
# 1e-30 in the loss value (its PartialFC_V2 / DistCrossEntropy); "none" does neither.
CLAMPINGS = ("none", "arcface_torch")
Rows = dict[str, torch.Tensor]


def safe_arccos(c: torch.Tensor) -> torch.Tensor:
    """``arccos(c)`` with the exact value at ``c`` clamped to ``[-1, 1]`` and the slope of
    ``c`` clamped to ``[-1 + ARCCOS_EPS, 1 - ARCCOS_EPS]`` (finite at theta = 0 and pi).

    Args:
        c: any-shape float cosines.

    Returns:
        angles in radians, same shape and dtype.
    """
    c_safe = c - (c - c.clamp(-1 + ARCCOS_EPS, 1 - ARCCOS_EPS)).detach()
    theta = torch.arccos(c_safe)
    return theta + (torch.arccos(c.detach().clamp(-1.0, 1.0)) - theta).detach()


class Margin(nn.Module):
    """Base of every margin loss: what the distributed softmax CE asks of a margin.

    Per forward, ``heads/dist_softmax.py`` calls ``prepare`` once (under ``no_grad``; it may
    update the loss's EMA state), then ``target_logits`` on the ``(N,)`` target cosines (a small
    autograd graph), and, for losses that re-weight non-target logits (``nontarget``), that
    function on row blocks of the ``(N, K)`` cosines. Norm-aware losses (``needs_norms``) get
    the un-normalized embedding norms ``(N,)``; ``needs_global_target`` losses get every row's
    target cosine (one ``(N,)`` all-reduce). State that must be identical on every rank lives in
    buffers (or ``get_extra_state``), saved with the head (``heads/checkpoint.py``).

    Args:
        s: logit scale (> 0).
        interclass_filtering_threshold: in ``[0, 1)``; non-target cosines above it are set to 0
            (arcface_torch's filtering of probable label noise); 0 disables it.
        margin_gradient: one of ``MARGIN_GRADIENTS``.
        clamping: one of ``CLAMPINGS``.

    Raises:
        ValueError: a parameter outside the ranges above.
    """

    needs_norms = False
    needs_global_target = False
    has_nontarget = False

    def __init__(
        self,
        s: float = 64.0,
        interclass_filtering_threshold: float = 0.0,
        margin_gradient: str = "exact",
        clamping: str = "none",
    ):
        super().__init__()
        if not s > 0:
            raise ValueError(f"s must be > 0, got {s}")
        if not 0.0 <= interclass_filtering_threshold < 1.0:
            raise ValueError(
                "interclass_filtering_threshold must be in [0, 1), got "
                f"{interclass_filtering_threshold}"
            )
        if margin_gradient not in MARGIN_GRADIENTS:
            raise ValueError(
                f"margin_gradient must be one of {MARGIN_GRADIENTS}, got {margin_gradient!r}"
            )
        if clamping not in CLAMPINGS:
            raise ValueError(f"clamping must be one of {CLAMPINGS}, got {clamping!r}")
        self.s = float(s)
        self.interclass_filtering_threshold = float(interclass_filtering_threshold)
        self.margin_gradient = margin_gradient
        self.clamping = clamping

    def prepare(
        self, n: int, cos_target: torch.Tensor | None, norms: torch.Tensor | None, update: bool
    ) -> Rows:
        """Per-row parameters of this forward (and the state update when ``update``).

        Args:
            n: rows of the gathered batch (N).
            cos_target: ``(N,)`` fp32 target cosine of every gathered row (``needs_global_target``
                losses only, else ``None``), identical on every rank.
            norms: ``(N,)`` fp32 detached embedding norms (``needs_norms`` losses), else ``None``.
            update: a training forward: advance EMA state / RNG.

        Returns:
            a dict of ``(N,)`` tensors (or 0-dim) read by ``margin_cosine`` and ``nontarget``.
        """
        return {}

    def margin_cosine(
        self, cos_t: torch.Tensor, norms: torch.Tensor | None, rows: Rows
    ) -> torch.Tensor:
        """Penalized target cosine ``(N,)`` (before the scale), differentiable in ``cos_t`` and
        ``norms``; subclasses implement it."""
        raise NotImplementedError

    def nontarget(
        self, cos: torch.Tensor, rows: Rows, sl: slice, scratch: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Re-weighted non-target cosines ``f(cos)`` of rows ``sl`` and their slope
        (``has_nontarget`` losses).

        Args:
            cos: ``(B, K)`` fp32 cosines of rows ``sl`` (read only).
            rows: from ``prepare``. sl: the rows' slice of the gathered batch.
            scratch: ``scratch(name, like, dtype=None)`` gives a reusable tensor shaped like
                ``like`` (``heads.dist_softmax.Scratch``): write results there with ``out=``.

        Returns:
            ``(f, f')``: ``(B, K)`` fp32 tensors the caller may edit in place (scratch ones),
            valid until the next call.
        """
        raise NotImplementedError

    def regularizer(self, norms: torch.Tensor) -> torch.Tensor | None:
        """Loss term on the ``(N,)`` embedding norms (MagFace's ``lambda_g * g(a)``), a scalar
        added to the mean CE, or ``None``."""
        return None

    def target_logits(
        self, cos_t: torch.Tensor, norms: torch.Tensor | None = None, rows: Rows | None = None
    ) -> torch.Tensor:
        """Final target logits ``(N,)`` fp32: ``s * margin_cosine``. With ``margin_gradient``
        ``arcface_torch`` the value is the same but the slope is ``s`` in ``cos_t`` and 0 in
        ``norms`` (straight through, as arcface_torch's in-place edit under ``no_grad``)."""
        value = self.margin_cosine(cos_t, norms, rows if rows is not None else {}) * self.s
        if self.margin_gradient == "arcface_torch":
            plain = cos_t * self.s
            return plain + (value - plain).detach()
        return value

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
