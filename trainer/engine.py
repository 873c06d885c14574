"""Accelerate + DeepSpeed set-up for the backbone; distribution facts taken from the process group.

Only the backbone and its optimizer go through `accelerator.prepare`; the Partial FC head and its
optimizer stay outside ZeRO (see design.md). Parallelism is applied here in one order: activation
checkpointing on the bare model, then the DeepSpeed engine.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from trainer.config import Config, ConfigError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DS_CONFIGS = {
    0: "ds_configs/zero1_fp16.json",
    1: "ds_configs/zero1_fp16.json",
    2: "ds_configs/zero2_bf16.json",
    3: "ds_configs/zero3_bf16.json",
}
_ACCEL_PRECISION = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}


@dataclass(frozen=True)
class EngineSettings:
    """The ZeRO stage, precision and DeepSpeed JSON actually used, after the precedence rules."""

    zero_stage: int
    precision: str
    ds_config_path: str


def resolve_engine_settings(cfg: Config, env: dict | None = None) -> EngineSettings:
    """Picks stage, precision and base JSON.

    Precedence: the experiment config (`engine.zero_stage >= 0`, `engine.precision`,
    `engine.ds_config`), then what `accelerate launch --config_file` exported
    (`ACCELERATE_DEEPSPEED_ZERO_STAGE`, `ACCELERATE_MIXED_PRECISION`,
    `ACCELERATE_DEEPSPEED_CONFIG_FILE`), then the base JSON's own values.

    Raises:
        ConfigError: a JSON file that does not exist or does not parse.
    """
    env = os.environ if env is None else env
    path = cfg.engine.ds_config or env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    stage = cfg.engine.zero_stage
    if stage < 0 and env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        stage = int(env["ACCELERATE_DEEPSPEED_ZERO_STAGE"])
    if not path or path == "none":
        path = DEFAULT_DS_CONFIGS[max(stage, 0) if stage >= 0 else 2]
    base = load_ds_json(path)
    if stage < 0:
        stage = int(base.get("zero_optimization", {}).get("stage", 2))
    precision = cfg.engine.precision
    if not precision:
        precision = _ACCEL_PRECISION.get(env.get("ACCELERATE_MIXED_PRECISION", ""), "")
    if not precision:
        if _enabled(base.get("fp16")):
            precision = "fp16"
        elif _enabled(base.get("bf16")):
            precision = "bf16"
        else:
            precision = "fp32"
    return EngineSettings(stage, precision, path)


def _enabled(section: dict | None) -> bool:
    return bool(section) and str(section.get("enabled", False)).lower() == "true"


def load_ds_json(path: str) -> dict:
    """Reads a DeepSpeed JSON (relative paths are tried from the repo root too)."""
    candidates = [path, os.path.join(REPO_ROOT, path)]
    for p in candidates:
        if os.path.isfile(p):
            with open(p) as f:
                try:
                    return json.load(f)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{p}: engine.ds_config: invalid JSON: {e}") from e
    raise ConfigError(f"engine.ds_config: DeepSpeed config file not found: {path}")


def build_ds_config(cfg: Config, settings: EngineSettings) -> dict:
    """Fills the base JSON's "auto" fields and applies stage, precision and offload.

    Returns a complete DeepSpeed config dict: micro-batch = `data.batch_size`,
    `gradient_accumulation_steps` = `optim.gradient_acc`, `gradient_clipping` = `optim.clip_grad`,
    `zero_optimization.stage`, fp16/bf16 flags and BatchNorm buffer dtype for the precision.
    """
    ds = copy.deepcopy(load_ds_json(settings.ds_config_path))
    ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
    ds["gradient_accumulation_steps"] = cfg.optim.gradient_acc
    ds.pop("train_batch_size", None)
    ds["gradient_clipping"] = cfg.optim.clip_grad
    ds["zero_allow_untested_optimizer"] = True
    zero = ds.setdefault("zero_optimization", {})
    zero["stage"] = settings.zero_stage
    if settings.zero_stage < 3:
        for key in [k for k in zero if k.startswith("stage3_")] + ["offload_param"]:
            zero.pop(key, None)
    if cfg.engine.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if settings.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    fp16 = ds.get("fp16") if isinstance(ds.get("fp16"), dict) else {}
    fp16["enabled"] = settings.precision == "fp16"
    ds["fp16"] = fp16
    ds["bf16"] = {"enabled": settings.precision == "bf16"}
    # DeepSpeed casts parameters, not buffers: BatchNorm running stats must follow the precision.
    if settings.precision == "fp32":
        ds.pop("data_types", None)
    else:
        ds["data_types"] = {"buffer_dtype": settings.precision}
    leftover = [k for k, v in _walk(ds) if v == "auto"]
    if leftover:
        raise ConfigError(f"{settings.ds_config_path}: cannot fill 'auto' for {leftover}")
    return ds


def _walk(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


@dataclass(frozen=True)
class DistInfo:
    """Rank, world size and device from the real process group (not Accelerate's counters)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def dist_info() -> DistInfo:
    """Reads the initialized torch.distributed group; world size 1 without one."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(rank, world, local_rank, device)


def create_accelerator(cfg: Config, ds_config: dict, precision: str):
    """One Accelerator with a DeepSpeed plugin built from `ds_config`.

    On CPU the process group must be gloo (passed explicitly: otherwise Accelerate reports one
    process on every rank). The collective timeout is `engine.timeout_s`.
    """
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import InitProcessGroupKwargs

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    pg_kwargs = InitProcessGroupKwargs(
        backend=backend, timeout=timedelta(seconds=cfg.engine.timeout_s)
    )
    # The launch config's DeepSpeed fields were already folded into `ds_config`
    # (resolve_engine_settings); Accelerate would reject them beside a full JSON.
    os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
    plugin = DeepSpeedPlugin(hf_ds_config=ds_config)
    mixed = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}[precision]
    return Accelerator(
        deepspeed_plugin=plugin,
        mixed_precision=mixed,
        gradient_accumulation_steps=cfg.optim.gradient_acc,
        kwargs_handlers=[pg_kwargs],
    )


def build_backbone_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The client optimizer DeepSpeed wraps: SGD (momentum, wd) or AdamW, as arcface_torch."""
    if cfg.optim.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=cfg.optim.lr,
            momentum=cfg.optim.momentum,
            weight_decay=cfg.optim.weight_decay,
        )
    return torch.optim.AdamW(
        model.parameters(),
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
    )


def loss_scale(engine) -> float:
    """The engine's current fp16 loss scale S (1.0 for fp32/bf16)."""
    if not getattr(engine, "fp16_enabled", lambda: False)():
        return 1.0
    opt = engine.optimizer
    for attr in ("cur_scale", "loss_scale"):
        value = getattr(opt, attr, None)
        if value is not None:
            return float(value)
    scaler = getattr(opt, "loss_scaler", None)
    return float(scaler.cur_scale) if scaler is not None else 1.0


def set_backbone_lr(engine, lr: float) -> None:
    """Sets the learning rate of every param group of the engine's (wrapped) optimizer."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
