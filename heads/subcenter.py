"""Sub-center ArcFace: K centers per class, the class's cosine is the largest of its K.

Reference: Deng et al., "Sub-center ArcFace: Boosting Face Recognition by Large-scale Noisy Web
Faces", ECCV 2020, Eq. 2: ``cos theta_j = max_k (x . W_jk) / (|x| |W_jk|)``; the margin (ArcFace
in the paper, any ``heads.margins.Margin`` here) and the softmax CE then act on these per-class
cosines. The paper's optional second stage (drop the non-dominant sub-centers and the samples
far from the dominant one, then retrain) is not done here.

Layout: class c's K rows are ``[c K, (c + 1) K)`` of the centers (class-major), so a class shard
``[start, start + n)`` is the row range ``[start K, (start + n) K)`` and re-sharding moves whole
classes. ``PartialFC`` samples classes and expands them to their rows (``expand_classes``); the
cosine GEMM gives ``(N, K_r K)``; ``subcenter_max`` reduces it to ``(N, K_r)`` for the CE.

Memory: the forward keeps the GEMM's ``(N, K_r K)`` output, the ``(N, K_r)`` maxima (the CE's
buffer) and a ``(N, K_r)`` uint8 arg-max; the backward writes the incoming ``(N, K_r)`` gradient
into the arg-max columns of the GEMM's own output buffer (zeros elsewhere) and hands that buffer
to the GEMM's backward: no one-hot, no second ``(N, K_r K)`` tensor; other temporaries are
per block of rows (``heads/dist_softmax.py``'s block size).
"""

from __future__ import annotations

from typing import Any

import torch

from heads.dist_softmax import Scratch, _blocks

__all__ = ["expand_classes", "subcenter_max", "check_num_subcenters", "MAX_SUBCENTERS"]


MAX_SUBCENTERS = 255  # the arg-max is stored as uint8


def check_num_subcenters(k: object) -> int:
    """``k`` as the number of sub-centers per class.

    Raises:
        ValueError: ``k`` is not an integer (bools refused) or is outside
            ``[1, MAX_SUBCENTERS]``.
    """
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_SUBCENTERS:
        raise ValueError(f"num_subcenters must be an integer in [1, {MAX_SUBCENTERS}], got {k!r}")
    return k


def expand_classes(index: torch.Tensor, k: int) -> torch.Tensor:
    """Rows of the classes ``index`` in a class-major ``(n K, D)`` center matrix.

    Args:
        index: ``(M,)`` int64 shard-local class ids, sorted.
        k: sub-centers per class (>= 1).

    Returns:
        ``(M K,)`` int64 rows ``c K + j`` for each ``c`` of ``index``, ``j < k``: sorted, and
        class ``index[i]``'s rows are ``[i K, (i + 1) K)`` of the result.
    """
    if k == 1:
        return index
    offsets = torch.arange(k, dtype=index.dtype, device=index.device)
    return (index.unsqueeze(1) * k + offsets).reshape(-1)


# Block-sized int64 arg-max temporaries, kept across blocks and steps.
_SCRATCH = Scratch()


class _SubcenterMax(torch.autograd.Function):
    # The arg-max is kept as uint8 (K <= 255 sub-centers): torch.max's int64 indices exist only
    # per block of rows, so no temporary of the reduced size times 8 bytes (for K = 2 that
    # would be as large as the GEMM's output).
    @staticmethod
    def forward(ctx: Any, cos: torch.Tensor, k: int) -> torch.Tensor:
        n, cols = cos.shape
        view = cos.detach().view(n, cols // k, k)
        best = cos.new_empty(n, cols // k)
        arg = torch.empty(best.shape, dtype=torch.uint8, device=cos.device)
        for sl in _blocks(n, cols):
            idx = _SCRATCH("index", best[sl], torch.int64)
            torch.max(view[sl], dim=2, out=(best[sl], idx))  # a NaN sub-center wins
            arg[sl].copy_(idx)
        ctx.buf = cos.detach()  # its storage becomes the gradient in backward
        ctx.arg = arg
        ctx.k = k
        return best

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        buf, arg, k = ctx.buf, ctx.arg, ctx.k
        ctx.buf = ctx.arg = None
        view = buf.view(buf.shape[0], -1, k)
        for sl in _blocks(buf.shape[0], buf.shape[1]):
            idx = _SCRATCH("index", arg[sl].unsqueeze(2), torch.int64)
            idx.copy_(arg[sl].unsqueeze(2))
            view[sl].zero_().scatter_(2, idx, grad[sl].unsqueeze(2))
        return buf, None


def subcenter_max(cos: torch.Tensor, k: int) -> torch.Tensor:
    """Per-class cosine: the max over each class's ``k`` consecutive columns (Eq. 2 of
    Sub-center ArcFace, Deng et al., ECCV 2020).

    Args:
        cos: ``(N, M k)`` fp32 cosines, columns in class-major order (``expand_classes``).
            Its storage is reused as the gradient buffer in backward: read nothing from it
            after the backward.
        k: sub-centers per class (>= 1); 1 returns ``cos`` itself.

    Returns:
        ``(N, M)`` fp32 maxima. Backward sends each entry's gradient to its arg-max column
        (``torch.max``'s index: one column even on ties) and 0 to the other ``k - 1``; it can
        run once.

    Raises:
        ValueError: ``k`` is not an integer in ``[1, 255]``, ``cos`` is not 2-D or its width is
            not a multiple of ``k``.
    """
    check_num_subcenters(k)
    if cos.dim() != 2 or cos.shape[1] % k:
        raise ValueError(f"cos must be (N, M * {k}), got {tuple(cos.shape)}")
    if k == 1:
        return cos
    out: torch.Tensor = _SubcenterMax.apply(cos, k)
    return out
