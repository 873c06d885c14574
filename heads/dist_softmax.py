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
    @staticmethod
    def forward(ctx, cos, rows, cols, target_fn, scale, filter_mask, topo):
        n = cos.shape[0]
        # Target path: tiny (P,) autograd graph through the margin, differentiated in backward.
        with torch.enable_grad():
            cos_t = cos.detach()[rows, cols].requires_grad_(True)
            tgt = target_fn(cos_t)
        buf = cos.detach() * scale
        if filter_mask is not None:
            buf.masked_fill_(filter_mask, 0.0)
        buf[rows, cols] = tgt.detach()

        if buf.shape[1] > 0:
            row_max = buf.max(dim=1).values
        else:  # this rank sampled no class: contributes exp(-inf) = 0 to every row
            row_max = torch.full((n,), float("-inf"), dtype=buf.dtype, device=buf.device)
        if topo.world_size > 1:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=topo.group)
        buf.sub_(row_max.unsqueeze(1)).exp_()

        # Row sums of exp and the shifted target logit, reduced together in one collective.
        red = torch.zeros((2, n), dtype=buf.dtype, device=buf.device)
        red[0] = buf.sum(dim=1)
        red[1, rows] = tgt.detach() - row_max[rows]
        if topo.world_size > 1:
            dist.all_reduce(red, op=dist.ReduceOp.SUM, group=topo.group)
        sum_exp, shifted_target = red[0], red[1]
        loss = (torch.log(sum_exp) - shifted_target).sum() / n

        buf.div_(sum_exp.unsqueeze(1))  # softmax probabilities
        ctx.save_for_backward(buf, rows, cols)
        ctx.target_graph = (cos_t, tgt)  # intermediates of the (P,) margin graph
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
        grad, rows, cols = ctx.saved_tensors
        cos_t, tgt = ctx.target_graph
        grad[rows, cols] -= 1.0
        grad.mul_(grad_out / ctx.n)  # dL/dlogits, local columns only
        grad_tgt = grad[rows, cols]
        (grad_cos_t,) = torch.autograd.grad(tgt, cos_t, grad_tgt)
        if ctx.filter_mask is not None:
            grad.masked_fill_(ctx.filter_mask, 0.0)  # filtered logits are constants
        grad.mul_(ctx.scale)
        grad[rows, cols] = grad_cos_t  # margin's own slope replaces s at the targets
        return grad, None, None, None, None, None, None


def margin_softmax_cross_entropy(
    cos: torch.Tensor,
    labels: torch.Tensor,
    margin,
    topo: Topology,
) -> torch.Tensor:
    """Mean margin softmax cross-entropy of the global batch over sharded classes.

    Args:
        cos: ``(N, K)`` fp32 cosines of all gathered rows with this rank's (sampled) centers;
            requires grad as needed.
        labels: ``(N,)`` int64 column of each row's target among the ``K`` local columns, or -1
            when the target class lives on another rank. Every row must have its target on
            exactly one rank (not checked across ranks: that would cost a collective).
        margin: a ``CombinedMarginLoss`` (uses ``s``, ``target_logit`` and ``filter_mask``).
        topo: the head's ``Topology``; all its ranks must call this with the same ``N``.

    Returns:
        fp32 scalar, identical on every rank. Backward gives ``cos`` its local slice of the
        single-process gradient; it can run once.

    Raises:
        ValueError: wrong shapes/dtypes or a label outside ``[-1, K)``.
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
    if labels.numel() and (int(labels.min()) < -1 or int(labels.max()) >= cos.shape[1]):
        raise ValueError(
            f"heads/dist_softmax.py: labels must be in [-1, {cos.shape[1]}), got "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    rows = torch.nonzero(labels != -1).squeeze(1)
    cols = labels[rows]
    target_fn: Callable[[torch.Tensor], torch.Tensor] = margin.target_logit
    mask = margin.filter_mask(cos.detach(), rows, cols)
    return _MarginSoftmaxCE.apply(cos, rows, cols, target_fn, margin.s, mask, topo)
