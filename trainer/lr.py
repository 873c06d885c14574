"""Learning-rate schedule shared by the backbone engine and the head optimizer."""

from __future__ import annotations


def poly_lr(
    step: int, base_lr: float, total_steps: int, warmup_steps: int, power: float = 2.0
) -> float:
    """Linear warmup then polynomial decay to 0: `base_lr * (1 - progress) ** power`.

    power 2 is arcface_torch's older `PolyScheduler`; power 1 its current `PolynomialLRWarmup`
    (`schedule.power`, 1 under `compat: arcface_torch`), whose closed form this is for every
    step but one: with warm-up, `PolynomialLRWarmup` runs step 0 at `base_lr` (its first
    `get_lr` returns the optimizer's initial rate), here at 0.

    Args:
        step: optimizer steps already taken (0 for the first step).
        base_lr: peak learning rate, reached at the end of warmup.
        total_steps: steps of the whole run; the rate reaches 0 there.
        warmup_steps: linear ramp from 0 over this many steps (0 disables warmup).
        power: decay exponent (`schedule.power`).

    Returns:
        The learning rate (float) to use for optimizer step `step`.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * step / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return float(base_lr * (1.0 - progress) ** power)
