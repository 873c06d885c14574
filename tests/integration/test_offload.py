"""ZeRO optimizer offload through the real launcher: 2 CPU processes, bf16, train then resume.

DeepSpeed 0.19.8 refuses a client torch optimizer with optimizer offload unless told otherwise
(`zero_force_ds_cpu_optimizer`): AdamW runs as DeepSpeedCPUAdam, SGD as torch.optim.SGD on the
CPU partition (trainer/engine.py build_backbone_optimizer). ZeRO-2 + SGD via `engine.offload`,
ZeRO-3 + AdamW via the shipped `ds_configs/zero3_bf16_offload.json`: four launches.
"""

import math
import os

import pytest

from tests.helpers.launch import REPO, TINY, accelerate, check, losses

CONFIG = os.path.join(REPO, "configs", "synthetic_tiny.yaml")

CASES = {
    "zero2_sgd": (
        "accelerate_configs/cpu_2proc_zero2.yaml",
        ["engine.offload=true", "optim.optimizer=sgd"],
        "torch.optim.sgd.SGD",
    ),
    "zero3_adamw_json": (
        "accelerate_configs/cpu_2proc_zero3.yaml",
        ["engine.ds_config=ds_configs/zero3_bf16_offload.json", "optim.optimizer=adamw"],
        "deepspeed.ops.adam.cpu_adam.DeepSpeedCPUAdam",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_offload_trains_and_resumes(case, tmp_path):
    accel_cfg, extra, optimizer = CASES[case]
    common = [
        *TINY,
        f"output={tmp_path}",
        "data.num_classes=16",
        "data.num_image=256",
        "schedule.warmup_epoch=0",
        "engine.precision=bf16",
        "optim.lr=0.01",
        *extra,
    ]
    first = check(accelerate(CONFIG, [*common, "schedule.max_steps=3"], accel_cfg))
    assert f"optimizer offload: backbone optimizer {optimizer}" in first
    assert sorted(losses(first)) == [1, 2, 3]
    assert os.path.isfile(tmp_path / "checkpoints" / "step_3" / "meta.json")

    second = check(
        accelerate(CONFIG, [*common, "schedule.max_steps=5", "checkpoint.resume=true"], accel_cfg)
    )
    assert "resumed from" in second and "at step 3" in second
    resumed = losses(second)
    assert sorted(resumed) == [4, 5]
    assert all(math.isfinite(v) for v in [*losses(first).values(), *resumed.values()])
    assert os.path.isfile(tmp_path / "backbone.pt")
