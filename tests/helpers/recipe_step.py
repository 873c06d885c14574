"""The training step of each shipped recipe (configs/*.yaml) on a tiny problem, on one gloo rank.

What a recipe turns on is kept: precision, ZeRO stage and DeepSpeed JSON, `gradient_acc`, clipping,
the head's loss, sub-centers, sampling (< 1 kept as 0.5), `head_decay`, margin gradient and
clamping, optimizer and its hyper-parameters; the sizes are shrunk (the backbone of
`tests/helpers/train_step.py`, its classes, embedding and batch). The head and its optimizer are
built by the trainer's own `trainer.run.build_head`.
"""

from __future__ import annotations

import glob
import os

import torch

from tests.helpers.paths import REPO
from tests.helpers.train_step import B, C, D, make_backbone, make_batches

SHIPPED = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))


def recipe_config(path, extra=()):
    """The shipped config at `path` at the tiny sizes (and `extra` overrides)."""
    from trainer.config import load_config

    cfg = load_config(path, [])
    rate = 0.5 if cfg.head.sample_rate < 1 else 1.0
    return load_config(
        path,
        [
            "data.kind=synthetic",
            f"data.num_classes={C}",
            "data.num_image=1000",
            f"data.batch_size={B}",
            f"model.embedding_size={D}",
            f"head.sample_rate={rate}",
            "head.kernels=eager",  # the compiled kernels' syncs are the GPU check's
            *extra,
        ],
    )


def engine_key(cfg):
    """What the backbone's engine depends on: recipes sharing it share one engine build."""
    from trainer.engine import resolve_engine_settings

    s = resolve_engine_settings(cfg, env={})
    return (
        s.precision,
        s.zero_stage,
        s.ds_config_path,
        cfg.optim.gradient_acc,
        cfg.optim.clip_grad,
    )


def build_engine(rank, world, cfg):
    """Accelerate + DeepSpeed engine of the tiny backbone for `cfg`, and the DeepSpeed config.

    Accelerate's state is a process singleton: it is reset first, so several engines can be
    built one after another in a worker.
    """
    os.environ.update(
        {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)},
        ACCELERATE_USE_DEEPSPEED="true",
    )
    from accelerate.state import AcceleratorState, GradientState
    from deepspeed.accelerator import get_accelerator

    from trainer.engine import build_ds_config, create_accelerator, resolve_engine_settings

    AcceleratorState._reset_state()
    GradientState._reset_state()
    settings = resolve_engine_settings(cfg, env={})
    ds = build_ds_config(cfg, settings)
    if settings.precision == "fp16":
        ds["fp16"]["initial_scale_power"] = 8  # the tiny problem's steps do not overflow
        # DeepSpeed's CPU accelerator refuses fp16 without AVX512-FP16 kernels; torch's fp16
        # CPU ops run, so the loss-scale path can be counted without them.
        get_accelerator().is_fp16_supported = lambda: True
    accelerator = create_accelerator(cfg, ds, settings.precision)
    model = make_backbone()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr)
    engine, _ = accelerator.prepare(model, opt)
    return accelerator, engine, settings.precision, ds


def micro_batches(rank, world, gas):
    """This rank's `gas` micro-batches of the seeded global batch."""
    images, labels = make_batches(world, gas)
    per_micro = world * B
    out = []
    for m in range(gas):
        lo = m * per_micro + rank * B
        out.append((images[lo : lo + B], labels[lo : lo + B]))
    return out
