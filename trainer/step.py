"""One optimizer step: `gradient_acc` micro-batches through the engine and the Partial FC head.

Order per micro-batch: engine forward -> head loss (fp32) -> `accelerator.backward` (which, at
the accumulation boundary, also runs `engine.step()`: clipping, overflow check, update).
At the boundary the head unscales its gradients by the loss scale S the engine used and steps
only if the engine applied its step too, so an fp16 overflow skips both together.
A non-finite loss is never backpropagated (docs/design.md, docs/reliability.md).

Host syncs (issue 13, tests/unit/trainer/test_host_syncs.py): the step reads the device once per
micro-batch, the replicated finite-loss check; everything else stays on the device (fixed-size head
sampling, per-rank batch size agreed once at the first step, labels range-checked by the data layer,
the head's finiteness gating its update on the device). `StepResult.read` fetches the logging values
in one transfer: call it on logging steps only. DeepSpeed adds its own (see docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from trainer.device_batch import to_device
from trainer.engine import loss_scale
from trainer.precision import DTYPES

if TYPE_CHECKING:
    from heads import HeadOptimizer, PartialFC


@dataclass
class StepResult:
    """What one optimizer step did; host fields are free to read, tensors cost a device read.

    Attributes:
        loss: 0-dim fp32 device tensor, the mean finite micro-batch loss (nan if none).
        applied: host bool: the engine applied its step and every micro-batch loss was finite
            (the head also skips when its own gradient is non-finite: `head_finite`).
        bad_micro_batches: micro-batches whose loss was non-finite (host int).
        loss_scale: the fp16 loss scale S this step used (1.0 otherwise).
        num_sampled: sampled class centers per rank (host float, mean over micro-batches).
        head_finite: 0-dim bool device tensor, the head's gradient was finite on every rank.
        num_positive: 0-dim fp32 device tensor, distinct positive classes in this rank's
            shard (mean over micro-batches).
        loss_finite: host bool: some micro-batch loss was finite (so `loss` is finite).
    """

    loss: torch.Tensor
    applied: bool
    bad_micro_batches: int
    loss_scale: float
    num_sampled: float
    head_finite: torch.Tensor
    num_positive: torch.Tensor
    loss_finite: bool

    def read(self, engine: Any = None) -> dict[str, float]:
        """The logging scalars as python floats, fetched in ONE device-to-host transfer.

        Args:
            engine: the DeepSpeed engine, for its global gradient norm (nan when it has none).

        Returns:
            ``loss``, ``grad_norm``, ``head_finite`` (1.0/0.0), ``num_positive``, and the host
            values ``loss_scale``, ``num_sampled``.
        """
        norm = engine.get_global_grad_norm() if engine is not None else None
        if norm is None:
            norm = float("nan")
        dev = self.loss.device
        norm_t = norm.reshape(()).float().to(dev) if torch.is_tensor(norm) else None
        parts = [self.loss.float(), self.head_finite.float(), self.num_positive.float()]
        if norm_t is not None:
            parts.append(norm_t)
        values = torch.stack(parts).tolist()  # the one read
        return {
            "loss": values[0],
            "grad_norm": values[3] if norm_t is not None else float(norm),
            "head_finite": values[1],
            "num_positive": values[2],
            "loss_scale": float(self.loss_scale),
            "num_sampled": float(self.num_sampled),
        }


def train_step(
    accelerator: Any,
    engine: Any,
    head: PartialFC,
    head_opt: HeadOptimizer,
    micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    precision: str,
    device: torch.device,
    memory_format: torch.memory_format = torch.preserve_format,
) -> StepResult:
    """Runs one optimizer step over `micro_batches` (a list of `gradient_acc` (images, labels)).

    Args:
        accelerator: the Accelerator that prepared `engine` (its `accumulate` marks the boundary).
        engine: DeepSpeed engine of the backbone; embeddings come out in its dtype.
        head, head_opt: the Partial FC head (outside ZeRO) and its optimizer.
        micro_batches: list of (images, labels int64 (B,)); images uint8 (B,112,112,3) from
            the CPU loader (copied as uint8, normalized on `device`) or float (B,3,112,112).
        precision: "fp32", "fp16" or "bf16": the engine's parameter dtype for the inputs.
        device: where the engine and head live.
        memory_format: layout of the images on `device` (trainer/memory_format.py; default:
            as the loader made them).

    Returns:
        StepResult; `applied` is False when the engine skipped (fp16 overflow) or a micro-batch
        had a non-finite loss (then the head skips its step; with `gradient_acc` > 1 the engine
        still steps on the finite micro-batches). The head also skips, on the device, when its
        gradient is non-finite (`head_finite`). Labels are not range-checked here (the data
        layer does; an out-of-range label makes the loss NaN). The first call agrees the
        per-rank batch size with the other ranks (`PartialFC.fix_batch_size`, one exchange);
        later micro-batches of another size raise ValueError.
    """
    dtype = DTYPES[precision]
    scale = loss_scale(engine)  # the S this step's backward multiplies by
    losses, positives, bad, sampled = [], [], 0, 0.0
    stepped = False
    for images, labels in micro_batches:
        with accelerator.accumulate(engine):
            boundary = accelerator.sync_gradients
            images = to_device(images, device, dtype, memory_format)  # uint8: normalized there
            labels = labels.to(device, non_blocking=True)
            embeddings = engine(images)
            if head.fixed_batch is None:  # start-up: one size exchange for the whole run
                head.fix_batch_size(labels.shape[0])
            loss, stats = head(embeddings, labels, validate=False)
            positives.append(stats["num_positive"])
            sampled += float(stats.get("num_sampled", 0))
            if torch.isfinite(loss):  # the loss is replicated: every rank takes the same branch
                losses.append(loss.detach())
                accelerator.backward(loss)
                stepped |= boundary
            elif len(micro_batches) > 1:
                # Keep DeepSpeed's accumulation window in step with a zero contribution.
                bad += 1
                accelerator.backward(embeddings.float().sum() * 0.0)
                stepped |= boundary
            else:
                bad += 1
    # was_step_applied is a host flag DeepSpeed already holds (its overflow check, fp16 only).
    applied = stepped and bool(engine.was_step_applied()) and bad < len(micro_batches)
    # A forward whose loss was not backpropagated left no head gradient (sparse_grad raises):
    # skip the head step. `bad` is the same on every rank, so the collective in unscale_ is safe.
    if bad == 0:
        head_finite = head_opt.unscale_(loss_scale=scale, blocking=False)
        if applied:
            head_opt.step(finite=head_finite)  # non-finite: no change, decided on the device
    else:
        head_finite = torch.zeros((), dtype=torch.bool, device=device)
    head_opt.zero_grad()
    nan = torch.full((), float("nan"), device=device)
    return StepResult(
        loss=torch.stack(losses).mean() if losses else nan,
        applied=applied,
        bad_micro_batches=bad,
        loss_scale=scale,
        num_sampled=sampled / max(len(micro_batches), 1),
        head_finite=head_finite,
        num_positive=torch.stack(positives).float().mean() if positives else nan,
        loss_finite=bool(losses),
    )
