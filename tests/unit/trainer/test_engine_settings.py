"""Engine settings that first matter on GPUs, checked on CPU: precision resolution order, fp32
gradient reduction/accumulation, fp32 BatchNorm statistics, one source for device and backend,
and the optimizer used with ZeRO offload."""

import json
import os

import pytest
import torch

from tests.helpers.distributed import run_distributed
from tests.helpers.paths import REPO
from trainer.config import ConfigError, load_config
from trainer.engine import (
    EngineSettings,
    build_backbone_optimizer,
    build_ds_config,
    keep_batchnorm_stats_fp32,
    resolve_device,
    resolve_engine_settings,
)

SYNTH = ["data.kind=synthetic", "data.num_classes=10", "data.num_image=64"]


def _accelerate_env(yaml_path: str) -> dict:
    """The ACCELERATE_* variables `accelerate launch --config_file yaml_path` exports."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args = launch_command_parser().parse_args(["--config_file", yaml_path, "x.py"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    # The multi-node config names port 29500, which Accelerate checks is free on rank 0; a
    # training run on this machine may hold it, and the port is not what this test is about.
    from trainer.ports import free_port

    args.main_process_port = free_port()
    fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    _, env = prepare_deepspeed_cmd_env(args)
    return {k: v for k, v in env.items() if k.startswith("ACCELERATE_")}


@pytest.mark.parametrize("yaml_name", ["1gpu.yaml", "8gpu_zero2.yaml", "multinode_zero3.yaml"])
def test_gpu_launch_configs_leave_precision_to_the_json(yaml_name):
    env = _accelerate_env(os.path.join(REPO, "accelerate_configs", yaml_name))
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"  # what Accelerate exports without a value
    s = resolve_engine_settings(load_config(None, SYNTH), env)
    assert s.precision == "bf16"  # the stage's JSON (ds_configs/zero{2,3}_bf16.json), not fp32
    assert s.zero_stage == {"1gpu.yaml": 2, "8gpu_zero2.yaml": 2}.get(yaml_name, 3)


def test_precision_order_experiment_then_accelerate_then_json(tmp_path):
    fp16_json = tmp_path / "fp16.json"
    fp16_json.write_text(json.dumps({"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}}))
    plain = load_config(None, [*SYNTH, f"engine.ds_config={fp16_json}"])
    assert resolve_engine_settings(plain, {"ACCELERATE_MIXED_PRECISION": "no"}).precision == "fp16"
    assert (
        resolve_engine_settings(plain, {"ACCELERATE_MIXED_PRECISION": "bf16"}).precision == "bf16"
    )
    chosen = load_config(None, [*SYNTH, f"engine.ds_config={fp16_json}", "engine.precision=fp32"])
    env = {"ACCELERATE_MIXED_PRECISION": "bf16"}
    assert resolve_engine_settings(chosen, env).precision == "fp32"


@pytest.mark.parametrize("json_name", ["zero2_bf16.json", "zero3_bf16.json"])
def test_bf16_reduces_and_accumulates_in_fp32(json_name):
    from deepspeed.runtime.config import DeepSpeedConfig

    path = os.path.join(REPO, "ds_configs", json_name)
    with open(path) as f:
        shipped = json.load(f)
    assert shipped["communication_data_type"] == "fp32"
    assert shipped["data_types"] == {"grad_accum_dtype": "fp32"}
    cfg = load_config(None, SYNTH)
    ds = build_ds_config(cfg, EngineSettings(2, "bf16", path))
    resolved = DeepSpeedConfig(ds)
    assert resolved.communication_data_type == torch.float32
    assert resolved.grad_accum_dtype == "fp32"
    assert resolved.buffer_dtype is None  # BatchNorm running statistics keep their fp32


def test_build_ds_config_merges_data_types(tmp_path):
    mine = tmp_path / "mine.json"
    body = {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "bf16", "x": 1}}
    mine.write_text(json.dumps({**body, "communication_data_type": "bf16"}))
    cfg = load_config(None, SYNTH)
    for precision in ("bf16", "fp16"):
        ds = build_ds_config(cfg, EngineSettings(2, precision, str(mine)))
        assert ds["data_types"] == {"grad_accum_dtype": "bf16", "x": 1}  # the user's choice
        assert ds["communication_data_type"] == "bf16"
    # No choice in the JSON: bf16 gets fp32 reduction and accumulation, nothing else is added.
    mine.write_text(json.dumps({"data_types": {"keep_in_fp32_modules": []}}))
    ds = build_ds_config(cfg, EngineSettings(2, "bf16", str(mine)))
    assert ds["data_types"] == {"keep_in_fp32_modules": [], "grad_accum_dtype": "fp32"}
    ds = build_ds_config(cfg, EngineSettings(2, "fp16", str(mine)))
    assert ds["data_types"] == {"keep_in_fp32_modules": []}
    assert ds["communication_data_type"] == "fp32"  # loss-scaled fp16 sums overflow (#28 item 6)
    ds = build_ds_config(cfg, EngineSettings(2, "fp32", str(mine)))
    assert "communication_data_type" not in ds


def test_fp16_recipe_reduces_in_fp32():
    from deepspeed.runtime.config import DeepSpeedConfig

    path = os.path.join(REPO, "ds_configs", "zero1_fp16.json")
    with open(path) as f:
        assert json.load(f)["communication_data_type"] == "fp32"
    ds = build_ds_config(load_config(None, SYNTH), EngineSettings(1, "fp16", path))
    resolved = DeepSpeedConfig(ds)
    assert ds["fp16"]["enabled"] and resolved.communication_data_type == torch.float32


class _FakeAccelerator:
    def __init__(self, name, backend):
        self._name, self._backend = name, backend

    def device_name(self, index=None):
        return self._name if index is None else f"{self._name}:{index}"

    def communication_backend_name(self):
        return self._backend


def test_device_and_backend_from_deepspeed_accelerator(monkeypatch):
    cuda, cpu = _FakeAccelerator("cuda", "nccl"), _FakeAccelerator("cpu", "ccl")
    dev, backend = resolve_device(3, cuda, cuda_available=True)
    assert (dev, backend) == (torch.device("cuda", 3), "nccl")
    assert resolve_device(0, cpu, cuda_available=False) == (torch.device("cpu"), "gloo")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    with pytest.raises(ConfigError, match=r"'cpu' \(DS_ACCELERATOR=cpu\).*is True"):
        resolve_device(0, cpu, cuda_available=True)  # inherited on a GPU host
    monkeypatch.delenv("DS_ACCELERATOR")
    with pytest.raises(ConfigError, match=r"'cuda' \(auto-detected\).*is False"):
        resolve_device(0, cuda, cuda_available=False)


def test_launch_env_sets_cpu_accelerator_only_without_cuda(monkeypatch):
    from tests.helpers import launch

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "DS_ACCELERATOR" not in launch.launch_env()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert launch.launch_env()["DS_ACCELERATOR"] == "cpu"


def test_offload_optimizers():
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    model = torch.nn.Linear(4, 2)
    settings = EngineSettings(2, "bf16", os.path.join(REPO, "ds_configs", "zero2_bf16.json"))
    sgd = load_config(None, [*SYNTH, "engine.offload=true", "optim.optimizer=sgd"])
    ds = build_ds_config(sgd, settings)
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_force_ds_cpu_optimizer"] is False  # torch SGD on the CPU partition
    assert type(build_backbone_optimizer(sgd, model, ds)) is torch.optim.SGD
    adamw = load_config(None, [*SYNTH, "engine.offload=true", "optim.optimizer=adamw"])
    ds = build_ds_config(adamw, settings)
    assert "zero_force_ds_cpu_optimizer" not in ds
    opt = build_backbone_optimizer(adamw, model, ds)
    assert isinstance(opt, DeepSpeedCPUAdam) and opt.adam_w_mode
    adamw_plain = load_config(None, [*SYNTH, "optim.optimizer=adamw"])
    # The offload JSON alone (no engine.offload) also gets DeepSpeed's CPU Adam.
    path = os.path.join(REPO, "ds_configs", "zero3_bf16_offload.json")
    ds = build_ds_config(adamw_plain, EngineSettings(3, "bf16", path))
    assert ds["zero_optimization"]["offload_optimizer"]["pin_memory"] is False  # no CUDA here
    assert isinstance(build_backbone_optimizer(adamw_plain, model, ds), DeepSpeedCPUAdam)


def test_cpu_batchnorm_keeps_fp32_stats_with_bf16_parameters():
    def bf16_bn():  # as DeepSpeed leaves it: bf16 parameters, fp32 buffers
        bn = torch.nn.BatchNorm2d(3)
        bn.weight.data, bn.bias.data = bn.weight.data.bfloat16(), bn.bias.data.bfloat16()
        return bn

    x = torch.randn(4, 3, 5, 5, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError):
        bf16_bn()(x)  # CPU kernel: "expected scalar type BFloat16 but found Float"
    bn = bf16_bn()
    assert keep_batchnorm_stats_fp32(bn, torch.device("cpu")) == 1
    y = bn(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and bn.weight.grad.dtype == torch.bfloat16
    assert bn.running_mean.dtype == torch.float32 and bn.num_batches_tracked.item() == 1
    expect = 0.1 * x.float().mean((0, 2, 3))
    torch.testing.assert_close(bn.running_mean, expect, atol=1e-3, rtol=1e-2)
    assert keep_batchnorm_stats_fp32(torch.nn.BatchNorm2d(3), torch.device("cuda", 0)) == 0
    # trainer/sync_bn.py's layer outside its synchronized path (eval here: no process group)
    from trainer.sync_bn import convert_sync_batchnorm

    sync = convert_sync_batchnorm(bf16_bn()).eval()
    with pytest.raises(RuntimeError):
        sync(x)
    assert keep_batchnorm_stats_fp32(sync, torch.device("cpu")) == 1
    assert sync(x).dtype == torch.bfloat16 and sync.running_mean.dtype == torch.float32


def _engine_worker(rank, world, stage):
    os.environ.update(
        {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)},
        ACCELERATE_USE_DEEPSPEED="true",
    )
    import models
    from trainer.engine import create_accelerator, prepare_backbone

    cfg = load_config(None, [*SYNTH, "data.batch_size=4", "model.embedding_size=8"])
    ds = build_ds_config(cfg, EngineSettings(stage, "bf16", "ds_configs/zero2_bf16.json"))
    accelerator = create_accelerator(cfg, ds, "bf16")
    torch.manual_seed(0)
    backbone = models.create("r18", embedding_size=8, base_width=4)
    engine = prepare_backbone(cfg, accelerator, backbone, ds)
    x = torch.randn(4, 3, 112, 112, generator=torch.Generator().manual_seed(rank))
    for _ in range(2):
        engine.backward(engine(x.bfloat16()).float().pow(2).mean())
        engine.step()
    bns = [m for m in engine.module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    return {
        "stats": {m.running_mean.dtype for m in bns} | {m.running_var.dtype for m in bns},
        "moved": float(bns[0].running_mean.abs().sum()),
        "comm": engine.communication_data_type,
        "accum": engine.get_data_types()[1],
        "weight": next(engine.module.parameters()).dtype,
    }


@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_engine_fp32_stats_reduction_and_accumulation(stage):
    for r in run_distributed(_engine_worker, 2, args=(stage,), timeout=240):
        assert r["weight"] == torch.bfloat16
        assert r["stats"] == {torch.float32} and r["moved"] > 0
        assert r["comm"] == torch.float32 and r["accum"] == torch.float32


def test_sync_bn_is_never_a_default():
    """engine.sync_bn costs two collectives per BatchNorm layer and step (README): opt-in only."""
    import glob

    from trainer.config import EngineConfig

    assert EngineConfig().sync_bn is False
    for path in glob.glob(os.path.join(REPO, "configs", "*.yaml")):
        assert load_config(path).engine.sync_bn is False, path
