"""Parity of the real training step (Accelerate + DeepSpeed engine + Partial FC head) on 2 gloo
ranks against a single-process reference written plainly here, for each ZeRO stage and precision.

One SGD step with lr=1 and no momentum, weight decay or clipping moves every parameter by exactly
-gradient, so comparing the updates proves that the engine's loss scale, gradient-accumulation
division and rank averaging, and the head's unscaling and world-size factor all cancel out.
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from tests.distributed import run_distributed

C, D, B, IN = 11, 8, 4, 3 * 4 * 4  # classes, embedding, per-rank micro-batch, input features
S, M2 = 16.0, 0.3  # ArcFace scale and margin, mild so fp16/bf16 comparisons stay meaningful
TOL = {"fp32": 1e-5, "bf16": 6e-2, "fp16": 6e-3}


def _backbone():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(IN, D))


def _batches(world, gas):
    g = torch.Generator().manual_seed(1)
    n = world * gas * B
    images = torch.randn(n, 3, 4, 4, generator=g)
    labels = torch.randint(0, C, (n,), generator=g)
    return images, labels


def _reference(world, gas):
    """Single process, fp64: mean ArcFace loss over the global batch; backbone and center grads."""
    from heads import PartialFC

    model = _backbone().double()
    centers = PartialFC(D, C, 1.0).weight.detach().double().clone().requires_grad_(True)
    images, labels = _batches(world, gas)
    emb = model(images.double())
    cos = F.linear(F.normalize(emb), F.normalize(centers)).clamp(-1, 1)
    theta = torch.acos(cos.gather(1, labels[:, None]))
    logits = cos.scatter(1, labels[:, None], torch.cos(theta + M2)) * S
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    grads = {k: p.grad.float() for k, p in model.named_parameters()}
    return loss.item(), grads, centers.grad.float()


def build_step(rank, world, stage, precision, gas, overrides=(), sample_rate=1.0, ds_edit=None):
    """This rank's Accelerate + DeepSpeed engine, head, head optimizer and micro-batches for
    `trainer.step.train_step` (lr 1, no momentum/decay/clipping unless `overrides` say so;
    `ds_edit` {section: {key: value}} is merged into the resolved DeepSpeed config).

    Returns:
        (accelerator, engine, head, head_opt, micro_batches, initial backbone params).
    """
    os.environ.update(
        {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)},
        ACCELERATE_USE_DEEPSPEED="true",
    )
    from deepspeed.accelerator import get_accelerator

    from heads import CombinedMarginLoss, PartialFC, build_head_optimizer
    from trainer.config import load_config
    from trainer.engine import EngineSettings, build_ds_config, create_accelerator

    cfg = load_config(
        None,
        [
            "data.kind=synthetic",
            f"data.num_classes={C}",
            "data.num_image=1000",
            f"data.batch_size={B}",
            f"optim.gradient_acc={gas}",
            "optim.clip_grad=0.0",
            "optim.momentum=0.0",
            "optim.weight_decay=0.0",
            "optim.lr=1.0",
            *overrides,
        ],
    )
    ds = build_ds_config(cfg, EngineSettings(stage, precision, "ds_configs/zero2_bf16.json"))
    if precision == "fp16":
        ds["fp16"]["initial_scale_power"] = 8  # S = 256: the head must divide it out
        # DeepSpeed's CPU accelerator refuses fp16 unless oneDNN has fp16 kernels (AVX512-FP16);
        # torch's fp16 CPU ops still run, so the loss-scale path can be checked without them.
        get_accelerator().is_fp16_supported = lambda: True
    for section, values in (ds_edit or {}).items():
        ds.setdefault(section, {}).update(values)
    accelerator = create_accelerator(cfg, ds, precision)
    model = _backbone()
    init = {k: p.detach().clone() for k, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    engine, _ = accelerator.prepare(model, opt)
    head = PartialFC(D, C, sample_rate, CombinedMarginLoss(S, 1.0, M2, 0.0))
    o = cfg.optim
    head_opt = build_head_optimizer(
        head, "sgd", lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay
    )

    images, labels = _batches(world, gas)
    per_micro = world * B
    micro = []
    for m in range(gas):  # each micro-batch of the global batch is split over ranks in order
        lo = m * per_micro + rank * B
        micro.append((images[lo : lo + B], labels[lo : lo + B]))
    return accelerator, engine, head, head_opt, micro, init


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
