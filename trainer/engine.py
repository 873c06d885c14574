"""Accelerate + DeepSpeed set-up for the backbone; distribution facts taken from the process group.

Only the backbone and its optimizer go through `accelerator.prepare`; the Partial FC head and its
optimizer stay outside ZeRO (docs/design.md). Parallelism is applied here in one order: activation
checkpointing on the bare model, then the DeepSpeed engine.
"""

from __future__ import annotations

import copy
import os
import types
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainer.config import Config, ConfigError
from trainer.config.schema import COMPILE_ZERO3

# Stage, precision and base JSON (and what the launch config and a user's JSON may say) are
# resolved in trainer/ds_settings.py; re-exported here, where callers have always found them.
from trainer.ds_settings import _ACCEL_PRECISION, _enabled
from trainer.ds_settings import DEFAULT_DS_CONFIGS as DEFAULT_DS_CONFIGS
from trainer.ds_settings import REPO_ROOT as REPO_ROOT
from trainer.ds_settings import EngineSettings as EngineSettings
from trainer.ds_settings import load_ds_json as load_ds_json
from trainer.ds_settings import resolve_engine_settings as resolve_engine_settings


def build_ds_config(
    cfg: Config, settings: EngineSettings, src: str = "experiment config"
) -> dict[str, Any]:
    """Fills the base JSON's "auto" fields and applies stage, precision and offload.

    A value a user's JSON sets that the experiment config (`src` names its file) also decides
    must agree with it (`trainer.ds_settings.check_json_against_config`): nothing is overwritten.

    Returns a complete DeepSpeed config dict: micro-batch = `data.batch_size`,
    `gradient_accumulation_steps` = `optim.gradient_acc`, `gradient_clipping` = `optim.clip_grad`,
    `zero_optimization.stage`, fp16/bf16 flags. Under bf16 gradients are all-reduced and
    accumulated in fp32 unless the JSON says otherwise (`communication_data_type`,
    `data_types.grad_accum_dtype`): bf16's 8-bit mantissa loses small contributions in a sum
    over ranks and micro-batches. Under fp16 they are all-reduced in fp32 too (the JSON may say
    otherwise): the gradients carry the loss scale S (up to 2^16) and the embedding gradient is
    scaled by W (`heads/comm.py`), so an fp16 sum over ranks overflows (65504) or rounds away
    small contributions (10-bit mantissa). The JSON's `data_types` is merged, never replaced;
    BatchNorm running statistics stay fp32 (no `buffer_dtype`; on CPU see
    `keep_batchnorm_stats_fp32`). With optimizer offload, SGD runs as torch.optim.SGD on the CPU
    partition (`zero_force_ds_cpu_optimizer: false`, see `build_backbone_optimizer`).

    Raises:
        ConfigError: a conflict between the JSON and the config, or an "auto" left unfilled.
    """
    from trainer.ds_settings import check_json_against_config

    ds = copy.deepcopy(load_ds_json(settings.ds_config_path))
    check_json_against_config(cfg, settings, ds, src)
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
    pin = _accelerator_name() == "cuda"  # pinned host memory needs a CUDA device
    if cfg.engine.offload or settings.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if (cfg.engine.offload or settings.offload_param == "cpu") and settings.zero_stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    for key in ("offload_optimizer", "offload_param"):
        if isinstance(zero.get(key), dict) and not pin:
            zero[key]["pin_memory"] = False
    if optimizer_offloaded(ds) and cfg.optim.optimizer == "sgd":
        ds["zero_force_ds_cpu_optimizer"] = False  # DeepSpeed has no CPU SGD kernel
    fp16: dict[str, Any] = ds["fp16"] if isinstance(ds.get("fp16"), dict) else {}
    fp16["enabled"] = settings.precision == "fp16"
    ds["fp16"] = fp16
    bf16: dict[str, Any] = dict(ds["bf16"]) if isinstance(ds.get("bf16"), dict) else {}
    # The JSON's other bf16 keys (check_grad_overflow) stay.
    bf16["enabled"] = settings.precision == "bf16"
    ds["bf16"] = bf16
    data_types = dict(ds.get("data_types") or {})
    if settings.precision in ("bf16", "fp16"):
        ds.setdefault("communication_data_type", "fp32")
    if settings.precision == "bf16":
        data_types.setdefault("grad_accum_dtype", "fp32")
    if data_types:
        ds["data_types"] = data_types
    else:
        ds.pop("data_types", None)
    leftover = [k for k, v in _walk(ds) if v == "auto"]
    if leftover:
        raise ConfigError(f"{settings.ds_config_path}: cannot fill 'auto' for {leftover}")
    return ds


def optimizer_offloaded(ds_config: dict[str, Any]) -> bool:
    """True when the DeepSpeed config moves optimizer state off the device (cpu or nvme)."""
    offload = (ds_config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return str(offload.get("device", "none")).lower() in ("cpu", "nvme")


def _walk(d: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
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


def _accelerator_name() -> str:
    """DeepSpeed's accelerator ("cuda", "cpu", ...): DS_ACCELERATOR, else its auto-detection."""
    from deepspeed.accelerator import get_accelerator

    return str(get_accelerator()._name)


def resolve_device(
    local_rank: int | None = None, accelerator: Any = None, cuda_available: bool | None = None
) -> tuple[torch.device, str]:
    """The device of this rank and the process-group backend, both from DeepSpeed's accelerator.

    DeepSpeed places the engine on its accelerator (`DS_ACCELERATOR`, else auto-detected), so the
    head, the batches and the process group follow it too: one source for every part.

    Args:
        local_rank: index of the device on this node (default: `LOCAL_RANK`, else 0).
        accelerator: a DeepSpeed accelerator (default: `deepspeed.accelerator.get_accelerator()`).
        cuda_available: what torch reports (default: `torch.cuda.is_available()`).

    Returns:
        (`cuda:LOCAL_RANK` or `cpu` ..., "nccl" / "gloo" / the accelerator's backend).

    Raises:
        ConfigError: DeepSpeed's accelerator and torch disagree about CUDA (e.g. an inherited
            `DS_ACCELERATOR=cpu` on a GPU host), naming both.
    """
    if accelerator is None:
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    name = accelerator._name
    ds_env = os.environ.get("DS_ACCELERATOR")
    source = f"DS_ACCELERATOR={ds_env}" if ds_env else "auto-detected"
    if (name == "cuda") != bool(cuda_available):
        raise ConfigError(
            f"device: DeepSpeed's accelerator is '{name}' ({source}) but "
            f"torch.cuda.is_available() is {bool(cuda_available)}: unset DS_ACCELERATOR on a GPU "
            f"host, or hide the GPUs (CUDA_VISIBLE_DEVICES=) to train on CPU"
        )
    if name == "cpu":
        return torch.device("cpu"), "gloo"
    backend = accelerator.communication_backend_name()
    return torch.device(accelerator.device_name(local_rank)), backend


def dist_info() -> DistInfo:
    """Reads the initialized torch.distributed group; world size 1 without one. The device is
    `resolve_device`'s (ConfigError on a contradiction)."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device, _ = resolve_device(local_rank)
    return DistInfo(rank, world, local_rank, device)


def create_accelerator(cfg: Config, ds_config: dict[str, Any], precision: str) -> Any:
    """One Accelerator with a DeepSpeed plugin built from `ds_config`.

    Device and backend come from `resolve_device` (gloo on CPU, passed explicitly: otherwise
    Accelerate reports one process on every rank). The collective timeout is `engine.timeout_s`.

    Raises:
        ConfigError: DeepSpeed's accelerator contradicts torch or `accelerator.device`.
    """
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import InitProcessGroupKwargs

    device, backend = resolve_device()
    pg_kwargs = InitProcessGroupKwargs(
        backend=backend, timeout=timedelta(seconds=cfg.engine.timeout_s)
    )
    # The launch config's DeepSpeed fields were already folded into `ds_config`
    # (resolve_engine_settings); Accelerate would reject them beside a full JSON.
    os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
    plugin = DeepSpeedPlugin(hf_ds_config=ds_config)
    mixed = _ACCEL_PRECISION.get(precision, "no")  # fp32: Accelerate's "no"
    from trainer.logging_utils import tracking_kwargs

    accelerator = Accelerator(
        deepspeed_plugin=plugin,
        mixed_precision=mixed,
        gradient_accumulation_steps=cfg.optim.gradient_acc,
        kwargs_handlers=[pg_kwargs],
        **tracking_kwargs(cfg),  # log_with: logging.trackers
    )
    if accelerator.device.type != device.type:
        raise ConfigError(
            f"device: Accelerate chose {accelerator.device} but DeepSpeed's accelerator is "
            f"{device}: check DS_ACCELERATOR and the launch config's use_cpu"
        )
    return accelerator


def build_backbone_optimizer(
    cfg: Config,
    model: torch.nn.Module,
    ds_config: dict[str, Any] | None = None,
    param_groups: list[dict[str, Any]] | None = None,
) -> torch.optim.Optimizer:
    """The client optimizer DeepSpeed wraps: SGD (momentum, wd) or AdamW, as arcface_torch.

    `param_groups` (trainer/freeze.py `param_groups`; None: one group of `model.parameters()`)
    lets the fine-tuning controls set a learning rate and weight decay per part.

    With optimizer offload in `ds_config` DeepSpeed 0.19.8 refuses a torch AdamW
    (`zero_force_ds_cpu_optimizer`): AdamW becomes `DeepSpeedCPUAdam(adamw_mode=True)` (same
    update, its C++ kernel, JIT-built once into TORCH_EXTENSIONS_DIR). DeepSpeed has no CPU SGD,
    so SGD stays torch.optim.SGD stepping the CPU fp32 partition (`build_ds_config` sets
    `zero_force_ds_cpu_optimizer: false`). Which one runs is logged.
    """
    offload = ds_config is not None and optimizer_offloaded(ds_config)
    params: Any = param_groups if param_groups is not None else model.parameters()
    opt: torch.optim.Optimizer
    if cfg.optim.optimizer == "sgd":
        opt = torch.optim.SGD(
            params,
            lr=cfg.optim.lr,
            momentum=cfg.optim.momentum,
            weight_decay=cfg.optim.weight_decay,
        )
    elif offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        opt = DeepSpeedCPUAdam(
            params,
            lr=cfg.optim.lr,
            betas=(cfg.optim.betas[0], cfg.optim.betas[1]),
            eps=cfg.optim.eps,
            weight_decay=cfg.optim.weight_decay,
            adamw_mode=True,
        )
    else:
        opt = torch.optim.AdamW(
            params,
            lr=cfg.optim.lr,
            betas=(cfg.optim.betas[0], cfg.optim.betas[1]),
            eps=cfg.optim.eps,
            weight_decay=cfg.optim.weight_decay,
        )
    if offload and int(os.environ.get("RANK", 0)) == 0:
        print(
            f"[arcscale] optimizer offload: backbone optimizer {type(opt).__module__}."
            f"{type(opt).__name__} steps on the CPU copy of the fp32 weights",
            flush=True,
        )
    return opt


def keep_batchnorm_stats_fp32(model: torch.nn.Module, device: torch.device) -> int:
    """Lets BatchNorm keep fp32 running statistics under bf16/fp16 on CPU.

    DeepSpeed casts parameters to bf16/fp16 and leaves buffers fp32. CUDA's batch_norm accepts
    that mix; the CPU kernel wants weight, bias and running stats in one dtype ("expected scalar
    type BFloat16 but found Float") but accepts a bf16/fp16 input with all of them fp32. So on CPU
    each plain BatchNorm runs with its affine parameters upcast to fp32 (a differentiable cast:
    gradients reach the bf16 parameters); SyncBatchNorm (trainer/sync_bn.py) the same outside
    its synchronized path. No-op on other devices.

    Returns:
        the number of BatchNorm modules changed.
    """
    if device.type != "cpu":
        return 0
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.SyncBatchNorm):
            module.forward = types.MethodType(_sync_batchnorm_fp32_affine, module)  # type: ignore[method-assign]
        elif isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.forward = types.MethodType(_batchnorm_fp32_affine, module)  # type: ignore[method-assign]
        else:
            continue
        changed += 1
    return changed


def _sync_batchnorm_fp32_affine(self: torch.nn.SyncBatchNorm, x: torch.Tensor) -> torch.Tensor:
    # trainer/sync_bn.py's synchronized CPU path handles mixed dtypes itself; its plain path
    # (eval, one process) is the CPU batch_norm kernel, which needs the fp32 parameters.
    group = self.process_group or (dist.group.WORLD if dist.is_initialized() else None)
    if self.training and group is not None and dist.get_world_size(group) > 1:
        out: torch.Tensor = type(self).forward(self, x)
        return out
    return _batchnorm_fp32_affine(self, x)


def _batchnorm_fp32_affine(
    self: torch.nn.modules.batchnorm._BatchNorm, x: torch.Tensor
) -> torch.Tensor:
    # _BatchNorm.forward (torch 2.x) with weight and bias passed as fp32.
    self._check_input_dim(x)  # type: ignore[no-untyped-call]
    momentum = 0.0 if self.momentum is None else self.momentum
    if self.training and self.track_running_stats and self.num_batches_tracked is not None:
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            momentum = 1.0 / float(self.num_batches_tracked)
    batch_stats = self.training or (self.running_mean is None and self.running_var is None)
    use_running = not self.training or self.track_running_stats
    weight = None if self.weight is None else self.weight.float()
    bias = None if self.bias is None else self.bias.float()
    return F.batch_norm(
        x,
        self.running_mean if use_running else None,
        self.running_var if use_running else None,
        weight,
        bias,
        batch_stats,
        momentum,
        self.eps,
    )


def prepare_backbone(
    cfg: Config,
    accelerator: Any,
    backbone: torch.nn.Module,
    ds_config: dict[str, Any],
    param_groups: list[dict[str, Any]] | None = None,
) -> Any:
    """The backbone's optimizer (`build_backbone_optimizer`, over `param_groups` if given) and
    DeepSpeed engine (`accelerator.prepare`), BatchNorm statistics kept fp32
    (`keep_batchnorm_stats_fp32`); under a bf16/fp16 engine the backbone's `fp32_tail` computes
    in fp32 (`trainer.precision.keep_tail_fp32`, as arcface_torch); with `engine.compile` the
    backbone is compiled (`compile_backbone`).

    Returns:
        the DeepSpeed engine, in train mode.

    Raises:
        ConfigError: `engine.compile` with ZeRO-3.
    """
    from trainer.precision import keep_tail_fp32

    stage = int((ds_config.get("zero_optimization") or {}).get("stage", 0))
    if cfg.engine.compile and stage == 3:  # the stage may come from the launch config or JSON
        raise ConfigError(f"engine.compile {COMPILE_ZERO3} (ZeRO stage resolved to 3)")
    device, _ = resolve_device()
    keep_batchnorm_stats_fp32(backbone, device)
    if _enabled(ds_config.get("bf16")) or _enabled(ds_config.get("fp16")):
        keep_tail_fp32(backbone)
    optimizer = build_backbone_optimizer(cfg, backbone, ds_config, param_groups)
    engine, _ = accelerator.prepare(backbone, optimizer)
    engine.train()
    if cfg.engine.compile:
        compile_backbone(engine)
    return engine


def compile_backbone(engine: Any) -> None:
    """`torch.compile` of the backbone inside its engine (`engine.compile`, ZeRO-1/2).

    DeepSpeed's `engine.compile()` calls `module.compile(backend=...)` with its accelerator's
    backend (inductor on CUDA and CPU): compiled in place, so parameter names, state-dict keys
    (insightface's) and ZeRO's gradient hooks stay as they are; the graph is built at the first
    forward (minutes on CPU) and again when the input shape or train/eval mode changes (the
    verification callback's batches: one more graph). Inductor fuses the memory-bound
    BatchNorm, PReLU and residual-add passes into the neighbouring kernels. The fp32 tail and
    the CPU BatchNorm forwards (`keep_batchnorm_stats_fp32`) are traced like any other forward.
    """
    engine.compile()


def loss_scale(engine: Any) -> float:
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
