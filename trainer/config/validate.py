"""Validation of a typed `Config`: choices, ranges and cross-field rules, one `ConfigError` each.

Loading (`trainer.config.load`) has already checked every value's type; what is left here is
what a type cannot say: a value out of its choices or range, fields that contradict each other,
a network, loss or sub-center count the model and head code would refuse. Every error is a
`ConfigError` reading `<src>: <dotted field>: <why>`; the checks run in a fixed order, so a
config with several mistakes always reports the same first one.

Imports point down only: the schema, and `trainer.config.factories` for `build_head_margin`
(the loss arguments are checked by building the margin exactly as the run will). Nothing here
reads YAML; `trainer.config.load` calls `validate` after building the `Config`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from trainer.config.factories import build_head_margin
from trainer.config.schema import COMPAT_PRESETS, COMPILE_ZERO3, Config, ConfigError, HeadConfig
from trainer.memory_format import CHOICES as MEMORY_FORMATS

# bad(dotted field, why) -> the ConfigError to raise, the source already in its message.
_Bad = Callable[[str, str], ConfigError]

_CHOICES = {
    "data.kind": ("rec", "folder", "synthetic"),
    "optim.optimizer": ("sgd", "adamw"),
    "optim.head_decay": ("sampled", "dense"),
    "engine.precision": ("", "fp32", "fp16", "bf16"),
    "engine.zero_stage": (-1, 0, 1, 2, 3),
    "engine.memory_format": MEMORY_FORMATS,
    "head.margin_gradient": ("exact", "arcface_torch"),
    "head.clamping": ("none", "arcface_torch"),
    "elastic.on_resize": ("keep_global_batch", "scale_lr", "none"),
}


def validate(cfg: Config, src: str = "<config>") -> None:
    """Cross-field checks. Raises ConfigError naming `src` and the field."""

    def bad(field_name: str, why: str) -> ConfigError:
        return ConfigError(f"{src}: {field_name}: {why}")

    _check_choices(cfg, bad)
    _check_positive(cfg, bad)
    _check_head_and_optim_forms(cfg, bad)
    _check_data_and_schedule(cfg, bad)
    _check_switches(cfg, bad)
    _check_augment(cfg, src)
    _check_logging_and_resume(cfg, bad)
    _check_preemption(cfg, bad)
    _check_numbers(cfg, bad)
    _check_model(cfg, bad)
    _check_loss(cfg, bad)


def _check_choices(cfg: Config, bad: _Bad) -> None:
    """Fields with a fixed set of values (`_CHOICES`)."""
    for dotted, choices in _CHOICES.items():
        section, name = dotted.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise bad(dotted, f"must be one of {list(choices)}, got {value!r}")


def _check_positive(cfg: Config, bad: _Bad) -> None:
    """Sizes, counts, intervals and rates that must be > 0."""
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
    if cfg.data.batch_size < 2:  # BatchNorm in training needs 2 samples per rank
        raise bad("data.batch_size", "must be >= 2: every backbone has BatchNorm layers")


def _check_head_and_optim_forms(cfg: Config, bad: _Bad) -> None:
    """The head's sample rate, margin list length and modes; the length of `optim.betas`."""
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


def _check_data_and_schedule(cfg: Config, bad: _Bad) -> None:
    """Where the data comes from, and how long the run is and checkpoints."""
    if cfg.data.kind != "synthetic" and not cfg.data.rec:
        raise bad("data.rec", f"required for data.kind={cfg.data.kind}")
    if cfg.data.kind == "synthetic" and cfg.data.num_image <= 0:
        raise bad("data.num_image", "synthetic data needs num_image > 0")
    workers = cfg.data.num_workers
    if workers != "auto" and (type(workers) is not int or workers < 0):  # bool is not int here
        raise bad("data.num_workers", f"must be an integer >= 0 or auto, got {workers!r}")
    if cfg.schedule.num_epoch <= 0 and cfg.schedule.max_steps <= 0:
        raise bad("schedule.num_epoch", "one of num_epoch or max_steps must be > 0")
    if cfg.schedule.warmup_epoch < 0:
        raise bad("schedule.warmup_epoch", "must be >= 0")
    if cfg.checkpoint.every < 0:
        raise bad("checkpoint.every", "must be >= 0")


def _check_switches(cfg: Config, bad: _Bad) -> None:
    """The `compat` preset's name and switches that need another field set."""
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
    if cfg.engine.compile and cfg.engine.zero_stage == 3:
        raise bad("engine.compile", COMPILE_ZERO3)


def _check_augment(cfg: Config, src: str) -> None:
    """`data.augment` by its own check; its messages start with the augment field's name."""
    try:
        cfg.data.augment.check()
    except ValueError as e:
        raise ConfigError(f"{src}: data.augment.{e}") from None


def _check_logging_and_resume(cfg: Config, bad: _Bad) -> None:
    """Tracker names (distinct, non-empty) and the type of `checkpoint.resume`."""
    trackers = cfg.logging.trackers
    if not all(isinstance(t, str) and t for t in trackers) or len(set(trackers)) < len(trackers):
        raise bad("logging.trackers", f"must be distinct tracker names, got {list(trackers)}")
    _check_tracker_settings(cfg, bad)
    if not isinstance(cfg.checkpoint.resume, (bool, str)):
        raise bad("checkpoint.resume", f"must be true/false or a path: {cfg.checkpoint.resume!r}")


def _check_preemption(cfg: Config, bad: _Bad) -> None:
    """Signal names the trainer can catch (trainer/signals.py), a check interval >= 1."""
    from trainer.signals import signal_number

    for name in cfg.preemption.signals:
        try:
            signal_number(name)
        except ValueError as e:
            raise bad("preemption.signals", str(e)) from None
    if cfg.preemption.sync_every < 1:
        raise bad("preemption.sync_every", f"must be >= 1, got {cfg.preemption.sync_every}")


def _check_tracker_settings(cfg: Config, bad: _Bad) -> None:
    """`logging.project` named, `tags` strings, `init_kwargs` keyed by a tracker of the run."""
    log = cfg.logging
    if not log.project.strip():
        raise bad("logging.project", "must be a non-empty name")
    if not all(isinstance(t, str) and t for t in log.tags):
        raise bad("logging.tags", f"must be non-empty strings, got {list(log.tags)}")
    for name, kwargs in log.init_kwargs.items():
        if name not in log.trackers:
            raise bad(
                f"logging.init_kwargs.{name}",
                f"not a tracker of logging.trackers {list(log.trackers)}",
            )
        if not isinstance(kwargs, dict):
            raise bad(f"logging.init_kwargs.{name}", f"must be a mapping, got {kwargs!r}")


def _check_numbers(cfg: Config, bad: _Bad) -> None:
    """Values that pass the type check but would train nothing or garbage: NaN/inf anywhere, a
    non-positive scale or power, negative steps, clipping, momentum or decay, margins outside
    what `heads.CombinedMarginLoss` computes."""
    _check_finite(cfg, bad)
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
    if cfg.data.batch_size < 2:  # BatchNorm in training needs 2 samples per rank
        raise bad("data.batch_size", "must be >= 2: every backbone has BatchNorm layers")
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
    _check_bounded(cfg, bad)


def _check_finite(cfg: Config, bad: _Bad) -> None:
    """Number lists hold numbers; no float field (or list element) is NaN or infinite."""
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


def _check_bounded(cfg: Config, bad: _Bad) -> None:
    """Upper bounds: margins m2 < pi and m3 < 1; momentum, betas and the filter below 1."""
    _, m2, m3 = cfg.head.margin_list
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


def _check_model(cfg: Config, bad: _Bad) -> None:
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


def _check_loss(cfg: Config, bad: _Bad) -> None:
    """`head.loss` must be registered, `head.loss_kwargs` accepted and in range (the margin is
    built once here, a few scalars); `margin_list` is read by `combined` only;
    `head.num_subcenters` an integer the head accepts.

    The head's own message follows the field name whole (`head.num_subcenters: <message>`):
    nothing is cut from it, so it reads the same whatever prefix the head code puts on it.
    """
    from heads import LOSSES  # torch: imported only when validating
    from heads.subcenter import check_num_subcenters

    h = cfg.head
    try:  # sub-centers compose with every loss (heads/subcenter.py)
        check_num_subcenters(h.num_subcenters)
    except ValueError as e:
        raise bad("head.num_subcenters", str(e)) from None
    if h.loss not in LOSSES:
        raise bad("head.loss", f"unknown loss {h.loss!r}; valid: {', '.join(LOSSES)}")
    if h.loss != "combined" and tuple(h.margin_list) != HeadConfig.margin_list:
        raise bad("head.margin_list", f"is read by head.loss=combined only, not {h.loss!r}")
    try:
        build_head_margin(cfg)
    except (ValueError, TypeError) as e:
        raise bad("head.loss_kwargs", str(e)) from None
