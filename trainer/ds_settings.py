"""DeepSpeed settings: stage, precision and base JSON picked by precedence, and what a user's
DeepSpeed JSON and the Accelerate launch config may say, checked against the experiment config:
every disagreement is a `ConfigError` naming both sources and the field.

A value the JSON leaves to the experiment config is `"auto"` (Hugging Face's convention, which
Accelerate's DeepSpeed plugin also fills). The stage templates in `ds_configs/` picked when no
JSON is named are defaults, not the user's word: their stage and precision yield silently.

`accelerate launch --config_file` exports each `deepspeed_config` field of the launch config as
an `ACCELERATE_*` variable and lists the names in `ACCELERATE_CONFIG_DS_FIELDS`. arcscale builds
the whole DeepSpeed JSON itself (`trainer.engine.build_ds_config`), so each field is honoured
here (`LAUNCH_FIELDS`) or refused in one line; none is dropped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from trainer.config import Config, ConfigError

LAUNCH_SRC = "the Accelerate launch config (deepspeed_config)"
# launch-config field -> the variable `accelerate launch` exports it as.
LAUNCH_FIELDS = {
    "zero_stage": "ACCELERATE_DEEPSPEED_ZERO_STAGE",
    "deepspeed_config_file": "ACCELERATE_DEEPSPEED_CONFIG_FILE",
    "gradient_accumulation_steps": "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
    "gradient_clipping": "ACCELERATE_GRADIENT_CLIPPING",
    "offload_optimizer_device": "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE",
    "offload_param_device": "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE",
    "zero3_init_flag": "ACCELERATE_DEEPSPEED_ZERO3_INIT",
    "zero3_save_16bit_model": "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL",
    "deepspeed_moe_layer_cls_names": "ACCELERATE_DEEPSPEED_MOE_LAYER_CLS_NAMES",
}
# Read by `accelerate launch` itself (which launcher, which hosts), not by the training process.
LAUNCHER_FIELDS = frozenset(
    {
        "mixed_precision",
        "deepspeed_multinode_launcher",
        "deepspeed_hostfile",
        "deepspeed_inclusion_filter",
        "deepspeed_exclusion_filter",
    }
)


@dataclass(frozen=True)
class LaunchDeepSpeed:
    """The launch config's DeepSpeed fields arcscale applies ("" / None: not given).

    `offload_optimizer` / `offload_param`: "cpu" or "none" (nvme is refused: Accelerate exports
    no NVMe path). `gradient_acc` / `clip_grad`: checked against the experiment config."""

    offload_optimizer: str = ""
    offload_param: str = ""
    gradient_acc: int | None = None
    clip_grad: float | None = None


def _given(env: Mapping[str, str]) -> dict[str, str]:
    """launch-config field -> exported value, for every field the launch config set."""
    listed = [f for f in env.get("ACCELERATE_CONFIG_DS_FIELDS", "").split(",") if f.strip()]
    given = {f.strip(): "" for f in listed}
    for name, var in LAUNCH_FIELDS.items():
        if var in env:
            given[name] = env[var]
    return given


def read_launch_config(env: Mapping[str, str]) -> LaunchDeepSpeed:
    """Reads the launch config's DeepSpeed fields from what `accelerate launch` exported.

    Honoured: `zero_stage`, `mixed_precision`, `deepspeed_config_file` (by
    `resolve_engine_settings`), `offload_optimizer_device` / `offload_param_device` (cpu or
    none), `gradient_accumulation_steps` / `gradient_clipping` (must equal the experiment
    config's), `zero3_init_flag` / `zero3_save_16bit_model` when false (what arcscale does), and
    the launcher's own fields (`LAUNCHER_FIELDS`).

    Raises:
        ConfigError: one line listing every field that is not honoured (with its value).
    """
    given = _given(env)
    refused = []
    for name, value in given.items():
        low = value.strip().lower()
        if name in ("zero_stage", "deepspeed_config_file") or name in LAUNCHER_FIELDS:
            continue
        if name in ("offload_optimizer_device", "offload_param_device") and low in ("cpu", "none"):
            continue
        if name in ("zero3_init_flag", "zero3_save_16bit_model") and low == "false":
            continue
        if name in ("gradient_accumulation_steps", "gradient_clipping"):
            continue
        refused.append(f"{name}={value}" if value else name)
    if refused:
        raise ConfigError(
            f"{LAUNCH_SRC}: arcscale does not apply {', '.join(refused)}; remove them (offload "
            f"devices: cpu or none; ZeRO-3 init and 16-bit saving: false; the rest go in the "
            f"experiment config or engine.ds_config)"
        )
    acc = given.get("gradient_accumulation_steps", "")
    clip = given.get("gradient_clipping", "")
    return LaunchDeepSpeed(
        offload_optimizer=given.get("offload_optimizer_device", "").strip().lower(),
        offload_param=given.get("offload_param_device", "").strip().lower(),
        gradient_acc=int(acc) if acc.strip() else None,
        clip_grad=float(clip) if clip.strip() else None,
    )


def check_launch_against_config(cfg: Config, launch: LaunchDeepSpeed, src: str) -> None:
    """The launch config's accumulation and clipping must equal the experiment config's.

    Raises:
        ConfigError: naming both sources and the field.
    """
    pairs = (
        (
            "gradient_accumulation_steps",
            launch.gradient_acc,
            "optim.gradient_acc",
            cfg.optim.gradient_acc,
        ),
        ("gradient_clipping", launch.clip_grad, "optim.clip_grad", cfg.optim.clip_grad),
    )
    for name, theirs, ours, mine in pairs:
        if theirs is not None and float(theirs) != float(mine):
            raise ConfigError(
                f"{src}: {ours} is {mine} but {LAUNCH_SRC} sets {name} {theirs}: make them equal "
                f"or remove it from the launch config"
            )


def _json_value(ds: dict[str, Any], dotted: str) -> Any:
    node: Any = ds
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return "auto"
        node = node[part]
    return node


def _differs(theirs: Any, mine: Any) -> bool:
    if isinstance(theirs, str) and theirs.strip().lower() == "auto":
        return False
    if isinstance(mine, bool) or isinstance(theirs, bool):
        return str(theirs).lower() != str(mine).lower()
    try:
        return float(theirs) != float(mine)
    except (TypeError, ValueError):
        return True


def check_json_against_config(
    cfg: Config, settings: EngineSettings, ds: dict[str, Any], src: str = "experiment config"
) -> None:
    """Every number or switch of a user's DeepSpeed JSON (`settings.ds_config_source` set) that
    the experiment config also decides must agree with it, or be "auto".

    Compared: `train_micro_batch_size_per_gpu` (data.batch_size), `gradient_accumulation_steps`
    (optim.gradient_acc), `gradient_clipping` (optim.clip_grad), `zero_optimization.stage`
    (engine.zero_stage, when set), `fp16.enabled` / `bf16.enabled` (engine.precision, when set),
    and `offload_optimizer.device` when `engine.offload` or the launch config asks for
    offload. `train_batch_size` needs the world size: `trainer.train.check_batch`.

    Args:
        cfg: the experiment config; `src` names its file in messages.
        settings: from `resolve_engine_settings` (path, sources, stage, precision).
        ds: the JSON as read.

    Raises:
        ConfigError: `<src>: <field> is X but <json> sets <key> Y (...)`.
    """
    if not settings.ds_config_source:
        return  # a stage template picked by default, not the user's JSON
    path = settings.ds_config_path
    checks: list[tuple[str, Any, str, Any]] = [
        ("train_micro_batch_size_per_gpu", cfg.data.batch_size, "data.batch_size", None),
        ("gradient_accumulation_steps", cfg.optim.gradient_acc, "optim.gradient_acc", None),
        ("gradient_clipping", cfg.optim.clip_grad, "optim.clip_grad", None),
    ]
    # Only the experiment config's own choices: a launch-config stage still replaces the JSON's.
    if settings.stage_source == "engine.zero_stage":
        checks.append(("zero_optimization.stage", settings.zero_stage, settings.stage_source, None))
    if settings.precision_source == "engine.precision":
        for flag in ("fp16", "bf16"):
            want = settings.precision == flag
            checks.append((f"{flag}.enabled", want, settings.precision_source, settings.precision))
    for key, mine, field_name, shown in checks:
        theirs = _json_value(ds, key)
        if _differs(theirs, mine):
            value = shown if shown is not None else mine
            raise ConfigError(
                f"{src}: {field_name} is {value} but {path} sets {key} {theirs!r} "
                f'(use "auto" in the JSON or make them equal)'
            )
    device = _json_value(ds, "zero_optimization.offload_optimizer.device")
    offload = _wanted_offload(cfg, settings)
    if offload and str(device).lower() not in ("auto", offload):
        raise ConfigError(
            f"{src}: {offload} asks for optimizer offload to cpu but {path} sets "
            f"zero_optimization.offload_optimizer.device {device!r} (set one of them)"
        )


def _wanted_offload(cfg: Config, settings: EngineSettings) -> str:
    """Who asks for optimizer offload to the CPU ("": nobody)."""
    if cfg.engine.offload:
        return "engine.offload"
    if settings.offload_optimizer == "cpu":
        return f"offload_optimizer_device of {LAUNCH_SRC}"
    return ""


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DS_CONFIGS = {
    0: "ds_configs/zero1_fp16.json",
    1: "ds_configs/zero1_fp16.json",
    2: "ds_configs/zero2_bf16.json",
    3: "ds_configs/zero3_bf16.json",
}
# Accelerate exports "no" whenever its launch config names no precision, so "no" means unset:
# the JSON decides (fp32 on purpose: `engine.precision: fp32`, or a JSON without fp16/bf16).
_ACCEL_PRECISION = {"fp16": "fp16", "bf16": "bf16"}


@dataclass(frozen=True)
class EngineSettings:
    """The ZeRO stage, precision and DeepSpeed JSON actually used, after the precedence rules."""

    zero_stage: int
    precision: str
    ds_config_path: str
    # Who chose each ("": a default); the JSON must agree with them (`check_json_against_config`).
    ds_config_source: str = ""
    stage_source: str = ""
    precision_source: str = ""
    # The launch config's offload devices ("cpu", "none" or "": not given).
    offload_optimizer: str = ""
    offload_param: str = ""


def resolve_engine_settings(
    cfg: Config, env: Mapping[str, str] | None = None, src: str = "experiment config"
) -> EngineSettings:
    """Picks stage, precision and base JSON.

    Precedence: the experiment config (`engine.zero_stage >= 0`, `engine.precision`,
    `engine.ds_config`), then what `accelerate launch --config_file` exported
    (`ACCELERATE_DEEPSPEED_ZERO_STAGE`, `ACCELERATE_MIXED_PRECISION`,
    `ACCELERATE_DEEPSPEED_CONFIG_FILE`), then the base JSON's own values.
    `ACCELERATE_MIXED_PRECISION=no` counts as unset: Accelerate exports it for every launch
    config without `mixed_precision`, so it cannot mean "fp32 wanted".

    The launch config's other DeepSpeed fields are honoured or refused by
    `read_launch_config`; each setting records who chose it.

    Raises:
        ConfigError: a JSON file that does not exist or does not parse; a launch-config field
            arcscale does not apply, or one that contradicts the experiment config.
    """
    env = os.environ if env is None else env
    launch = read_launch_config(env)
    check_launch_against_config(cfg, launch, src)  # `src` names the experiment config
    path, path_src = cfg.engine.ds_config, "engine.ds_config"
    if not path and env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none") != "none":
        path, path_src = env["ACCELERATE_DEEPSPEED_CONFIG_FILE"], "deepspeed_config_file"
    stage, stage_src = cfg.engine.zero_stage, "engine.zero_stage"
    if stage < 0 and env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        stage = int(env["ACCELERATE_DEEPSPEED_ZERO_STAGE"])
        stage_src = f"zero_stage of {LAUNCH_SRC}"
    if not path or path == "none":
        path, path_src = DEFAULT_DS_CONFIGS[max(stage, 0) if stage >= 0 else 2], ""
    base = load_ds_json(path)
    if stage < 0:
        stage, stage_src = int(base.get("zero_optimization", {}).get("stage", 2)), ""
    precision, precision_src = cfg.engine.precision, "engine.precision"
    if not precision:
        precision = _ACCEL_PRECISION.get(env.get("ACCELERATE_MIXED_PRECISION", ""), "")
        precision_src = "mixed_precision of the Accelerate launch config"
    if not precision:
        precision_src = ""
        if _enabled(base.get("fp16")):
            precision = "fp16"
        elif _enabled(base.get("bf16")):
            precision = "bf16"
        else:
            precision = "fp32"
    if launch.offload_param == "cpu" and stage != 3:
        raise ConfigError(
            f"{LAUNCH_SRC}: offload_param_device=cpu needs ZeRO stage 3, the run uses {stage}"
        )
    return EngineSettings(
        stage,
        precision,
        path,
        path_src,
        stage_src,
        precision_src,
        launch.offload_optimizer,
        launch.offload_param,
    )


def _enabled(section: dict[str, Any] | None) -> bool:
    return section is not None and str(section.get("enabled", False)).lower() == "true"


def load_ds_json(path: str) -> dict[str, Any]:
    """Reads a DeepSpeed JSON (relative paths are tried from the repo root too)."""
    candidates = [path, os.path.join(REPO_ROOT, path)]
    for p in candidates:
        if os.path.isfile(p):
            with open(p) as f:
                try:
                    data: dict[str, Any] = json.load(f)
                    return data
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{p}: engine.ds_config: invalid JSON: {e}") from e
    raise ConfigError(f"engine.ds_config: DeepSpeed config file not found: {path}")
