"""One optimizer step: `gradient_acc` micro-batches through the engine and the Partial FC head.

Order per micro-batch: engine forward -> head loss (fp32) -> `accelerator.backward` (which, at
the accumulation boundary, also runs `engine.step()`: clipping, overflow check, update).
At the boundary the head unscales its gradients by the loss scale S the engine used and steps
only if the engine applied its step too, so an fp16 overflow skips both together.
A non-finite loss is never backpropagated (design.md, reliability issue).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.device_batch import to_device
from trainer.engine import loss_scale

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class StepResult:
    """What one optimizer step did. `loss` is the mean finite micro-batch loss (nan if none)."""

    loss: float
    applied: bool
    bad_micro_batches: int
    loss_scale: float
    num_sampled: float


def train_step(
    accelerator,
    engine,
    head,
    head_opt,
    micro_batches,
    precision: str,
    device: torch.device,
    nan_loss: bool = False,
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
        nan_loss: fault-injection hook (ARCSCALE_FAULT_NAN_LOSS, see docs/reliability.md):
            replace the head loss of every micro-batch with NaN.
        memory_format: layout of the images on `device` (trainer/memory_format.py; default:
            as the loader made them).

    Returns:
        StepResult; `applied` is False when the engine skipped (fp16 overflow), the head's
        gradients were non-finite, or a micro-batch had a non-finite loss (then the head skips
        its step; with `gradient_acc` > 1 the engine still steps on the finite micro-batches).
    """
    dtype = DTYPES[precision]
    scale = loss_scale(engine)  # the S this step's backward multiplies by
    losses, bad, sampled = [], 0, 0.0
    stepped = False
    for images, labels in micro_batches:
        with accelerator.accumulate(engine):
            boundary = accelerator.sync_gradients
            images = to_device(images, device, dtype, memory_format)  # uint8: normalized there
            labels = labels.to(device, non_blocking=True)
            embeddings = engine(images)
            loss, stats = head(embeddings, labels)
            if nan_loss:
                loss = loss * float("nan")
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
    applied = stepped and bool(engine.was_step_applied()) and bad < len(micro_batches)
    # A forward whose loss was not backpropagated left no head gradient (sparse_grad raises):
    # skip the head step. `bad` is the same on every rank, so the collective in unscale_ is safe.
    head_finite = head_opt.unscale_(loss_scale=scale) if bad == 0 else False
    if applied and head_finite:
        head_opt.step()
    head_opt.zero_grad()
    mean_loss = torch.stack(losses).mean().item() if losses else float("nan")
    return StepResult(
        loss=mean_loss,
        applied=applied and head_finite,
        bad_micro_batches=bad,
        loss_scale=scale,
        num_sampled=sampled / max(len(micro_batches), 1),
    )
