"""Look before you launch: the fully resolved configuration of a run, without a process group.

`python -m trainer.train CONFIG [k=v ...] --print-config` prints what the run would use: the
config with `compat` presets applied and aliases resolved, the engine settings (with who chose
each), the DeepSpeed JSON after its "auto" fields are filled, the per-rank and global batch,
the step counts and the LR schedule. `--dry-run` adds the backbone and head built on the meta
device (parameter counts) and the memory plan (`trainer.memory_plan.plan`). `--diff OTHER` and
`tools/diff_configs.py A B` list what two runs' resolved configurations differ in.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from trainer.config import Config, ConfigError, load_config, resolve, to_dict


def _num_image(cfg: Config) -> tuple[int, str]:
    """Images of the training set: `data.num_image` when set, else the dataset's length."""
    if cfg.data.num_image > 0:
        return cfg.data.num_image, "data.num_image"
    from trainer.data_setup import build_dataset

    return len(build_dataset(cfg)), f"{cfg.data.kind} dataset {cfg.data.rec}"


def _schedule(cfg: Config, world: int) -> dict[str, Any]:
    """Batch sizes, step counts and learning rates at the schedule's landmarks."""
    from trainer.lr import poly_lr

    batch = {
        "per_rank": cfg.data.batch_size,
        "gradient_acc": cfg.optim.gradient_acc,
        "world_size": world,
        "global": cfg.data.batch_size * cfg.optim.gradient_acc * world,
    }
    try:
        num_image, source = _num_image(cfg)
        res = resolve(cfg, world, num_image)
    except ConfigError as e:  # the data is not here (yet): say so, print the rest
        return {"batch": batch, "steps": f"unknown ({e})"}
    total, warm = res.total_steps, res.warmup_steps
    landmarks = sorted({0, warm, total // 2, max(total - 1, 0)})

    def lr_at(step: int) -> float:
        return poly_lr(step, cfg.optim.lr, total, warm, cfg.schedule.power)

    return {
        "batch": batch,
        "steps": {
            "num_image": num_image,
            "num_image_from": source,
            "steps_per_epoch": res.steps_per_epoch,
            "total_steps": total,
            "warmup_steps": warm,
        },
        "lr_schedule": {
            "kind": f"linear warmup then polynomial decay, power {cfg.schedule.power} "
            "(trainer/lr.py poly_lr)",
            "base_lr": cfg.optim.lr,
            "backbone_lr_scale": cfg.optim.backbone_lr_scale,
            "lr_at_step": {step: round(lr_at(step), 8) for step in landmarks},
        },
    }


def resolved_config(
    path: str | None,
    overrides: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    world_size: int | None = None,
) -> dict[str, Any]:
    """Everything a run of `path` + `overrides` would use, as plain data (no process group).

    Args:
        path, overrides: as `load_config`.
        env: the launcher's variables (default `os.environ`: `WORLD_SIZE`, `ACCELERATE_*`).
        world_size: ranks of the run (default `WORLD_SIZE`, else 1).

    Returns:
        {"config", "engine", "ds_config", "batch", "steps", "lr_schedule"}.

    Raises:
        ConfigError: as `load_config`, `resolve_engine_settings` and `build_ds_config`.
    """
    from trainer.engine import build_ds_config, resolve_engine_settings

    env = os.environ if env is None else env
    world = world_size or int(env.get("WORLD_SIZE", "1"))
    cfg = load_config(path, overrides)
    src = path or "experiment config"
    settings = resolve_engine_settings(cfg, env, src)
    ds = build_ds_config(cfg, settings, src)
    engine = {k: v for k, v in settings.__dict__.items() if v != ""}
    return {"config": to_dict(cfg), "engine": engine, "ds_config": ds, **_schedule(cfg, world)}


def dry_run(cfg: Config, resolved: dict[str, Any]) -> dict[str, Any]:
    """The backbone and rank 0's head shard built on the meta device (no memory, no data) and
    the memory plan of `trainer.memory_plan.plan` for this run.

    Returns:
        {"backbone_params", "head": {...}, "memory_plan_gib": {...}}.
    """
    import torch

    import models
    from heads import PartialFC
    from heads.comm import shard_range
    from trainer.memory_plan import GIB, plan

    world = resolved["batch"]["world_size"]
    _, local = shard_range(cfg.data.num_classes, 0, world)
    with torch.device("meta"):
        net = models.create(
            cfg.model.network, embedding_size=cfg.model.embedding_size, **cfg.model.kwargs
        )
        # rank 0's shard of the head: its rows are classes [0, local) of the full head
        head = PartialFC(
            cfg.model.embedding_size, local, cfg.head.sample_rate,
            num_subcenters=cfg.head.num_subcenters,
        )  # fmt: skip
    engine = resolved["engine"]
    memory = plan(
        cfg.model.network, cfg.model.embedding_size, cfg.data.num_classes, cfg.head.sample_rate,
        cfg.data.batch_size, world, engine["zero_stage"], engine["precision"],
        cfg.optim.optimizer, cfg.engine.offload, cfg.model.grad_checkpointing, None,
        cfg.model.kwargs, num_subcenters=cfg.head.num_subcenters,
    )  # fmt: skip
    return {
        "backbone_params": sum(p.numel() for p in net.parameters()),
        "head": {
            "params_total": cfg.data.num_classes
            * cfg.head.num_subcenters
            * cfg.model.embedding_size,
            "rows_per_rank": head.weight.shape[0],
            "params_per_rank": head.weight.numel(),
            "sampled_per_rank": memory["sampled_per_rank"],
        },
        "memory_plan_gib": {
            "device_peak": round(memory["device_total"] / GIB, 3),
            "host": round(memory["host_total"] / GIB, 3),
            "device_items": {k: round(v / GIB, 3) for k, v in memory["device"].items()},
        },
    }


def resolved_from_run(folder: str) -> dict[str, Any]:
    """What a finished or running run used: `<folder>/config.yaml` and `ds_config.json`.

    Raises:
        ConfigError: the folder holds no `config.yaml`.
    """
    path = os.path.join(folder, "config.yaml")
    if not os.path.isfile(path):
        raise ConfigError(f"{folder}: no config.yaml (not a run folder)")
    out: dict[str, Any] = {"config": to_dict(load_config(path))}
    ds_path = os.path.join(folder, "ds_config.json")
    if os.path.isfile(ds_path):
        with open(ds_path) as f:
            out["ds_config"] = json.load(f)
    return out


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": leaf}; lists stay leaves."""
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{key}."))
    return out


def diff_resolved(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """One line per dotted key whose value differs, `key: A -> B` (`<unset>` where absent),
    sorted; sections present on one side only (e.g. no ds_config.json) are skipped."""
    shared = set(a) & set(b)
    fa = flatten({k: a[k] for k in shared})
    fb = flatten({k: b[k] for k in shared})
    lines = []
    for key in sorted(set(fa) | set(fb)):
        va, vb = fa.get(key, "<unset>"), fb.get(key, "<unset>")
        if va != vb:
            lines.append(f"{key}: {va!r} -> {vb!r}")
    return lines


def resolved_of(target: str, overrides: Sequence[str] = (), world_size: int | None = None) -> Any:
    """A run folder's (`resolved_from_run`) or a config file's (`resolved_config`) resolution."""
    if os.path.isdir(target):
        return resolved_from_run(target)
    return resolved_config(target, overrides, world_size=world_size)


def inspect_main(
    config: str,
    overrides: Sequence[str],
    dry: bool = False,
    other: str | None = None,
    world_size: int | None = None,
) -> int:
    """`trainer.train --print-config / --dry-run / --diff OTHER`: prints (rank 0 of a launch
    only) and returns the exit code: 0, or 2 with one `arcscale: config error:` line."""
    import sys

    import yaml

    try:
        resolved = resolved_config(config, overrides, world_size=world_size)
        if dry:
            resolved["dry_run"] = dry_run(load_config(config, overrides), resolved)
        lines = diff_resolved(resolved, resolved_of(other, (), world_size)) if other else []
    except (ConfigError, ValueError) as e:
        print(f"arcscale: config error: {e}", file=sys.stderr, flush=True)
        return 2
    if os.environ.get("RANK", "0") != "0":
        return 0
    if other:
        print(f"# {config} {' '.join(overrides)} -> {other}: {len(lines)} differences")
        print("\n".join(lines))
    else:
        print(yaml.safe_dump(resolved, sort_keys=False, width=100), end="", flush=True)
    return 0
