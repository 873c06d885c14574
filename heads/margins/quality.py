"""Margins adapted to the embedding norm (a proxy of image quality): AdaFace and MagFace.

AdaFace: Kim et al., "AdaFace: Quality Adaptive Margin for Face Recognition", CVPR 2022. With
``z = clip((||f|| - mu) / (sigma + eps) * h, -1, 1)`` from the detached norm ``||f||`` (clipped to
[0.001, 100]) and the EMA ``mu``, ``sigma`` of the batch's norm mean and (unbiased) std
(``x <- alpha * batch + (1 - alpha) * x``, updated before use; ``mu_0 = 20``, ``sigma_0 = 100``):
target logit ``s * (cos(clip(theta_y - m z, eps, pi - eps)) - (m + m z))``, target cosine first
clipped to ``[-1 + eps, 1 - eps]`` (eps 1e-3, as the authors' code). The statistics are those of
the gathered global batch (every rank holds all N norms), so the buffers are identical on every
rank.

MagFace: Meng et al., "MagFace: A Universal Representation for Face Recognition and Quality
Assessment", CVPR 2021. With ``a = clip(||f||, l_a, u_a)``: margin ``m(a) = (u_m - l_m) / (u_a -
l_a) * (a - l_a) + l_m``, target logit ``s * cos(theta_y + m(a))`` where ``cos theta_y > cos(pi -
m(a))``, else ``s * (cos theta_y - m(a) sin(pi - m(a)))`` (the authors' fallback), and the loss adds
``lambda_g * mean(g(a))``, ``g(a) = 1/a + a/u_a^2``. Gradients flow into the norm through both.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from heads.margins.base import Margin, Rows, safe_arccos

__all__ = ["AdaFace", "MagFace"]


class AdaFace(Margin):
    """AdaFace margin (module doc).

    Args:
        s: scale (64). m: margin (0.4). h: concentration (0.333). alpha: EMA momentum (0.01).
        eps: cosine and angle clip (1e-3).
        **base: ``Margin`` options.

    Buffers:
        batch_mean, batch_std: 0-dim fp32 EMA of the norm statistics, saved with the head.

    Raises:
        ValueError: a parameter outside ``m >= 0``, ``h > 0``, ``0 < alpha <= 1``,
            ``0 < eps < 0.1``.
    """

    needs_norms = True
    batch_mean: torch.Tensor
    batch_std: torch.Tensor

    def __init__(
        self,
        s: float = 64.0,
        m: float = 0.4,
        h: float = 0.333,
        alpha: float = 0.01,
        eps: float = 1e-3,
        **base: Any,
    ) -> None:
        super().__init__(s, **base)
        if not (m >= 0 and h > 0 and 0 < alpha <= 1 and 0 < eps < 0.1):
            raise ValueError(
                "AdaFace needs m >= 0, h > 0, 0 < alpha <= 1, "
                f"0 < eps < 0.1, got m={m}, h={h}, alpha={alpha}, eps={eps}"
            )
        self.m, self.h, self.alpha, self.eps = float(m), float(h), float(alpha), float(eps)
        self.register_buffer("batch_mean", torch.tensor(20.0))
        self.register_buffer("batch_std", torch.tensor(100.0))

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}, h={self.h}, alpha={self.alpha}"

    @torch.no_grad()
    def prepare(
        self, n: int, cos_target: torch.Tensor | None, norms: torch.Tensor | None, update: bool
    ) -> Rows:
        """Updates the EMA (training, N >= 2) and returns the ``(N,)`` margin scalers ``z``."""
        assert norms is not None
        safe = norms.clamp(0.001, 100.0)
        if update and n >= 2:
            self.batch_mean.mul_(1 - self.alpha).add_(safe.mean(), alpha=self.alpha)
            self.batch_std.mul_(1 - self.alpha).add_(safe.std(), alpha=self.alpha)
        z = (safe - self.batch_mean) / (self.batch_std + self.eps) * self.h
        return {"z": z.clamp(-1.0, 1.0)}

    def margin_cosine(
        self, cos_t: torch.Tensor, norms: torch.Tensor | None, rows: Rows
    ) -> torch.Tensor:
        z = rows["z"]
        theta = torch.arccos(cos_t.clamp(-1 + self.eps, 1 - self.eps))
        theta_m = (theta - self.m * z).clamp(self.eps, math.pi - self.eps)
        out: torch.Tensor = torch.cos(theta_m) - (self.m + self.m * z)
        return out


class MagFace(Margin):
    """MagFace margin and magnitude regularizer (module doc).

    Args:
        s: scale (64). l_a, u_a: norm bounds (10, 110). l_m, u_m: margins at those bounds
            (0.45, 0.8 radians). lambda_g: regularizer weight (35).
        **base: ``Margin`` options.

    Raises:
        ValueError: unless ``0 < l_a < u_a``, ``0 <= l_m <= u_m < pi``, ``lambda_g >= 0``.
    """

    needs_norms = True

    def __init__(
        self,
        s: float = 64.0,
        l_a: float = 10.0,
        u_a: float = 110.0,
        l_m: float = 0.45,
        u_m: float = 0.8,
        lambda_g: float = 35.0,
        **base: Any,
    ) -> None:
        super().__init__(s, **base)
        if not (0 < l_a < u_a and 0 <= l_m <= u_m < math.pi and lambda_g >= 0):
            raise ValueError(
                "MagFace needs 0 < l_a < u_a, 0 <= l_m <= u_m < pi, "
                f"lambda_g >= 0, got l_a={l_a}, u_a={u_a}, l_m={l_m}, u_m={u_m}, "
                f"lambda_g={lambda_g}"
            )
        self.l_a, self.u_a, self.l_m, self.u_m = float(l_a), float(u_a), float(l_m), float(u_m)
        self.lambda_g = float(lambda_g)

    def extra_repr(self) -> str:
        return (
            f"s={self.s}, l_a={self.l_a}, u_a={self.u_a}, l_m={self.l_m}, u_m={self.u_m}, "
            f"lambda_g={self.lambda_g}"
        )

    def margin_cosine(
        self, cos_t: torch.Tensor, norms: torch.Tensor | None, rows: Rows
    ) -> torch.Tensor:
        assert norms is not None
        a = norms.clamp(self.l_a, self.u_a)
        m = (self.u_m - self.l_m) / (self.u_a - self.l_a) * (a - self.l_a) + self.l_m
        arc = torch.cos(safe_arccos(cos_t) + m)
        return torch.where(cos_t > torch.cos(math.pi - m), arc, cos_t - torch.sin(math.pi - m) * m)

    def regularizer(self, norms: torch.Tensor) -> torch.Tensor:
        """``lambda_g * mean(1/a + a/u_a^2)`` over the ``(N,)`` norms (fp32 scalar)."""
        a = norms.clamp(self.l_a, self.u_a)
        reg: torch.Tensor = self.lambda_g * (1.0 / a + a / self.u_a**2).mean()
        return reg
