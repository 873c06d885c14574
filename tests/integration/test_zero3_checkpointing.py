"""ZeRO-3 with activation checkpointing (issue 28 item 3), as `wf42m_pfc02_vit_l_zero3` trains:
the backward's recompute re-enters ZeRO-3's parameter fetch/release hooks. ONE `accelerate
launch` (2 CPU processes over gloo) of tests/helpers/loss_configs.py runs the trainer's own
`train()` four times: a tiny IResNet and a tiny ViT, each with checkpointing under ZeRO-2 and
ZeRO-3. Stage 3 must reproduce stage 2 to the tolerance of the stage-equivalence test in
test_train_e2e.py (fp32, clipping off: 1e-5 on the loss curve), and its consolidated weights too.
"""

from __future__ import annotations

import os

import torch
import yaml

from evaluation.runs import read_scalars
from tests.helpers.launch import REPO, accelerate_cmd, check, losses, run_cmd, tiny_overrides
from tests.helpers.lfw_rec import LFW16_CLASSES
from tests.helpers.loss_configs import MARK

STEPS = 6
# Per backbone: the model and optimizer sections (arcface_torch's recipes: SGD for IResNet,
# AdamW for ViT); drop-path and token masking stay on so the recompute replays random draws.
BACKBONES = {
    "r18": {"model": {"network": "r18", "embedding_size": 64, "kwargs": {"base_width": 8}}},
    "vit": {
        "model": {
            "network": "vit_t",
            "embedding_size": 64,
            "kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2},
        },
        "optim": {"optimizer": "adamw", "lr": 0.003, "weight_decay": 0.1},
    },
}


def _write_case(tmp, name: str, stage: int) -> str:
    """configs/lfw_demo_r18.yaml with this case's sections, as `lfw_demo_<name>_z<stage>.yaml`
    (tests/helpers/loss_configs.py names each run after its config file)."""
    with open(os.path.join(REPO, "configs", "lfw_demo_r18.yaml")) as f:
        cfg = yaml.safe_load(f)
    for section, values in BACKBONES[name].items():
        cfg[section] = {**cfg.get(section, {}), **values}
    cfg["model"]["grad_checkpointing"] = True
    cfg["engine"] = {"zero_stage": stage, "precision": "fp32"}
    path = tmp / f"lfw_demo_{name}_z{stage}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_zero3_with_checkpointing_matches_zero2(lfw16, tmp_path):
    cases = [(n, s) for n in BACKBONES for s in (2, 3)]
    configs = [_write_case(tmp_path, n, s) for n, s in cases]
    common = tiny_overrides("unused", lfw16, LFW16_CLASSES, STEPS, "optim.clip_grad=0")
    common = [o for o in common if not o.startswith("model.")]  # the model is each case's
    out = tmp_path / "runs"
    cmd = accelerate_cmd(
        str(out),
        [*configs, "--", *common],  # loss_configs: OUT CONFIG... -- OVERRIDE...
        "accelerate_configs/cpu_2proc_zero2.yaml",
        module="tests.helpers.loss_configs",
    )
    stdout = check(run_cmd(cmd, timeout=900))
    sections = dict(zip(cases, stdout.split(MARK)[1:], strict=True))
    for name in BACKBONES:
        curves, weights = {}, {}
        for stage in (2, 3):
            text, run = sections[(name, stage)], out / f"{name}_z{stage}"
            assert f"ZeRO-{stage} fp32" in text
            assert sorted(losses(text)) == list(range(1, STEPS + 1)), text[-2000:]
            steps, values = read_scalars(str(run / "tensorboard"))["train/loss"]
            curves[stage] = dict(zip(steps, values, strict=True))
            weights[stage] = torch.load(run / "backbone.pt", weights_only=True)
        assert sorted(curves[3]) == sorted(curves[2]) == list(range(1, STEPS + 1))
        for step, loss in curves[2].items():
            assert abs(curves[3][step] - loss) < 1e-5, (name, step, loss, curves[3][step])
        assert weights[3].keys() == weights[2].keys()
        for key, w in weights[2].items():
            torch.testing.assert_close(weights[3][key], w, atol=1e-5, rtol=1e-4, msg=key)
        # training moved the weights: the comparison is not between two initial states
        assert curves[2][STEPS] != curves[2][1]
