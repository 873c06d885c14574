"""Experiment configuration: frozen dataclasses loaded from YAML, dotted CLI overrides, validation.

Names follow insightface's arcface_torch (`configs/base.py`) where a user would look for them
(`network`, `embedding_size`, `sample_rate`, `margin_list`, `batch_size` per device,
`gradient_acc`, `num_classes`, `num_image`, `num_epoch`, `warmup_epoch`, `val_targets`,
`frequent`, `verbose`, `seed`).
Every error is a `ConfigError` whose message names the file and the dotted field.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from data.atomic import write_text_atomic
from data.augment import AugmentSpec
from trainer.memory_format import CHOICES as MEMORY_FORMATS


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class ModelConfig:
    """Backbone. `network` is a name from `models.list_models()`; `kwargs` go to its builder.

    Fine-tuning (docs/finetune.md, trainer/pretrained.py): `pretrained` starts the backbone from
    a `backbone.pt` of ours, a step or run dir, or an arcface_torch `backbone.pth`; the head
    starts fresh. Key mismatches are an error unless `pretrained_strict: false` (logged, the
    matching keys load). `freeze_bn` keeps every BatchNorm's running statistics as loaded.
    `freeze_stages` N > 0 freezes the stem and the first N stages for `freeze_steps` optimizer
    steps (0: the whole run)."""

    network: str = "r50"
    embedding_size: int = 512
    grad_checkpointing: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: str = ""
    pretrained_strict: bool = True
    freeze_bn: bool = False
    freeze_stages: int = 0
    freeze_steps: int = 0


@dataclass(frozen=True)
class DataConfig:
    """Training data. `kind`: `rec` (insightface `train.rec/.idx` in folder `rec`), `folder`
    (one sub-folder per identity under `rec`) or `synthetic` (random images, no files).
    `batch_size` is the micro-batch per device; `num_image`/`num_classes` as arcface_torch."""

    kind: str = "rec"
    rec: str = ""
    num_classes: int = 0
    num_image: int = 0
    batch_size: int = 128
    num_workers: int = 2
    dali: bool = False
    flip: bool = True
    skip_corrupt: bool = False
    # Opt-in augmentation (data/augment.py, docs/data.md), the same in the CPU and DALI loaders.
    augment: AugmentSpec = field(default_factory=AugmentSpec)


@dataclass(frozen=True)
class HeadConfig:
    """Partial FC head and its margin `cos(m1*theta + m2) - m3`, scale `s`."""

    sample_rate: float = 1.0
    margin_list: tuple[float, ...] = (1.0, 0.5, 0.0)
    scale: float = 64.0
    interclass_filtering_threshold: float = 0.0
    # GEMM precision of the logits: fp32, tf32, bf16 (bf16 operands, fp32 accumulation and
    # softmax); auto = bf16 on CUDA under bf16 training, tf32 on other CUDA runs, fp32 on CPU.
    logits_dtype: str = "auto"
    # Row passes of the head step: compiled (torch.compile kernels, heads/fused.py) or eager;
    # auto = compiled on CUDA only (on CPU the compile costs more than a short run saves).
    kernels: str = "auto"
    # Margin loss by name (heads/losses.py LOSSES, docs/losses.md): combined reads margin_list;
    # the others take their own arguments from loss_kwargs (e.g. {m: 0.4, h: 0.333}).
    loss: str = "combined"
    loss_kwargs: dict[str, Any] = field(default_factory=dict)
    # issue #15 fidelity switches: exact = the margin's own slope at the target (ours);
    # arcface_torch = slope s, as its no_grad edit of the target logit.
    margin_gradient: str = "exact"
    # none (ours) or arcface_torch: cosines clamped to [-1, 1], target probability at 1e-30.
    clamping: str = "none"
    # Sub-center ArcFace (Deng et al., ECCV 2020): K centers per class, a class's cosine is the
    # max over its K; composes with any loss (docs/losses.md). 1 = one center per class.
    num_subcenters: int = 1


@dataclass(frozen=True)
class OptimConfig:
    """One optimizer recipe for backbone and head. arcface_torch: SGD lr 0.1 momentum 0.9
    wd 5e-4 for ResNets, AdamW lr 1e-3 wd 0.1 for ViTs. `clip_grad` is DeepSpeed's
    `gradient_clipping` of the backbone (0 disables)."""

    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    betas: tuple[float, ...] = (0.9, 0.999)
    eps: float = 1e-8
    gradient_acc: int = 1
    clip_grad: float = 5.0
    # Head rows' weight decay and momentum: "sampled" rows only (arcscale), or "dense", every
    # row of the shard every step as arcface_torch's SGD does (SGD only; heads/lazy_decay.py).
    head_decay: str = "sampled"
    # Fine-tuning: the backbone's learning rate is `lr * backbone_lr_scale` (the head's is `lr`);
    # the first `head_warmup_steps` steps train the head only (backbone frozen).
    backbone_lr_scale: float = 1.0
    head_warmup_steps: int = 0


@dataclass(frozen=True)
class ScheduleConfig:
    """Polynomial decay after linear warmup, per step (trainer/lr.py). `power` 2 is arcface_torch's
    older `PolyScheduler`; its current `PolynomialLRWarmup` decays linearly (power 1, what
    `compat: arcface_torch` sets). `max_steps` > 0 overrides the count derived from `num_epoch`."""

    num_epoch: int = 20
    warmup_epoch: int = 0
    max_steps: int = 0
    power: float = 2.0


@dataclass(frozen=True)
class EngineConfig:
    """DeepSpeed engine. `zero_stage` (-1: from the Accelerate launch config or the JSON),
    `precision` fp32/fp16/bf16 ("": same fallbacks), `ds_config` a JSON in `ds_configs/` whose
    "auto" fields are filled from this config ("": the Accelerate config's
    `deepspeed_config_file`, else the stage's default). `offload` moves optimizer state (and
    ZeRO-3 parameters) to CPU. `timeout_s` bounds every collective; `max_bad_steps` consecutive
    non-finite losses stop the run. `sync_bn` normalizes BatchNorm layers with the statistics of
    the global batch (trainer/sync_bn.py), so the loss does not depend on how it is split over
    ranks: a run resumed on another world size continues the same loss curve. `memory_format`
    of the input batches: `channels_last` (faster CPU convolutions), `contiguous` (NCHW) or
    `auto` (channels_last, except where a oneDNN bug needs NCHW: trainer/memory_format.py)."""

    zero_stage: int = -1
    precision: str = ""
    ds_config: str = ""
    offload: bool = False
    timeout_s: int = 1800
    max_bad_steps: int = 20
    sync_bn: bool = False
    memory_format: str = "auto"


@dataclass(frozen=True)
class LoggingConfig:
    """Console line and TensorBoard scalars every `frequent` optimizer steps (rank 0); the
    console is also kept in `<output>/training.log`. `trackers`: experiment trackers started
    through Accelerate's tracker interface with the same scalars (e.g. `[wandb]`, `[mlflow]`;
    the package must be installed)."""

    frequent: int = 10
    tensorboard: bool = True
    progress_bar: bool = True
    trackers: tuple[str, ...] = ()


@dataclass(frozen=True)
class EvalConfig:
    """Verification every `verbose` steps and at the end on `val_targets`: names of `<name>.bin`
    in `data.rec` (as arcface_torch) or paths to `.bin` files."""

    val_targets: tuple[str, ...] = ()
    verbose: int = 2000
    batch_size: int = 64


@dataclass(frozen=True)
class CheckpointConfig:
    """`every` optimizer steps (0: only at the end); `keep_last` complete checkpoints kept;
    `resume`: false, true (latest in `output`) or a checkpoint directory path; `overwrite`: a
    fresh run may replace the checkpoints another run left in `output` (else it refuses)."""

    every: int = 0
    keep_last: int = 3
    resume: Any = False
    overwrite: bool = False


@dataclass(frozen=True)
class Config:
    """A whole experiment. `output` is the run directory (checkpoints, TensorBoard, eval.jsonl)."""

    output: str = "work_dirs/run"
    seed: int = 2048
    # "arcface_torch": every switch where arcscale departs from arcface_torch's math takes
    # arcface_torch's value (COMPAT_PRESETS), unless the file or command line sets that field.
    compat: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


_CHOICES = {
    "data.kind": ("rec", "folder", "synthetic"),
    "optim.optimizer": ("sgd", "adamw"),
    "optim.head_decay": ("sampled", "dense"),
    "engine.precision": ("", "fp32", "fp16", "bf16"),
    "engine.zero_stage": (-1, 0, 1, 2, 3),
    "engine.memory_format": MEMORY_FORMATS,
    "head.margin_gradient": ("exact", "arcface_torch"),
    "head.clamping": ("none", "arcface_torch"),
}

# `compat: NAME` -> the fields it sets (dotted key -> value) where the config does not set them.
COMPAT_PRESETS: dict[str, dict[str, Any]] = {
    "arcface_torch": {
        "schedule.power": 1.0,  # PolynomialLRWarmup's default power (train_v2.py)
        "optim.head_decay": "dense",  # SGD over the whole weight Parameter (partial_fc_v2.py)
        "head.margin_gradient": "arcface_torch",  # margin edited under no_grad
        "head.clamping": "arcface_torch",  # cosines to [-1, 1], probabilities at 1e-30
    },
}


MAX_YAML_NODES = 100_000  # a real config has a few hundred; aliases may not expand past this


def _count_nodes(node: yaml.Node, limit: int) -> int:
    """Nodes of a YAML graph with every alias expanded (what `str()` or a dump would visit)."""
    count, stack = 0, [node]
    while stack:
        current = stack.pop()
        count += 1
        if count > limit:
            break
        if isinstance(current, yaml.SequenceNode):
            stack.extend(current.value)
        elif isinstance(current, yaml.MappingNode):
            for key, value in current.value:
                stack.extend((key, value))
    return count


def safe_load_yaml(text: Any, src: str) -> Any:
    """`yaml.safe_load` that refuses an alias bomb: a few hundred bytes of nested anchors and
    aliases expand to billions of values when the config is printed or saved.

    Args:
        text: YAML text or an open text file.
        src: names the source in errors (a path, or "command line: 'key=value'").

    Raises:
        ConfigError: invalid YAML, or more than `MAX_YAML_NODES` values once aliases expand.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _count_nodes(node, MAX_YAML_NODES) > MAX_YAML_NODES:
            raise ConfigError(
                f"{src}: YAML anchors/aliases expand to more than {MAX_YAML_NODES} values; "
                "write the values out instead"
            )
        return loader.construct_document(node)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = " ".join(str(e).split())  # one line: PyYAML's messages span several
        raise ConfigError(f"{src}: invalid YAML: {first}") from None
    finally:
        loader.dispose()


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Checks/converts one YAML value to the annotated type; raises ConfigError naming `where`."""
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is tuple or typing.get_origin(tp) is tuple:  # tuple[float, float]: data.augment
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(value)
    if tp is dict or typing.get_origin(tp) is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    raise ConfigError(f"{where}: unsupported type {tp}")


def _check_keys_are_strings(raw: dict[Any, Any], prefix: str, src: str) -> None:
    """YAML allows `1:` or `true:` as keys; a config section only has named fields."""
    for key in raw:
        if not isinstance(key, str):
            raise ConfigError(
                f"{src}: key {key!r} in '{prefix.rstrip('.') or 'top level'}' is a "
                f"{type(key).__name__}; config keys are names"
            )


# Clearer names accepted beside arcface_torch's (which stay the documented, saved names).
ALIASES = {
    "eval.every_steps": "eval.verbose",
    "logging.every_steps": "logging.frequent",
    "data.path": "data.rec",
}


def _apply_aliases(raw: dict[str, Any], prefix: str, src: str) -> dict[str, Any]:
    out = dict(raw)
    for key in list(raw):
        canonical = ALIASES.get(f"{prefix}{key}")
        if canonical is None:
            continue
        name = canonical.rsplit(".", 1)[-1]
        if name in raw:
            raise ConfigError(
                f"{src}: '{prefix}{key}' and '{canonical}' are the same field: give one"
            )
        out[name] = out.pop(key)
    return out


def _build(cls: Any, raw: dict[str, Any], prefix: str, src: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: '{prefix or 'top level'}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    _check_keys_are_strings(raw, prefix, src)
    raw = _apply_aliases(raw, prefix, src)
    unknown = sorted(set(raw) - names)
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(f"{src}: unknown key '{key}' (valid here: {', '.join(sorted(names))})")
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        tp = hints[name]
        where = f"{src}: {prefix}{name}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.", src)
        else:
            kwargs[name] = _coerce(value, tp, where)
    return cls(**kwargs)


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any, src: str) -> None:
    dotted = ALIASES.get(dotted, dotted)  # an override of an alias replaces the file's value
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{src}: '{dotted}' goes through non-mapping '{part}'")
        node = child
    for alias, canonical in ALIASES.items():  # the file may have used the other name
        if canonical == dotted:
            node.pop(alias.rsplit(".", 1)[-1], None)
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`["optim.lr=0.05", "eval.val_targets=[lfw]"]` -> `[(dotted key, YAML-parsed value)]`.

    Raises:
        ConfigError: an override without `=`, or a value that is not valid YAML.
    """
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: override '{item}' is not of the form key=value")
        key, text = item.split("=", 1)
        value = safe_load_yaml(text, f"command line: '{item}'") if text != "" else ""
        out.append((key.strip(), value))
    return out


def load_config(path: str | None, overrides: Sequence[str] = ()) -> Config:
    """Loads a YAML experiment file, applies dotted `key=value` overrides, validates.

    Args:
        path: YAML file (None: defaults only).
        overrides: e.g. `["optim.lr=0.05", "data.batch_size=64"]`; values are parsed as YAML.

    Returns:
        A frozen, validated `Config`.

    Raises:
        ConfigError: missing file, YAML syntax error, unknown key, wrong type or bad value; the
            message names the file (or "command line") and the dotted field.
    """
    src = path or "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: config file not found")
        with open(path) as f:
            raw = safe_load_yaml(f, path) or {}
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(raw, key, value, "command line")
    if overrides:
        src = f"{src} + command line"
    _apply_compat(raw, src)
    cfg: Config = _build(Config, raw, "", src)
    validate(cfg, src)
    return cfg


def _apply_compat(raw: dict[str, Any], src: str) -> None:
    """Fills the fields of the `compat` preset that `raw` (file + overrides) leaves unset."""
    name = raw.get("compat", "") if isinstance(raw, dict) else ""
    if name in ("", None):
        return
    if not isinstance(name, str) or name not in COMPAT_PRESETS:
        raise ConfigError(f"{src}: compat: must be one of {['', *COMPAT_PRESETS]}, got {name!r}")
    for dotted, value in COMPAT_PRESETS[name].items():
        section, key = dotted.split(".")
        node = raw.setdefault(section, {})
        if isinstance(node, dict) and key not in node:
            node[key] = value


def validate(cfg: Config, src: str = "<config>") -> None:
    """Cross-field checks. Raises ConfigError naming `src` and the field."""

    def bad(field_name: str, why: str) -> ConfigError:
        return ConfigError(f"{src}: {field_name}: {why}")

    for dotted, choices in _CHOICES.items():
        section, name = dotted.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise bad(dotted, f"must be one of {list(choices)}, got {value!r}")
    positive = {
        "model.embedding_size": cfg.model.embedding_size,
        "data.batch_size": cfg.data.batch_size,
        "data.num_classes": cfg.data.num_classes,
        "optim.gradient_acc": cfg.optim.gradient_acc,
        "optim.lr": cfg.optim.lr,
        "logging.frequent": cfg.logging.frequent,
        "eval.verbose": cfg.eval.verbose,
        "eval.batch_size": cfg.eval.batch_size,
        "checkpoint.keep_last": cfg.checkpoint.keep_last,
        "optim.backbone_lr_scale": cfg.optim.backbone_lr_scale,
        "engine.timeout_s": cfg.engine.timeout_s,
        "engine.max_bad_steps": cfg.engine.max_bad_steps,
    }
    for name, value in positive.items():
        if value <= 0:
            raise bad(name, f"must be > 0, got {value}")
    if not 0.0 < cfg.head.sample_rate <= 1.0:
        raise bad("head.sample_rate", f"must be in (0, 1], got {cfg.head.sample_rate}")
    if len(cfg.head.margin_list) != 3:
        raise bad("head.margin_list", f"must be [m1, m2, m3], got {list(cfg.head.margin_list)}")
    if cfg.head.logits_dtype not in ("auto", "fp32", "tf32", "bf16"):
        raise bad(
            "head.logits_dtype", f"must be auto, fp32, tf32 or bf16, got {cfg.head.logits_dtype!r}"
        )
    if cfg.head.kernels not in ("auto", "compiled", "eager"):
        raise bad("head.kernels", f"must be auto, compiled or eager, got {cfg.head.kernels!r}")
    if len(cfg.optim.betas) != 2:
        raise bad("optim.betas", f"must be [beta1, beta2], got {list(cfg.optim.betas)}")
    if cfg.data.kind != "synthetic" and not cfg.data.rec:
        raise bad("data.rec", f"required for data.kind={cfg.data.kind}")
    if cfg.data.kind == "synthetic" and cfg.data.num_image <= 0:
        raise bad("data.num_image", "synthetic data needs num_image > 0")
    if cfg.schedule.num_epoch <= 0 and cfg.schedule.max_steps <= 0:
        raise bad("schedule.num_epoch", "one of num_epoch or max_steps must be > 0")
    if cfg.schedule.warmup_epoch < 0:
        raise bad("schedule.warmup_epoch", "must be >= 0")
    if cfg.checkpoint.every < 0:
        raise bad("checkpoint.every", "must be >= 0")
    if cfg.compat not in ("", *COMPAT_PRESETS):
        raise bad("compat", f"must be one of {['', *COMPAT_PRESETS]}, got {cfg.compat!r}")
    if cfg.optim.head_decay == "dense" and cfg.optim.optimizer != "sgd":
        raise bad(
            "optim.head_decay",
            "dense is SGD-only (AdamW's skipped steps have no closed form, heads/lazy_decay.py); "
            "set optim.head_decay=sampled",
        )
    if cfg.model.freeze_steps and not cfg.model.freeze_stages:
        raise bad("model.freeze_steps", "needs model.freeze_stages > 0 (what to freeze)")
    try:
        cfg.data.augment.check()
    except ValueError as e:
        raise ConfigError(f"{src}: data.augment.{e}") from None
    trackers = cfg.logging.trackers
    if not all(isinstance(t, str) and t for t in trackers) or len(set(trackers)) < len(trackers):
        raise bad("logging.trackers", f"must be distinct tracker names, got {list(trackers)}")
    if not isinstance(cfg.checkpoint.resume, (bool, str)):
        raise bad("checkpoint.resume", f"must be true/false or a path: {cfg.checkpoint.resume!r}")
    _check_numbers(cfg, bad)
    _check_model(cfg, bad)
    _check_loss(cfg, bad)


def _check_numbers(cfg: Config, bad: Any) -> None:
    """Values that pass the type check but would train nothing or garbage: NaN/inf anywhere, a
    non-positive scale or power, negative steps, clipping, momentum or decay, margins outside
    what `heads.margin.CombinedMarginLoss` computes."""
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(value):
            continue
        for f in dataclasses.fields(value):
            name, v = f"{section.name}.{f.name}", getattr(value, f.name)
            if f.name in ("margin_list", "betas") and not all(_is_number(x) for x in v):
                raise bad(name, f"must hold numbers, got {list(v)}")
            for x in v if isinstance(v, tuple) else (v,):
                if isinstance(x, float) and not math.isfinite(x):
                    raise bad(name, f"must be finite, got {x}")
    m1, m2, m3 = cfg.head.margin_list
    positive = {
        "head.scale": cfg.head.scale,
        "schedule.power": cfg.schedule.power,
        "optim.eps": cfg.optim.eps,
        "head.margin_list[0] (m1)": m1,
    }
    for name, value in positive.items():
        if value <= 0:
            raise bad(name, f"must be > 0, got {value}")
    non_negative = {
        "schedule.max_steps": cfg.schedule.max_steps,
        "schedule.num_epoch": cfg.schedule.num_epoch,
        "optim.clip_grad": cfg.optim.clip_grad,
        "optim.weight_decay": cfg.optim.weight_decay,
        "optim.head_warmup_steps": cfg.optim.head_warmup_steps,
        "model.freeze_stages": cfg.model.freeze_stages,
        "model.freeze_steps": cfg.model.freeze_steps,
        "head.margin_list[1] (m2, radians)": m2,
        "head.margin_list[2] (m3)": m3,
    }
    for name, value in non_negative.items():
        if value < 0:
            raise bad(name, f"must be >= 0, got {value}")
    if m2 >= math.pi:
        raise bad("head.margin_list[1] (m2, radians)", f"must be < pi, got {m2}")
    if m3 >= 1:
        raise bad("head.margin_list[2] (m3)", f"must be < 1 (a cosine margin), got {m3}")
    if not 0 <= cfg.optim.momentum < 1:
        raise bad("optim.momentum", f"must be in [0, 1), got {cfg.optim.momentum}")
    if not all(0 <= b < 1 for b in cfg.optim.betas):
        raise bad("optim.betas", f"must be in [0, 1), got {list(cfg.optim.betas)}")
    threshold = cfg.head.interclass_filtering_threshold
    if not 0 <= threshold < 1:
        raise bad("head.interclass_filtering_threshold", f"must be in [0, 1), got {threshold}")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_model(cfg: Config, bad: Any) -> None:
    """`model.network` must be registered and `model.kwargs` accepted by its builder, checked
    against the builder's signature (`models.model_kwargs`) without building the model."""
    import models  # torch: imported only when a config is validated

    if cfg.model.network not in models.list_models():
        raise bad(
            "model.network",
            f"unknown network {cfg.model.network!r}; valid: {', '.join(models.list_models())}",
        )
    accepted = set(models.model_kwargs(cfg.model.network)) - {"embedding_size"}
    for key in cfg.model.kwargs:
        if key == "embedding_size":
            raise bad("model.kwargs.embedding_size", "set model.embedding_size instead")
        if key not in accepted:
            raise bad(
                f"model.kwargs.{key}",
                f"network {cfg.model.network!r} does not accept {key!r}; accepted: "
                f"{', '.join(sorted(accepted)) or 'none'}",
            )


def _check_loss(cfg: Config, bad: Any) -> None:
    """`head.loss` must be registered, `head.loss_kwargs` accepted and in range (the margin is
    built once here, a few scalars); `margin_list` is read by `combined` only;
    `head.num_subcenters` an integer the head accepts."""
    from heads.losses import LOSSES  # torch: imported only when validating
    from heads.subcenter import check_num_subcenters

    h = cfg.head
    try:  # sub-centers compose with every loss (heads/subcenter.py)
        check_num_subcenters(h.num_subcenters)
    except ValueError as e:
        raise bad(
            "head.num_subcenters", str(e).removeprefix("heads/subcenter.py: num_subcenters ")
        ) from None
    if h.loss not in LOSSES:
        raise bad("head.loss", f"unknown loss {h.loss!r}; valid: {', '.join(LOSSES)}")
    if h.loss != "combined" and tuple(h.margin_list) != HeadConfig.margin_list:
        raise bad("head.margin_list", f"is read by head.loss=combined only, not {h.loss!r}")
    try:
        build_head_margin(cfg)
    except (ValueError, TypeError) as e:
        raise bad("head.loss_kwargs", str(e).removeprefix("heads/")) from None


def build_head_margin(cfg: Config) -> Any:
    """The head's margin loss (a `heads.margin.Margin`) for `cfg.head` and `cfg.seed`.

    Raises:
        ValueError / TypeError: as `heads.losses.build_margin` (unknown loss, bad kwargs).
    """
    from heads.losses import build_margin  # torch: imported only when needed

    h = cfg.head
    m1, m2, m3 = h.margin_list
    return build_margin(
        h.loss,
        h.scale,
        (m1, m2, m3),
        h.interclass_filtering_threshold,
        h.margin_gradient,
        h.clamping,
        cfg.seed,
        h.loss_kwargs,
    )


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML dumps and logs."""

    def conv(v: Any) -> Any:
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    out: dict[str, Any] = conv(dataclasses.asdict(cfg))
    return out


def save_config(cfg: Config, path: str, resolved: dict[str, Any] | None = None) -> None:
    """Writes the config, and the derived values as a trailing comment block, atomically."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if resolved:
        text += "# resolved:\n" + "".join(f"#   {k}: {v}\n" for k, v in resolved.items())
    write_text_atomic(path, text)


@dataclass(frozen=True)
class Resolved:
    """Values derived once from the config, the world size and the dataset; never written back.

    `global_batch` = batch_size * world_size * gradient_acc samples per optimizer step.
    """

    world_size: int
    num_image: int
    global_batch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def resolve(cfg: Config, world_size: int, num_image: int) -> Resolved:
    """Derives step counts as arcface_torch does (`num_image // global_batch` steps per epoch).

    Raises:
        ConfigError: when the dataset is smaller than one global batch.
    """
    global_batch = cfg.data.batch_size * world_size * cfg.optim.gradient_acc
    steps_per_epoch = num_image // global_batch
    if steps_per_epoch == 0 and cfg.schedule.max_steps <= 0:
        raise ConfigError(
            f"data.batch_size: global batch {global_batch} (batch_size {cfg.data.batch_size} x "
            f"world size {world_size} x gradient_acc {cfg.optim.gradient_acc}) exceeds the "
            f"{num_image} images of the dataset"
        )
    total = cfg.schedule.max_steps or steps_per_epoch * cfg.schedule.num_epoch
    warmup = min(total, steps_per_epoch * cfg.schedule.warmup_epoch)
    return Resolved(world_size, num_image, global_batch, max(steps_per_epoch, 1), total, warmup)
