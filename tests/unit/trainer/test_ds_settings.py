"""Nothing a user writes in a DeepSpeed JSON or an Accelerate launch config is silently replaced
or dropped (issue 31 items 1-2): a conflict with the experiment config is a one-line error naming
both sources and the field; "auto" lets the experiment config decide."""

import json

import pytest

from trainer.config import ConfigError, load_config
from trainer.engine import build_ds_config, resolve_engine_settings

SYNTH = ["data.kind=synthetic", "data.num_classes=10", "data.num_image=64"]


def _settings(tmp_path, body, *overrides, env=None):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(body))
    cfg = load_config(None, [*SYNTH, f"engine.ds_config={path}", *overrides])
    return cfg, resolve_engine_settings(cfg, env or {}), str(path)


@pytest.mark.parametrize(
    ("body", "overrides", "field", "key"),
    [
        ({"gradient_clipping": 1.0}, [], "optim.clip_grad is 5.0", "gradient_clipping 1.0"),
        (
            {"gradient_accumulation_steps": 4},
            ["optim.gradient_acc=2"],
            "optim.gradient_acc is 2",
            "gradient_accumulation_steps 4",
        ),
        (
            {"train_micro_batch_size_per_gpu": 32},
            ["data.batch_size=16"],
            "data.batch_size is 16",
            "train_micro_batch_size_per_gpu 32",
        ),
        (
            {"bf16": {"enabled": True}},
            ["engine.precision=fp16"],
            "engine.precision is fp16",
            "bf16.enabled True",
        ),
        (
            {"zero_optimization": {"stage": 3}},
            ["engine.zero_stage=1"],
            "engine.zero_stage is 1",
            "zero_optimization.stage 3",
        ),
    ],
)
def test_json_number_that_disagrees_is_an_error_naming_both_files(
    tmp_path, body, overrides, field, key
):
    cfg, settings, path = _settings(tmp_path, body, *overrides)
    with pytest.raises(ConfigError) as e:
        build_ds_config(cfg, settings, "configs/x.yaml")
    msg = str(e.value)
    assert msg.startswith(f"configs/x.yaml: {field} but {path} sets {key}"), msg
    assert "\n" not in msg and '"auto"' in msg


def test_auto_and_equal_values_are_filled_from_the_config(tmp_path):
    body = {
        "gradient_clipping": "auto",
        "gradient_accumulation_steps": 2,
        "train_micro_batch_size_per_gpu": "auto",
        "fp16": {"enabled": "auto"},
        "zero_optimization": {"stage": 2},
    }
    over = ["optim.gradient_acc=2", "optim.clip_grad=3.0", "engine.precision=fp16"]
    cfg, settings, _ = _settings(tmp_path, body, *over, "engine.zero_stage=2")
    ds = build_ds_config(cfg, settings)
    assert ds["gradient_clipping"] == 3.0 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_micro_batch_size_per_gpu"] == cfg.data.batch_size
    assert ds["fp16"]["enabled"] is True and ds["zero_optimization"]["stage"] == 2


def test_offload_asked_by_config_but_refused_by_json(tmp_path):
    body = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "none"}}}
    cfg, settings, path = _settings(tmp_path, body, "engine.offload=true")
    with pytest.raises(ConfigError, match=r"engine.offload asks for optimizer offload .* 'none'"):
        build_ds_config(cfg, settings)


def test_launch_config_offload_is_applied():
    cfg = load_config(None, [*SYNTH, "engine.zero_stage=3"])
    env = {
        "ACCELERATE_CONFIG_DS_FIELDS": "zero_stage,offload_optimizer_device,offload_param_device",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
        "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu",
        "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "cpu",
    }
    ds = build_ds_config(cfg, resolve_engine_settings(cfg, env))
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    env["ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"] = "none"
    env["ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"] = "none"
    ds = build_ds_config(cfg, resolve_engine_settings(cfg, env))
    assert "offload_optimizer" not in ds["zero_optimization"]


def test_launch_config_fields_not_applied_are_refused_in_one_line():
    cfg = load_config(None, SYNTH)
    env = {
        "ACCELERATE_CONFIG_DS_FIELDS": "zero_stage,zero3_init_flag,offload_optimizer_device,"
        "deepspeed_moe_layer_cls_names,deepspeed_multinode_launcher",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
        "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true",
        "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "nvme",
        "ACCELERATE_DEEPSPEED_MOE_LAYER_CLS_NAMES": "Block",
    }
    with pytest.raises(ConfigError) as e:
        resolve_engine_settings(cfg, env)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("the Accelerate launch config")
    for part in ("zero3_init_flag=true", "offload_optimizer_device=nvme", "moe_layer_cls_names"):
        assert part in msg
    assert "zero_stage" not in msg.split("does not apply")[1].split(";")[0]
    assert "multinode_launcher" not in msg


def test_launch_config_clipping_and_accumulation_must_match():
    cfg = load_config(None, [*SYNTH, "optim.gradient_acc=2"])
    env = {"ACCELERATE_CONFIG_DS_FIELDS": "gradient_accumulation_steps"}
    env["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] = "4"
    with pytest.raises(ConfigError, match=r"optim.gradient_acc is 2 but .* sets .* 4"):
        resolve_engine_settings(cfg, env)
    env["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] = "2"
    env["ACCELERATE_GRADIENT_CLIPPING"] = "1.0"
    with pytest.raises(ConfigError, match=r"optim.clip_grad is 5.0 but .* gradient_clipping 1.0"):
        resolve_engine_settings(cfg, env)
    env["ACCELERATE_GRADIENT_CLIPPING"] = "5.0"
    assert resolve_engine_settings(cfg, env).zero_stage == 2
