"""Cosine logits of unit embeddings with un-normalized class centers, as autograd Functions.

The head's GEMMs: ``cos = e_n @ (w / |w|)^T`` for the ``(N, D)`` unit embeddings and the ``(K, D)``
sampled centers, forward and backward, without materializing the normalized centers; the
precision of the three GEMMs (``LOGITS_DTYPES``); and the buffers a training forward keeps across
steps (``CosineWorkspace``), through which the centers' gradient reaches ``PartialFC`` instead of
autograd. Reference: arcface_torch ``partial_fc_v2.PartialFC_V2`` computes the same logits as
``F.linear(F.normalize(e), F.normalize(w))``.
"""

from __future__ import annotations

from typing import Any

import torch

from heads.fused import radial_coef

__all__ = [
    "LOGITS_DTYPES",
    "resolve_logits_dtype",
    "normalize_rows",
    "cosine_logits",
    "CosineWorkspace",
]

LOGITS_DTYPES = ("fp32", "tf32", "bf16")


def resolve_logits_dtype(name: str, device: torch.device, precision: str) -> str:
    """The head's GEMM precision for a config value (``head.logits_dtype``).

    ``auto``: on CUDA ``bf16`` when the engine trains in bf16, ``tf32`` otherwise (fast either
    way; the softmax stays fp32); ``fp32`` elsewhere (CPUs gain nothing from bf16 GEMMs here).
    Other values are returned as given.

    Raises:
        ValueError: a name outside ``auto`` and ``LOGITS_DTYPES``.
    """
    if name == "auto":
        if torch.device(device).type != "cuda":
            return "fp32"
        return "bf16" if precision == "bf16" else "tf32"
    if name not in LOGITS_DTYPES:
        raise ValueError(f"logits dtype must be auto or one of {LOGITS_DTYPES}, got {name!r}")
    return name


class _NormalizeRows(torch.autograd.Function):
    """``x / ||x||`` per row with a fused backward (autograd's ``F.normalize`` graph makes ~5
    temporaries of the input's size; this makes one)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, eps: float) -> torch.Tensor:
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min_(eps)
        y: torch.Tensor = x / norm
        ctx.save_for_backward(y, norm)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        y, norm = ctx.saved_tensors
        # d(x/|x|) = (g - y <y, g>) / |x|
        dot = torch.linalg.vecdot(y, grad, dim=1).unsqueeze(1)
        return torch.addcmul(grad, y, dot, value=-1.0).div_(norm), None


def normalize_rows(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Row-wise L2 normalization, same values as ``F.normalize(x, dim=1, eps=eps)``.

    Args:
        x: ``(R, D)`` float tensor.
        eps: lower bound of the norm (the gradient assumes norms above it).

    Returns:
        ``(R, D)`` unit rows, same dtype.
    """
    out: torch.Tensor = _NormalizeRows.apply(x, eps)
    return out


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as fp32: bf16 operands accumulate in fp32 (CUDA returns fp32 directly; other
    devices round the product to bf16 first, then widen)."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).float()


class _tf32:
    """Let CUDA fp32 GEMMs use TF32 inside the block, restoring the global setting after.

    Through torch's current switch (``torch.backends.cuda.matmul.fp32_precision``): once a user
    set TF32 that way (or through ``torch.backends.fp32_precision``), reading the legacy
    ``allow_tf32`` raises in torch 2.14, so the legacy flag is never touched here.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self) -> None:
        if self.enabled:
            self.saved = torch.backends.cuda.matmul.fp32_precision
            torch.backends.cuda.matmul.fp32_precision = "tf32"

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            torch.backends.cuda.matmul.fp32_precision = self.saved


class CosineWorkspace:
    """Buffers of one recorded forward, kept across steps so that large CPU tensors are not
    re-allocated (and page-faulted) every step; ``leaf`` receives the centers' gradient.

    Args:
        fused: the backward's radial correction runs as a compiled kernel (``heads/fused.py``).

    Attributes:
        leaf: ``(K, D)`` fp32 sampled rows of the forward (set by ``PartialFC``); the backward
            writes ``leaf.grad`` = ``a`` without the radial part (see ``coef``).
        coef: ``(K,)`` fp32 radial coefficients still to subtract, ``grad = a - coef * leaf``;
            ``None`` once applied (``materialize``) or handed to the optimizer.
        probe: 0-dim fp32, finite iff ``leaf.grad`` is (``None`` before the backward).
        buffers: the kept tensors by name (``cos`` ``(N, K)``, ``grad``, ``scratch``, ``rows``).
    """

    def __init__(self, fused: bool = False) -> None:
        self.fused = fused  # compiled kernels (heads/fused.py) for the backward's row pass
        self.buffers: dict[str, torch.Tensor] = {}
        self.leaf: torch.Tensor | None = None
        self.probe: torch.Tensor | None = None
        self.coef: torch.Tensor | None = None  # radial part still to remove from leaf.grad

    def materialize(self) -> None:
        """Apply the pending radial correction: ``leaf.grad -= coef * leaf`` (once)."""
        if self.coef is not None and self.leaf is not None and self.leaf.grad is not None:
            self.leaf.grad.addcmul_(self.leaf.detach(), self.coef.unsqueeze(1), value=-1.0)
        self.coef = None

    def get(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The kept buffer ``name`` shaped like ``like`` (same dtype and device)."""
        return self.buffer(name, tuple(like.shape), like)

    def buffer(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """The kept buffer ``name`` of ``shape`` with ``like``'s dtype and device."""
        t = self.buffers.get(name)
        if t is None or t.shape != shape or t.dtype != like.dtype or t.device != like.device:
            t = self.buffers[name] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return t


class _CosineLinear(torch.autograd.Function):
    """``cos[i, j] = e_i . w_j / |w_j|`` for unit rows ``e`` without materializing the
    normalized centers: the ``(K, D)`` division is replaced by scaling the ``(N, K)`` product,
    and the backward projects out the radial part with one dot product per center.
    With ``dtype`` bf16 the three GEMMs take bf16 operands and return fp32."""

    @staticmethod
    def forward(
        ctx: Any,
        emb_n: torch.Tensor,
        rows: torch.Tensor,
        eps: float,
        mode: str,
        workspace: CosineWorkspace | None,
    ) -> torch.Tensor:
        inv = torch.linalg.vector_norm(rows, dim=1).clamp_min_(eps).reciprocal_()
        dtype = torch.bfloat16 if mode == "bf16" else torch.float32
        e_op, w_op = emb_n.to(dtype), rows.to(dtype)
        with _tf32(mode == "tf32"):
            if workspace is not None and dtype == torch.float32:
                # A kept (N, K) buffer: a fresh one is page-faulted in on every step (~1/3 of
                # the forward GEMM's time on CPU). The CE turns it into the gradient, consumed
                # by this backward before the next forward writes it again.
                out = workspace.buffer("cos", (e_op.shape[0], w_op.shape[0]), e_op)
                cos = torch.mm(e_op, w_op.t(), out=out).mul_(inv)
            else:
                cos = _mm(e_op, w_op.t()).mul_(inv)
        ctx.save_for_backward(e_op, w_op, rows, inv)
        ctx.mode = mode
        ctx.workspace = workspace
        return cos

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        e_op, w_op, rows, inv = ctx.saved_tensors
        # g = G / |w| per column, so grad_e = g @ w and a = g^T e need no normalized centers.
        # The CE hands over its own buffer: scale it in place (no third (N, K) tensor).
        g = grad.mul_(inv).to(e_op.dtype)
        grad_e = grad_w = None
        with _tf32(ctx.mode == "tf32"):
            if ctx.needs_input_grad[0]:
                grad_e = _mm(g, w_op)
            if ctx.needs_input_grad[1]:
                ws = ctx.workspace
                if ws is not None and g.dtype == torch.float32:
                    grad_w = torch.mm(g.t(), e_op, out=ws.get("grad", rows))
                else:
                    grad_w = _mm(g.t(), e_op)
        if grad_w is not None:
            # dL/dw_j = a_j - (a_j . w_j) w_j / |w_j|^2: drop the radial part of a_j.
            ws = ctx.workspace
            if ws is not None and ws.fused:  # one read of each array, no (K, D) product
                coef, probe = radial_coef(grad_w, rows, inv)
            else:  # (vecdot would allocate a (K, D) product each call: reuse a scratch buffer)
                prod = torch.mul(grad_w, rows, out=None if ws is None else ws.get("scratch", rows))
                coef = prod.sum(dim=1).mul_(inv).mul_(inv)
                probe = None
            if ctx.workspace is None:
                grad_w.addcmul_(rows, coef.unsqueeze(1), value=-1.0)
            else:  # hand the gradient to the head, not to autograd
                # Kept as (a, coef): the optimizer folds "- coef * w" into its own pass over
                # the rows; PartialFC.sparse_grad applies it for every other reader.
                ws = ctx.workspace
                ws.leaf.grad, ws.coef = grad_w, coef
                # Non-finite iff some grad_w entry was (each enters a product with finite w):
                # the optimizer's finiteness check reads K values instead of K * D.
                ws.probe = coef.sum() if probe is None else probe
                grad_w = None
        return grad_e, grad_w, None, None, None


def cosine_logits(
    emb_n: torch.Tensor,
    rows: torch.Tensor,
    mode: str = "fp32",
    workspace: CosineWorkspace | None = None,
) -> torch.Tensor:
    """Cosines of unit embeddings with (unnormalized) centers: ``emb_n @ (rows / |rows|)^T``.

    Args:
        emb_n: ``(N, D)`` fp32 unit rows (``normalize_rows`` output).
        rows: ``(K, D)`` fp32 centers.
        mode: GEMM precision, one of ``LOGITS_DTYPES``: ``fp32``; ``tf32`` (TF32 tensor cores
            on CUDA, plain fp32 elsewhere); ``bf16`` (bf16 operands, fp32 accumulation, fp32
            result; the backward GEMMs likewise).
        workspace: a training forward's ``CosineWorkspace`` whose ``leaf`` is ``rows``, or
            ``None`` (plain autograd for both inputs).

    Returns:
        ``(N, K)`` fp32, equal to ``F.linear(emb_n, normalize_rows(rows))`` up to rounding.
        With a ``workspace`` (``PartialFC``'s), the centers' gradient is stored in
        ``workspace.leaf.grad`` (a reused buffer) instead of flowing through autograd.

    Raises:
        ValueError: ``mode`` outside ``LOGITS_DTYPES``.
    """
    if mode not in LOGITS_DTYPES:
        raise ValueError(f"logits dtype must be one of {LOGITS_DTYPES}, got {mode!r}")
    out: torch.Tensor = _CosineLinear.apply(emb_n, rows, 1e-12, mode, workspace)
    return out
