"""Margin softmax cross-entropy over class shards (model-parallel softmax), memory lean.

Each rank holds the cosines ``(N, K_r)`` of all ``N = sum_r B_r`` gathered rows with its own
``K_r`` (sampled) class centers. Per row, the max and the sum of exponentials are all-reduced, so
every rank computes the same loss: the mean over the global batch of ``logsumexp - target``.
Reference: An et al., "Partial FC", ICCVW 2021; Megatron-LM's vocab-parallel cross-entropy is the
same pattern.

Memory: the forward keeps one ``(N, K_r)`` fp32 buffer (the softmax), the backward turns it into
the gradient in place and returns it; there is no one-hot and no second ``(N, K_r)`` tensor. The
price: the graph can be backpropagated once (``retain_graph=True`` is refused). Losses that
re-weight non-target logits (CurricularFace: ``s f(cos)``) form the logits per block of rows in a
block-sized temporary and leave ``p * f'(cos)`` in the buffer, so no second ``(N, K)`` tensor
either, and the backward is the same single pass.

Gradient convention: the backward is local, ``(softmax - onehot) * grad_out / N``, i.e. each shard
gets exactly its columns of the single-process gradient (see ``heads/comm.py``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from heads.comm import Topology
from heads.margins.base import Margin, Rows

__all__ = ["margin_softmax_cross_entropy"]


# -log(1e-30): arcface_torch's DistCrossEntropy clamps each target probability at 1e-30.
MAX_ROW_LOSS = 69.07755278982137
# Rows per block of the re-weighted non-target path: temporaries stay ~16 MB, not (N, K).
BLOCK_ELEMENTS = 1 << 22


def _blocks(n: int, k: int) -> list[slice]:
    step = max(1, BLOCK_ELEMENTS // max(k, 1))
    return [slice(a, min(a + step, n)) for a in range(0, n, step)]


class Scratch:
    """Block-sized temporaries of the re-weighting path, kept across blocks and steps: fresh
    large CPU allocations are page-faulted in on every use (the cost of a pass each)."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def __call__(
        self, name: str, like: torch.Tensor, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """A tensor shaped like ``like`` (``dtype`` or ``like``'s), contents undefined."""
        dtype = dtype or like.dtype
        t = self.buffers.get(name)
        if t is None or t.device != like.device or t.dtype != dtype or t.numel() < like.numel():
            t = self.buffers[name] = torch.empty(like.numel(), dtype=dtype, device=like.device)
        return t[: like.numel()].view(like.shape)


_SCRATCH = Scratch()


def _nontarget_block(
    margin: Margin,
    buf: torch.Tensor,
    rows: Rows,
    sl: slice,
    cols: torch.Tensor,
    has: torch.Tensor,
    tgt_d: torch.Tensor,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``sl`` of a re-weighting loss: their logits ``s f(cos)`` (final targets) in a
    block-sized temporary, the row max ``m`` and ``sum exp(logit - m)``; ``buf[sl]`` (the cosines)
    becomes ``exp(logit - m) * f'(cos)``, what the backward needs once rescaled per row."""
    logits, slope = margin.nontarget(buf[sl], rows, sl, _SCRATCH)
    logits.mul_(margin.s)
    if mask is not None:
        logits.masked_fill_(mask[sl], 0.0)
    idx = cols[sl].unsqueeze(1)
    kept = logits.gather(1, idx).squeeze(1)
    logits.scatter_(1, idx, torch.where(has[sl], tgt_d[sl], kept).unsqueeze(1))
    row_max = logits.max(dim=1).values
    sum_exp = logits.sub_(row_max.unsqueeze(1)).exp_().sum(dim=1)
    torch.mul(logits, slope, out=buf[sl])
    return row_max, sum_exp


def _target_logits(
    buf: torch.Tensor,
    norms: torch.Tensor | None,
    cols: torch.Tensor,
    has: torch.Tensor,
    margin: Margin,
    topo: Topology,
    update: bool,
) -> tuple[Rows, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The margin's per-row state and final target logits ``(N,)`` as a tiny autograd graph
    (differentiated in the backward): ``(rows, cos_t leaf, norms leaf or None, logits)``."""
    n, k = buf.shape
    cos_t_d = buf.gather(1, cols.unsqueeze(1)).squeeze(1) if k > 0 else buf.new_zeros(n)
    global_t = None
    if margin.needs_global_target:  # each row's target cosine, on every rank
        global_t = torch.where(has, cos_t_d, 0.0)
        if topo.world_size > 1:
            dist.all_reduce(global_t, op=dist.ReduceOp.SUM, group=topo.group)
    norms_d = None if norms is None else norms.detach()
    rows = margin.prepare(n, global_t, norms_d, update)
    with torch.enable_grad():
        cos_t = cos_t_d.clone().requires_grad_(True)
        norms_leaf = None
        if norms is not None and norms_d is not None:
            norms_leaf = norms_d.clone().requires_grad_(norms.requires_grad)
        tgt = margin.target_logits(cos_t, norms_leaf, rows)
    return rows, cos_t, norms_leaf, tgt


class _MarginSoftmaxCE(torch.autograd.Function):
    # Fixed shapes throughout: every row has a target column (column 0 stands in for rows whose
    # target lives on another rank) and ``has`` (bool) masks the stand-ins, so nothing here
    # depends on label values (no nonzero, no boolean indexing: no host sync on CUDA).
    @staticmethod
    def forward(
        ctx: Any,
        cos: torch.Tensor,
        norms: torch.Tensor | None,
        cols: torch.Tensor,
        has: torch.Tensor,
        margin: Margin,
        topo: Topology,
        update: bool,
    ) -> torch.Tensor:
        n, k = cos.shape
        buf = cos.detach()
        if margin.clamping == "arcface_torch":
            buf.clamp_(-1.0, 1.0)  # value only: the slope passes straight through
        rows, cos_t, norms_leaf, tgt = _target_logits(buf, norms, cols, has, margin, topo, update)
        tgt_d = tgt.detach()
        mask = margin.filter_mask(buf, torch.where(has, cols, -1))
        red = torch.zeros((2, n), dtype=buf.dtype, device=buf.device)
        row_max = torch.full((n,), float("-inf"), dtype=buf.dtype, device=buf.device)
        if margin.has_nontarget:
            # Logits live in block-sized temporaries; buf ends as p * f'(cos), so the backward
            # is the same one pass as for plain margins.
            for sl in _blocks(n, k) if k > 0 else []:
                row_max[sl], red[0, sl] = _nontarget_block(
                    margin, buf, rows, sl, cols, has, tgt_d, mask
                )
            local_max = row_max.clone()
        else:
            buf.mul_(margin.s)  # cos's storage becomes the logits: no second (N, K) buffer
            if mask is not None:
                buf.masked_fill_(mask, 0.0)
            if k > 0:
                # Rows without a local target keep their own (scaled) logit at column 0.
                kept = buf.gather(1, cols.unsqueeze(1)).squeeze(1)
                buf.scatter_(1, cols.unsqueeze(1), torch.where(has, tgt_d, kept).unsqueeze(1))
                row_max = buf.max(dim=1).values
            # else this rank sampled no class: it contributes exp(-inf) = 0 to every row
        if topo.world_size > 1:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=topo.group)

        # Row sums of exp and the shifted target logit, reduced together in one collective.
        if margin.has_nontarget:
            red[0].mul_(torch.exp(local_max - row_max))  # local sums, rebased on the global max
        else:
            buf.sub_(row_max.unsqueeze(1)).exp_()
            torch.sum(buf, dim=1, out=red[0])
        red[1] = torch.where(has, tgt_d - row_max, 0.0)
        if topo.world_size > 1:
            dist.all_reduce(red, op=dist.ReduceOp.SUM, group=topo.group)
        sum_exp, shifted_target = red[0], red[1]
        row_loss = torch.log(sum_exp) - shifted_target
        if margin.clamping == "arcface_torch":
            row_loss = row_loss.clamp_max(MAX_ROW_LOSS)  # the value only, as arcface_torch
        loss = row_loss.sum() / n

        if margin.has_nontarget:
            # exp(logit - local max) * f' -> p * f'; p_t for the backward from (N,) values
            buf.mul_((torch.exp(local_max - row_max) / sum_exp).unsqueeze(1))
            ctx.p_t = torch.exp(tgt_d - row_max) / sum_exp
        else:
            buf.div_(sum_exp.unsqueeze(1))  # softmax probabilities
        ctx.save_for_backward(buf, cols, has)
        ctx.target_graph = (cos_t, norms_leaf, tgt)  # intermediates of the (N,) margin graph
        ctx.filter_mask = mask
        ctx.scale = margin.s
        ctx.nontarget = margin.has_nontarget
        ctx.n = n
        ctx.used = False
        return loss

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        if ctx.used:
            raise RuntimeError(
                "the margin softmax CE reuses its buffer in backward; "
                "backpropagating twice (retain_graph=True) is not supported"
            )
        ctx.used = True
        grad, cols, has = ctx.saved_tensors
        cos_t, norms_leaf, tgt = ctx.target_graph
        k = grad.shape[1]
        idx = cols.unsqueeze(1)
        coef = grad_out / ctx.n
        if ctx.nontarget:
            p_t = ctx.p_t
        elif k > 0:
            p_t = grad.gather(1, idx).squeeze(1)
        if k > 0:
            # d loss / d target logit = (p_t - 1) * coef on rows with a local target, else 0
            grad_tgt = torch.where(has, (p_t - 1.0) * coef, 0.0)
        else:
            grad_tgt = torch.zeros_like(cos_t)
        inputs = [cos_t] + (
            [norms_leaf] if norms_leaf is not None and norms_leaf.requires_grad else []
        )
        grads = torch.autograd.grad(tgt, inputs, grad_tgt, allow_unused=True)
        grad_cos_t = grads[0] if grads[0] is not None else torch.zeros_like(cos_t)
        grad_norms = None
        if len(grads) > 1:
            grad_norms = grads[1] if grads[1] is not None else torch.zeros_like(norms_leaf)
        # dL/dcos off target: p * s / N (buf holds p, or p * f'(cos) for re-weighting losses)
        grad.mul_(coef * ctx.scale)
        if ctx.filter_mask is not None:
            grad.masked_fill_(ctx.filter_mask, 0.0)  # filtered logits are constants
        if k > 0:
            # margin's own slope replaces s at the targets
            off = grad.gather(1, idx).squeeze(1)
            grad.scatter_(1, idx, torch.where(has, grad_cos_t, off).unsqueeze(1))
        return grad, grad_norms, None, None, None, None, None


def margin_softmax_cross_entropy(
    cos: torch.Tensor,
    labels: torch.Tensor,
    margin: Margin,
    topo: Topology,
    validate: bool = True,
    norms: torch.Tensor | None = None,
    update: bool = False,
) -> torch.Tensor:
    """Mean margin softmax cross-entropy of the global batch over sharded classes.

    Args:
        cos: ``(N, K)`` fp32 cosines of all gathered rows with this rank's (sampled) centers;
            requires grad as needed. Its storage is reused as the softmax buffer: ``cos`` is
            overwritten (autograd marks it dirty), read nothing from it afterwards.
        labels: ``(N,)`` int64 column of each row's target among the ``K`` local columns, or -1
            when the target class lives on another rank. Every row must have its target on
            exactly one rank (not checked across ranks: that would cost a collective).
        margin: a ``heads.margins.Margin`` (``CombinedMarginLoss``, ``AdaFace``, ...).
        topo: the head's ``Topology``; all its ranks must call this with the same ``N``.
        validate: check the label range (reads two values back from the device: skip it on a
            hot path whose labels are correct by construction, as ``PartialFC``'s are).
        norms: ``(N,)`` fp32 un-normalized embedding norms of the gathered rows (norm-aware
            margins; may require grad), identical on every rank; ``None`` otherwise.
        update: a training forward: the margin advances its state (EMA, t, RNG).

    Returns:
        fp32 scalar, identical on every rank. Backward gives ``cos`` its local slice of the
        single-process gradient (and ``norms`` this rank's part of theirs); it can run once.

    Raises:
        ValueError: wrong shapes/dtypes, a norm-aware margin without ``norms``, or
            (``validate``) a label outside ``[-1, K)``.
    """
    if cos.dim() != 2 or cos.dtype != torch.float32:
        raise ValueError(f"cos must be a 2-D fp32 tensor, got {tuple(cos.shape)} {cos.dtype}")
    if labels.shape != (cos.shape[0],) or labels.dtype != torch.int64:
        raise ValueError(
            f"labels must be int64 of shape ({cos.shape[0]},), got "
            f"{tuple(labels.shape)} {labels.dtype}"
        )
    if (
        validate
        and labels.numel()
        and (int(labels.min()) < -1 or int(labels.max()) >= cos.shape[1])
    ):
        raise ValueError(
            f"labels must be in [-1, {cos.shape[1]}), got "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    if margin.needs_norms and (norms is None or norms.shape != (cos.shape[0],)):
        raise ValueError(f"{type(margin).__name__} needs the ({cos.shape[0]},) embedding norms")
    has = labels >= 0
    cols = labels.clamp_min(0)
    loss: torch.Tensor = _MarginSoftmaxCE.apply(cos, norms, cols, has, margin, topo, update)
    return loss
