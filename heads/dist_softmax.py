"""Margin softmax cross-entropy over class shards (model-parallel softmax), memory lean.

Each rank holds the cosines ``(N, K_r)`` of all ``N = sum_r B_r`` gathered rows with its own
``K_r`` (sampled) class centers. Per row, the max and the sum of exponentials are all-reduced, so
every rank computes the same loss: the mean over the global batch of ``logsumexp - target``.
Reference: An et al., "Partial FC", ICCVW 2021; Megatron-LM's vocab-parallel cross-entropy is the
same pattern.

Memory: the forward keeps one ``(N, K_r)`` fp32 buffer (the softmax), the backward turns it into
the gradient in place and returns it; there is no one-hot and no second ``(N, K_r)`` tensor. The
price: the graph can be backpropagated once (``retain_graph=True`` is refused).

Gradient convention: the backward is local, ``(softmax - onehot) * grad_out / N``, i.e. each shard
gets exactly its columns of the single-process gradient (see ``heads/comm.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from heads.comm import Topology

__all__ = ["margin_softmax_cross_entropy"]


class _MarginSoftmaxCE(torch.autograd.Function):
    # Fixed shapes throughout: every row has a target column (column 0 stands in for rows whose
    # target lives on another rank) and ``has`` (bool) masks the stand-ins, so nothing here
    # depends on label values (no nonzero, no boolean indexing: no host sync on CUDA).
    @staticmethod
    def forward(ctx, cos, cols, has, target_fn, scale, filter_mask, topo):
        n, k = cos.shape
        buf = cos.detach()
        # Target path: tiny (N,) autograd graph through the margin, differentiated in backward.
        with torch.enable_grad():
            if k > 0:
                cos_t = buf.gather(1, cols.unsqueeze(1)).squeeze(1)
            else:
                cos_t = buf.new_zeros(n)
            cos_t.requires_grad_(True)
            tgt = target_fn(cos_t)
        tgt_d = tgt.detach()
        buf.mul_(scale)  # cos's storage becomes the logits: no second (N, K) buffer
        if filter_mask is not None:
            buf.masked_fill_(filter_mask, 0.0)
        if k > 0:
            # Rows without a local target keep their own (scaled) logit at column 0.
            kept = buf.gather(1, cols.unsqueeze(1)).squeeze(1)
            buf.scatter_(1, cols.unsqueeze(1), torch.where(has, tgt_d, kept).unsqueeze(1))
            row_max = buf.max(dim=1).values
        else:  # this rank sampled no class: contributes exp(-inf) = 0 to every row
            row_max = torch.full((n,), float("-inf"), dtype=buf.dtype, device=buf.device)
        if topo.world_size > 1:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=topo.group)
        buf.sub_(row_max.unsqueeze(1)).exp_()

        # Row sums of exp and the shifted target logit, reduced together in one collective.
        red = torch.empty((2, n), dtype=buf.dtype, device=buf.device)
        torch.sum(buf, dim=1, out=red[0])
        red[1] = torch.where(has, tgt_d - row_max, 0.0)
        if topo.world_size > 1:
            dist.all_reduce(red, op=dist.ReduceOp.SUM, group=topo.group)
        sum_exp, shifted_target = red[0], red[1]
        loss = (torch.log(sum_exp) - shifted_target).sum() / n

        buf.div_(sum_exp.unsqueeze(1))  # softmax probabilities
        ctx.save_for_backward(buf, cols, has)
        ctx.target_graph = (cos_t, tgt)  # intermediates of the (N,) margin graph
        ctx.filter_mask = filter_mask
        ctx.scale = scale
        ctx.n = n
        ctx.used = False
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.used:
            raise RuntimeError(
                "heads/dist_softmax.py: the margin softmax CE reuses its buffer in backward; "
                "backpropagating twice (retain_graph=True) is not supported"
            )
        ctx.used = True
        grad, cols, has = ctx.saved_tensors
        cos_t, tgt = ctx.target_graph
        k = grad.shape[1]
        idx = cols.unsqueeze(1)
        coef = grad_out / ctx.n
        if k > 0:
            # d loss / d target logit = (p_t - 1) * coef on rows with a local target, else 0
            p_t = grad.gather(1, idx).squeeze(1)
            grad_tgt = torch.where(has, (p_t - 1.0) * coef, 0.0)
        else:
            grad_tgt = torch.zeros_like(cos_t)
        (grad_cos_t,) = torch.autograd.grad(tgt, cos_t, grad_tgt)
        grad.mul_(coef * ctx.scale)  # dL/dcos off target: p * s / N
        if ctx.filter_mask is not None:
            grad.masked_fill_(ctx.filter_mask, 0.0)  # filtered logits are constants
        if k > 0:
            # margin's own slope replaces s at the targets
            off = grad.gather(1, idx).squeeze(1)
            grad.scatter_(1, idx, torch.where(has, grad_cos_t, off).unsqueeze(1))
        return grad, None, None, None, None, None, None


def margin_softmax_cross_entropy(
    cos: torch.Tensor,
    labels: torch.Tensor,
    margin,
    topo: Topology,
    validate: bool = True,
) -> torch.Tensor:
    """Mean margin softmax cross-entropy of the global batch over sharded classes.

    Args:
        cos: ``(N, K)`` fp32 cosines of all gathered rows with this rank's (sampled) centers;
            requires grad as needed. Its storage is reused as the softmax buffer: ``cos`` is
            overwritten (autograd marks it dirty), read nothing from it afterwards.
        labels: ``(N,)`` int64 column of each row's target among the ``K`` local columns, or -1
            when the target class lives on another rank. Every row must have its target on
            exactly one rank (not checked across ranks: that would cost a collective).
        margin: a ``CombinedMarginLoss`` (uses ``s``, ``target_logit`` and ``filter_mask``).
        topo: the head's ``Topology``; all its ranks must call this with the same ``N``.
        validate: check the label range (reads two values back from the device: skip it on a
            hot path whose labels are correct by construction, as ``PartialFC``'s are).

    Returns:
        fp32 scalar, identical on every rank. Backward gives ``cos`` its local slice of the
        single-process gradient; it can run once.

    Raises:
        ValueError: wrong shapes/dtypes or (``validate``) a label outside ``[-1, K)``.
    """
    if cos.dim() != 2 or cos.dtype != torch.float32:
        raise ValueError(
            f"heads/dist_softmax.py: cos must be a 2-D fp32 tensor, got {tuple(cos.shape)} "
            f"{cos.dtype}"
        )
    if labels.shape != (cos.shape[0],) or labels.dtype != torch.int64:
        raise ValueError(
            f"heads/dist_softmax.py: labels must be int64 of shape ({cos.shape[0]},), got "
            f"{tuple(labels.shape)} {labels.dtype}"
        )
    if (
        validate
        and labels.numel()
        and (int(labels.min()) < -1 or int(labels.max()) >= cos.shape[1])
    ):
        raise ValueError(
            f"heads/dist_softmax.py: labels must be in [-1, {cos.shape[1]}), got "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    has = labels >= 0
    cols = labels.clamp_min(0)
    target_fn: Callable[[torch.Tensor], torch.Tensor] = margin.target_logit
    mask = margin.filter_mask(cos.detach(), labels)
    return _MarginSoftmaxCE.apply(cos, cols, has, target_fn, margin.s, mask, topo)
