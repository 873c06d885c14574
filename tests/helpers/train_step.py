"""The real training step's parts on one gloo rank: Accelerate + DeepSpeed engine, Partial FC
head, head optimizer and this rank's micro-batches of a small seeded problem. Shared by the step
parity test (tests/unit/trainer/test_step_parity.py) and the host-sync count
(tests/unit/trainer/test_host_syncs.py)."""

from __future__ import annotations

import os

import torch

C, D, B, IN = 11, 8, 4, 3 * 4 * 4  # classes, embedding, per-rank micro-batch, input features
S, M2 = 16.0, 0.3  # ArcFace scale and margin, mild so fp16/bf16 comparisons stay meaningful


def make_backbone():
    """Flatten + Linear(IN, D), seeded: the same weights in every process."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(IN, D))


def make_batches(world, gas):
    """The global batch of ``world * gas`` micro-batches of ``B`` images and labels, seeded."""
    g = torch.Generator().manual_seed(1)
    n = world * gas * B
    images = torch.randn(n, 3, 4, 4, generator=g)
    labels = torch.randint(0, C, (n,), generator=g)
    return images, labels


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
    model = make_backbone()
    init = {k: p.detach().clone() for k, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    engine, _ = accelerator.prepare(model, opt)
    head = PartialFC(D, C, sample_rate, CombinedMarginLoss(S, 1.0, M2, 0.0))
    o = cfg.optim
    head_opt = build_head_optimizer(
        head, "sgd", lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay
    )

    images, labels = make_batches(world, gas)
    per_micro = world * B
    micro = []
    for m in range(gas):  # each micro-batch of the global batch is split over ranks in order
        lo = m * per_micro + rank * B
        micro.append((images[lo : lo + B], labels[lo : lo + B]))
    return accelerator, engine, head, head_opt, micro, init
