"""Margin losses of the Partial FC head, one module per family, chosen by name in ``registry``.

``base``: the ``Margin`` interface; ``combined``: ArcFace/CosFace/SphereFace
(``CombinedMarginLoss``); ``curricular``: CurricularFace; ``elastic``: ElasticFace;
``quality``: AdaFace and MagFace (norm-aware); ``registry``: ``LOSSES`` and ``build_margin``
(config ``head.loss`` / ``head.loss_kwargs``, docs/losses.md).
"""

from heads.margins.base import ARCCOS_EPS, CLAMPINGS, MARGIN_GRADIENTS, Margin, Rows, safe_arccos
from heads.margins.combined import CombinedMarginLoss
from heads.margins.curricular import CurricularFace
from heads.margins.elastic import ElasticFace, draw_margins
from heads.margins.quality import AdaFace, MagFace
from heads.margins.registry import LOSSES, build_margin, loss_arguments

__all__ = [
    "Margin",
    "Rows",
    "ARCCOS_EPS",
    "MARGIN_GRADIENTS",
    "CLAMPINGS",
    "safe_arccos",
    "CombinedMarginLoss",
    "CurricularFace",
    "ElasticFace",
    "draw_margins",
    "AdaFace",
    "MagFace",
    "LOSSES",
    "build_margin",
    "loss_arguments",
]
