"""Fine-tuning (docs/finetune.md) through the real entry point: `model.pretrained`, head warm-up
and frozen stages under ZeRO-1/2/3 (2 CPU processes, the 16-identity LFW `.rec`)."""

import os

import pytest
import torch

from tests.helpers.launch import REPO, accelerate, check, losses, tiny_overrides
from tests.helpers.lfw_rec import LFW16_CLASSES
from tests.helpers.pretrained import pretrained_file

CONFIG = os.path.join(REPO, "configs", "lfw_demo_r18.yaml")


def _overrides(tmp, data, steps, *more):
    return tiny_overrides(tmp, data, LFW16_CLASSES, steps, *more)


def _frozen_equal(state, ref, prefixes):
    return all(torch.equal(v, ref[k]) for k, v in state.items() if k.split(".")[0] in prefixes)


def test_finetune_under_zero_stages(lfw16, tmp_path):
    """From an arcface_torch-style `backbone.pth`, head warm-up 2 steps, stem + layer1 frozen for
    4 steps, backbone lr x0.5, under ZeRO-1/2/3: the saved backbone equals the pretrained one
    after the warm-up, stem and layer1 (weights and BatchNorm statistics) still do after step 4
    while later stages moved, and step 5 moves the stem. `model.freeze_bn` (ZeRO-2) keeps every
    running statistic. Resume (ZeRO-2) continues the fine-tune run's loss curve."""
    ref = pretrained_file(tmp_path / "backbone.pth", seed=1)
    stem = ("conv1", "bn1", "prelu", "layer1")
    base = [
        f"model.pretrained={tmp_path / 'backbone.pth'}",
        "optim.head_warmup_steps=2",
        "model.freeze_stages=1",
        "model.freeze_steps=4",
        "optim.backbone_lr_scale=0.5",
        "engine.precision=fp32",
        "checkpoint.every=1",
        "checkpoint.keep_last=5",
        "optim.lr=0.05",
    ]
    curves = {}
    for stage in (1, 2, 3):
        out = tmp_path / f"z{stage}"
        more = ["model.freeze_bn=true"] if stage == 2 else []
        ov = _overrides(out, lfw16, 5, *base, *more)
        stdout = check(accelerate(CONFIG, ov, f"accelerate_configs/cpu_2proc_zero{stage}.yaml"))
        assert f"ZeRO-{stage}" in stdout and "pretrained backbone: " in stdout
        curves[stage] = losses(stdout)
        assert len(curves[stage]) == 5

        def saved(step, out=out):
            path = out / "checkpoints" / f"step_{step}" / "backbone.pt"
            return torch.load(path, weights_only=True)

        s2, s4, s5 = saved(2), saved(4), saved(5)
        assert all(torch.equal(v, ref[k]) for k, v in s2.items()), stage
        assert _frozen_equal(s4, ref, stem), stage
        assert not torch.equal(s4["layer3.0.conv1.weight"], ref["layer3.0.conv1.weight"])
        assert not torch.equal(s5["conv1.weight"], ref["conv1.weight"])
        stats = [k for k in s5 if k.endswith("running_mean")]
        kept = [torch.equal(s5[k], ref[k]) for k in stats]
        assert all(kept) if stage == 2 else not any(kept), stage
        if stage == 2:
            s5_zero2 = s5
    step3 = tmp_path / "z2" / "checkpoints" / "step_3"
    ov = _overrides(tmp_path / "resumed", lfw16, 5, *base, "model.freeze_bn=true")
    ov.append(f"checkpoint.resume={step3}")
    resumed = check(accelerate(CONFIG, ov, "accelerate_configs/cpu_2proc_zero2.yaml"))
    assert "resumed from" in resumed
    got = losses(resumed)
    assert sorted(got) == [4, 5]
    for step in (4, 5):
        assert got[step] == pytest.approx(curves[2][step], abs=1e-4), (got, curves[2])
    again = torch.load(tmp_path / "resumed" / "checkpoints" / "step_5" / "backbone.pt")
    assert torch.allclose(again["layer3.0.conv1.weight"], s5_zero2["layer3.0.conv1.weight"])
