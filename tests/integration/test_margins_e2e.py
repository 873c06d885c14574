"""Every shipped per-loss demo config trains end to end: ONE `accelerate launch` (2 CPU processes,
ZeRO-2) of tests/helpers/loss_configs.py, whose `__main__` runs the trainer's own `train()` once
per config, 3 steps each on the 16-identity `.rec` of real LFW faces, with a final checkpoint.
One launch instead of ten saves ~10 s of start-up per loss. `lfw_demo_subcenter.yaml` (ArcFace
with 3 sub-centers per class) rides in the same launch: its checkpointed head shards must hold 3
rows per class.
"""

from __future__ import annotations

import glob
import math
import os

import torch

from tests.helpers.launch import REPO, accelerate_cmd, check, losses, run_cmd, tiny_overrides
from tests.helpers.lfw_rec import LFW16_CLASSES
from tests.helpers.loss_configs import MARK, loss_name

LOSS_CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "lfw_demo_*.yaml")))
STEPS = 3


def test_every_loss_config_trains_with_zero2(lfw16, tmp_path):
    per_loss = [c for c in LOSS_CONFIGS if loss_name(c) not in ("r18", "mbf")]
    assert len(per_loss) >= 10, per_loss
    out = tmp_path / "runs"
    ov = tiny_overrides("unused", lfw16, LFW16_CLASSES, STEPS, "engine.zero_stage=2")
    args = [*per_loss, "--", *ov]  # tests/helpers/loss_configs.py: OUT CONFIG... -- OVERRIDE...
    accel_cfg = "accelerate_configs/cpu_2proc_zero2.yaml"
    cmd = accelerate_cmd(str(out), args, accel_cfg, module="tests.helpers.loss_configs")
    stdout = check(run_cmd(cmd, timeout=900))
    sections = stdout.split(MARK)[1:]
    assert len(sections) == len(per_loss)
    for path, text in zip(per_loss, sections):
        name = loss_name(path)
        loss, subcenters = ("arcface", 3) if name == "subcenter" else (name, 1)
        assert text.startswith(f"{name} {loss} {subcenters}"), text[:80]
        steps = losses(text)
        assert sorted(steps) == list(range(1, STEPS + 1)), f"{name}: {steps}"
        assert all(math.isfinite(v) for v in steps.values()), f"{name}: {steps}"
        shards = glob.glob(str(out / name / "**" / "head" / "shard_*.pt"), recursive=True)
        assert len(shards) >= 2, f"{name}: no 2-rank head checkpoint"
        head = torch.load(shards[0], weights_only=True)
        assert head["num_subcenters"] == subcenters
        rows = (head["end"] - head["start"]) * subcenters  # K rows per class of the shard
        assert head["weight"].shape == (rows, head["embedding_size"])
        saved = head["margin"]
        if name == "curricularface":  # t moved off 0 and was checkpointed
            assert float(saved["state"]["t"]) != 0.0
        if name == "adaface":
            assert float(saved["state"]["batch_mean"]) != 20.0
