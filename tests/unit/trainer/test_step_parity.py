"""Parity of the real training step (Accelerate + DeepSpeed engine + Partial FC head) on 2 gloo
ranks against a single-process reference written plainly here (the step's parts:
tests/helpers/train_step.py), for each ZeRO stage and precision.

One SGD step with lr=1 and no momentum, weight decay or clipping moves every parameter by exactly
-gradient, so comparing the updates proves that the engine's loss scale, gradient-accumulation
division and rank averaging, and the head's unscaling and world-size factor all cancel out.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.distributed import run_distributed
from tests.helpers.train_step import M2, C, D, S, build_step, make_backbone, make_batches

TOL = {"fp32": 1e-5, "bf16": 6e-2, "fp16": 6e-3}


def _reference(world, gas):
    """Single process, fp64: mean ArcFace loss over the global batch; backbone and center grads."""
    from heads import PartialFC

    model = make_backbone().double()
    centers = PartialFC(D, C, 1.0).weight.detach().double().clone().requires_grad_(True)
    images, labels = make_batches(world, gas)
    emb = model(images.double())
    cos = F.linear(F.normalize(emb), F.normalize(centers)).clamp(-1, 1)
    theta = torch.acos(cos.gather(1, labels[:, None]))
    logits = cos.scatter(1, labels[:, None], torch.cos(theta + M2)) * S
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    grads = {k: p.grad.float() for k, p in model.named_parameters()}
    return loss.item(), grads, centers.grad.float()


def _worker(rank, world, stage, precision, gas):
    from deepspeed.utils import safe_get_full_fp32_param

    from trainer.step import train_step

    accelerator, engine, head, head_opt, micro, init = build_step(
        rank, world, stage, precision, gas
    )
    w0 = head.weight.detach().clone()
    result = train_step(accelerator, engine, head, head_opt, micro, precision, torch.device("cpu"))
    updates = {
        k: (safe_get_full_fp32_param(p).float() - init[k])
        for k, p in engine.module.named_parameters()
    }
    return {
        "loss": result.loss,
        "applied": result.applied,
        "scale": result.loss_scale,
        "updates": updates,
        "head_update": head.weight.detach() - w0,
        "start": head.class_start,
    }


def _max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


CASES = [(s, "fp32", 1) for s in (1, 2, 3)] + [
    (2, "fp32", 2),
    (2, "bf16", 1),
    (3, "bf16", 1),
    (1, "fp16", 1),
    (2, "fp16", 2),
]


@pytest.mark.slow
@pytest.mark.parametrize("stage,precision,gas", CASES, ids=lambda v: str(v))
def test_train_step_matches_single_process(stage, precision, gas):
    world = 2
    ref_loss, ref_grads, ref_center_grad = _reference(world, gas)
    out = run_distributed(_worker, world, args=(stage, precision, gas), timeout=240)
    tol = TOL[precision]
    for r in out:
        assert r["applied"], "the step was skipped"
        if precision == "fp16":
            assert r["scale"] == 256.0
        assert math.isclose(r["loss"], ref_loss, rel_tol=tol), (r["loss"], ref_loss)
        for name, g in ref_grads.items():  # lr = 1: update == -gradient
            assert _max_rel(-r["updates"][name], g) < tol, (name, precision, stage)
    head_update = torch.cat([r["head_update"] for r in sorted(out, key=lambda r: r["start"])])
    assert _max_rel(-head_update, ref_center_grad) < tol
