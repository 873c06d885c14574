"""The margin losses by name (config ``head.loss``) and one builder for all of them.

``LOSSES`` maps a name to ``(class, fixed keyword arguments)``; ``head.loss_kwargs`` from the
config may set any other constructor argument (``m``, ``std``, ``plus``, ``lambda_g``, ...).
``combined`` is arcface_torch's ``margin_list`` (m1, m2, m3); ``arcface`` and ``cosface`` are the
two classic points of it with the papers' margins (override with ``loss_kwargs: {m: ...}``).
"""

from __future__ import annotations

import inspect
from typing import Any

from heads.margins.base import Margin
from heads.margins.combined import CombinedMarginLoss
from heads.margins.curricular import CurricularFace
from heads.margins.elastic import ElasticFace
from heads.margins.quality import AdaFace, MagFace

__all__ = ["LOSSES", "build_margin", "loss_arguments"]


def _arcface(m: float = 0.5, **kw: Any) -> CombinedMarginLoss:
    """ArcFace (Deng et al., CVPR 2019): ``s * cos(theta + m)``."""
    return CombinedMarginLoss(m1=1.0, m2=m, m3=0.0, **kw)


def _cosface(m: float = 0.4, **kw: Any) -> CombinedMarginLoss:
    """CosFace (Wang et al., CVPR 2018): ``s * (cos theta - m)``."""
    return CombinedMarginLoss(m1=1.0, m2=0.0, m3=m, **kw)


LOSSES: dict[str, tuple[Any, dict[str, Any]]] = {
    "combined": (CombinedMarginLoss, {}),
    "arcface": (_arcface, {}),
    "cosface": (_cosface, {}),
    "curricularface": (CurricularFace, {}),
    "elasticface_arc": (ElasticFace, {"kind": "arc", "m": 0.5, "std": 0.05}),
    "elasticface_cos": (ElasticFace, {"kind": "cos", "m": 0.35, "std": 0.05}),
    "elasticface_arc_plus": (ElasticFace, {"kind": "arc", "m": 0.5, "std": 0.0175, "plus": True}),
    "elasticface_cos_plus": (ElasticFace, {"kind": "cos", "m": 0.35, "std": 0.025, "plus": True}),
    "adaface": (AdaFace, {}),
    "magface": (MagFace, {}),
}
# Set by build_margin from other config fields, never through loss_kwargs.
_RESERVED = (
    "s",
    "m1",
    "m2",
    "m3",
    "seed",
    "interclass_filtering_threshold",
    "margin_gradient",
    "clamping",
    "kind",
)


def loss_arguments(name: str) -> tuple[str, ...]:
    """Names ``head.loss_kwargs`` may set for loss ``name`` (its constructor's own arguments).

    Raises:
        ValueError: unknown name.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(LOSSES)}")
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = inspect.signature(LOSSES[name][0]).parameters.values()
    return tuple(p.name for p in params if p.kind in named and p.name not in _RESERVED)


def build_margin(
    name: str = "combined",
    s: float = 64.0,
    margin_list: tuple[float, float, float] = (1.0, 0.5, 0.0),
    interclass_filtering_threshold: float = 0.0,
    margin_gradient: str = "exact",
    clamping: str = "none",
    seed: int = 0,
    loss_kwargs: dict[str, Any] | None = None,
) -> Margin:
    """The margin loss ``name`` of ``LOSSES`` with the head's common options.

    Args:
        name: a key of ``LOSSES``.
        s: logit scale. margin_list: ``(m1, m2, m3)``, read by ``combined`` only.
        interclass_filtering_threshold, margin_gradient, clamping: ``heads.margins.Margin``.
        seed: seeds per-loss randomness (ElasticFace's margins), the same on every rank.
        loss_kwargs: the loss's own arguments (``loss_arguments(name)``).

    Returns:
        a ``heads.margins.Margin``.

    Raises:
        ValueError: unknown name or argument, or a value the loss refuses (one line naming it).
    """
    kwargs = dict(loss_kwargs or {})
    allowed = loss_arguments(name)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(
            f"loss {name!r} has no argument {unknown[0]!r}; valid: {', '.join(allowed) or 'none'}"
        )
    fn, fixed = LOSSES[name]
    args: dict[str, Any] = {**fixed, **kwargs}
    args.update(
        s=s,
        interclass_filtering_threshold=interclass_filtering_threshold,
        margin_gradient=margin_gradient,
        clamping=clamping,
    )
    if name == "combined":
        args.update(m1=margin_list[0], m2=margin_list[1], m3=margin_list[2])
    if fn is ElasticFace:
        args["seed"] = seed
    margin: Margin = fn(**args)
    return margin
