"""Synchronized BatchNorm for every device, including CPU ranks over gloo.

Each backbone ends in BatchNorm layers that normalize with the statistics of the batch they see.
With per-rank statistics the forward depends on how the global batch is split, so a run resumed on
another world size computes a different loss from the same weights and the same samples
(docs/reliability.md). Synchronized BatchNorm (Ioffe & Szegedy 2015 statistics taken over the
global batch, as in Peng et al. 2018, "MegDet") removes that dependence.

One implementation for every device: the forward gathers each rank's per-channel (mean, sum of
squared deviations, count), computed in one fp32 pass (`torch.var_mean`), and combines them in
float64 (Chan, Golub & LeVeque's parallel variance); the backward all-reduces (sum dy,
sum dy * x_hat). The result equals one BatchNorm over the concatenated batch. Nothing reads the
device: `torch.nn.SyncBatchNorm` (CUDA only) drops empty ranks with a boolean mask, a host sync
per layer and step (issue 28; tests/unit/trainer/test_host_syncs.py), and refuses CPU tensors;
here an empty rank contributes a zero count, known on the host. The price on CUDA is a few more
memory passes than torch's fused kernels (docs/benchmarks.md).
Only `trainer/` converts models: model files stay unaware of distribution.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]


class _SyncBatchNormFn(torch.autograd.Function):
    """BatchNorm over the union of all ranks' batches (train mode), any device, no host read."""

    @staticmethod
    def forward(
        ctx: Any,  # autograd's context: carries the attributes set below
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        eps: float,
        momentum: float,
        group: dist.ProcessGroup | None,
    ) -> torch.Tensor:
        dims = [0] + list(range(2, x.dim()))  # every axis except channels
        shape = [1, -1] + [1] * (x.dim() - 2)
        c = x.shape[1]
        local_n = x.numel() // c  # a host number: no device read
        if local_n:
            var, mean = torch.var_mean(x.float(), dims, correction=0)
        else:  # an empty rank adds nothing (count 0, finite placeholders)
            var = mean = x.new_zeros(c, dtype=torch.float32)
        # per rank (mean, sum of squared deviations, count), combined in fp64 (Chan et al.'s
        # parallel variance): per-rank moments in one fp32 pass, no fp64 copy of the activation
        count = torch.full((1,), float(local_n), dtype=torch.float64, device=x.device)
        local = torch.cat([mean.double(), var.double() * local_n, count])
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local, group=group)
        table = torch.stack(parts)  # (W, 2C + 1)
        counts = table[:, -1:]
        n = counts.sum()
        mean_g = (table[:, :c] * counts).sum(0) / n
        m2 = (table[:, c : 2 * c] + counts * (table[:, :c] - mean_g) ** 2).sum(0)
        var_g = m2 / n  # biased, as BatchNorm
        invstd = torch.rsqrt(var_g + eps)
        if running_mean is not None and running_var is not None and momentum:
            running_mean.mul_(1 - momentum).add_(mean_g.to(running_mean.dtype), alpha=momentum)
            unbiased = m2 / (n - 1)
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        mean32, invstd32 = mean_g.float().view(shape), invstd.float().view(shape)
        x_hat = ((x.float() - mean32) * invstd32).to(x.dtype)
        ctx.save_for_backward(x_hat, weight, invstd.float())
        ctx.group, ctx.n, ctx.dims, ctx.shape = group, n, dims, shape
        y = x_hat
        if weight is not None:
            y = y * weight.view(shape).to(x.dtype)
        if bias is not None:
            y = y + bias.view(shape).to(x.dtype)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_hat, weight, invstd = ctx.saved_tensors
        dims, shape = ctx.dims, ctx.shape
        dyf, xf = dy.float(), x_hat.float()
        local = torch.cat([dyf.sum(dims), (dyf * xf).sum(dims)])
        # weight/bias grads stay per-rank: the engine averages them like every other parameter
        grad_w = local[len(local) // 2 :].to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_b = local[: len(local) // 2].to(weight.dtype) if ctx.needs_input_grad[2] else None
        glob = local.clone()
        dist.all_reduce(glob, group=ctx.group)
        c = x_hat.shape[1]
        mean_dy = (glob[:c] / ctx.n).float().view(shape)
        mean_dy_xhat = (glob[c:] / ctx.n).float().view(shape)
        scale = invstd if weight is None else invstd * weight.float()
        dx = scale.view(shape) * (dyf - mean_dy - xf * mean_dy_xhat)
        return dx.to(dy.dtype), grad_w, grad_b, None, None, None, None, None


class SyncBatchNorm(nn.SyncBatchNorm):
    """`torch.nn.SyncBatchNorm` without host syncs, on every device (CPU ranks over gloo too).

    Input float (N, C, ...) of any dtype; per-rank moments in fp32, their combination in float64.
    Eval mode and a world of one process are plain BatchNorm. A global batch with a single value
    per channel gives non-finite running variance (as `torch.nn.SyncBatchNorm` across ranks; the
    training step's finite-loss check stops on what follows), not an error: checking it would read
    the device.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        distributed = dist.is_available() and dist.is_initialized()
        group = self.process_group or (dist.group.WORLD if distributed else None)
        if not self.training or not distributed or dist.get_world_size(group) == 1:
            return nn.modules.batchnorm._BatchNorm.forward(self, x)  # plain BatchNorm
        self._check_input_dim(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        tracked = self.num_batches_tracked if self.track_running_stats else None
        if tracked is not None:
            tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as torch
                momentum = 1.0 / float(tracked)
        y: torch.Tensor = _SyncBatchNormFn.apply(
            x,
            self.weight,
            self.bias,
            self.running_mean if self.track_running_stats else None,
            self.running_var if self.track_running_stats else None,
            self.eps,
            momentum,
            group,
        )
        return y


def convert_sync_batchnorm(
    module: nn.Module, process_group: dist.ProcessGroup | None = None
) -> nn.Module:
    """Replace every BatchNorm1d/2d/3d of `module` by `SyncBatchNorm` in place (weights, running
    statistics and `requires_grad` kept; state-dict keys unchanged, so checkpoints and ONNX export
    load into the plain model). Returns the converted module (a new one if `module` itself is a
    BatchNorm)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, nn.SyncBatchNorm
    ):
        new = SyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group,
        )
        if module.affine:
            with torch.no_grad():
                new.weight = module.weight
                new.bias = module.bias
        new.running_mean = module.running_mean
        new.running_var = module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, process_group))
    return module
