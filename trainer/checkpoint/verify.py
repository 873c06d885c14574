"""Checks of a checkpoint before resume touches anything: meta.json as a schema (types, ranges,
the files it implies), meta.json against the run's config, and every tensor a resume copies
against the live tensor it lands in (shape and dtype), so a wrong file is one line naming the
file and tensor instead of a silent broadcast (`copy_` of a (3, 3) tensor into (8, 3, 3, 3)
fills it) or a traceback."""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch

from heads.checkpoint import check_tensor as check_head_tensor
from models.weights import MAX_EMBEDDING, STEP_RE, load_error
from trainer.config import Config, ConfigError

if TYPE_CHECKING:
    from deepspeed.runtime.engine import DeepSpeedEngine

# Bounds of meta.json's integers: no run has more steps than JSON integers stay exact, and 2^20
# ranks or 2^31 classes is far past any run (with `MAX_EMBEDDING`, a bound keeps a hostile file
# from sizing an allocation).
MAX_STEP = 2**53
MAX_WORLD = 2**20
MAX_CLASSES = 2**31
_RANK_RE = re.compile(r"zero_pp_rank_(\d+)_")


def _int_field(meta: Mapping[str, Any], key: str, where: str, lo: int, hi: int) -> int:
    value = meta.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{where}: '{key}' must be an integer, got {_short(value)}")
    if not lo <= value <= hi:
        raise ConfigError(f"{where}: '{key}' = {value} is outside [{lo}, {hi}]")
    return value


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def validate_meta(meta: Any, folder: str) -> dict[str, Any]:
    """Checks a checkpoint's parsed meta.json as a schema and against the files in `folder`.

    Required: `step` (int in [0, 2^53], equal to N of a `step_<N>` folder), `epoch` (int >= 0),
    `world_size` (int in [1, 2^20]; one `rng_rank<r>.pt` and one ZeRO optimizer file per rank),
    `loader` ({"epoch": int >= 0, "offset": int >= 0}). Optional, typed when present: `network`
    (str), `embedding_size` (int in [1, 2^16]), `num_classes` (int in [1, 2^31]),
    `num_subcenters` (int >= 1), `model_kwargs` (an object).

    Raises:
        ConfigError: one line naming meta.json and the field.
    """
    where = os.path.join(folder, "meta.json")
    if not isinstance(meta, dict):
        raise ConfigError(f"{where}: not a checkpoint meta.json (a JSON object expected)")
    step = _int_field(meta, "step", where, 0, MAX_STEP)
    named = STEP_RE.match(os.path.basename(os.path.normpath(folder)))
    if named and int(named.group(1)) != step:
        raise ConfigError(f"{where}: 'step' = {step} but the folder is step_{named.group(1)}")
    _int_field(meta, "epoch", where, 0, MAX_STEP)
    world = _int_field(meta, "world_size", where, 1, MAX_WORLD)
    loader = meta.get("loader")
    if not isinstance(loader, dict):
        raise ConfigError(
            f'{where}: \'loader\' (the data position: {{"epoch", "offset"}}) must be an '
            f"object, got {_short(loader)}"
        )
    _int_field(loader, "epoch", f"{where}: loader", 0, MAX_STEP)
    _int_field(loader, "offset", f"{where}: loader", 0, MAX_STEP)
    bounds = {"embedding_size": MAX_EMBEDDING, "num_classes": MAX_CLASSES, "num_subcenters": 2**10}
    for key, hi in bounds.items():
        if key in meta:
            _int_field(meta, key, where, 1, hi)
    if "network" in meta and not isinstance(meta["network"], str):
        raise ConfigError(f"{where}: 'network' must be a string, got {_short(meta['network'])}")
    if not isinstance(meta.get("model_kwargs", {}), dict):
        raise ConfigError(f"{where}: 'model_kwargs' must be an object")
    _check_files(folder, where, world)
    return meta


def _check_files(folder: str, where: str, world: int) -> None:
    """The files a checkpoint of `world` ranks holds: backbone.pt, head/, one rng file and one
    engine optimizer file per rank (a meta.json that lies about the world size would make the
    resume take the wrong path, e.g. drop the optimizer state)."""
    for name in ("backbone.pt", "head"):
        if not os.path.exists(os.path.join(folder, name)):
            raise ConfigError(f"{where}: the checkpoint has no {name}")
    rngs = glob.glob(os.path.join(glob.escape(folder), "rng_rank*.pt"))
    if rngs and len(rngs) != world:
        raise ConfigError(
            f"{where}: 'world_size' = {world} but the folder holds {len(rngs)} rng_rank<r>.pt "
            "files (one per rank)"
        )
    optim = glob.glob(os.path.join(glob.escape(folder), "engine", "engine", "*optim_states.pt"))
    if optim and len(optim) != world:
        raise ConfigError(
            f"{where}: 'world_size' = {world} but engine/engine holds {len(optim)} ZeRO "
            "optimizer files (one per rank)"
        )


def check_meta_fits(meta: Mapping[str, Any], cfg: Config, folder: str) -> None:
    """meta.json's model and head sizes equal the run's config (a resume cannot change them).

    Raises:
        ConfigError: `network`, `embedding_size`, `num_classes` or `num_subcenters` differ
            (only the fields meta.json records are compared).
    """
    where = os.path.join(folder, "meta.json")
    now = {
        "network": ("model.network", cfg.model.network),
        "embedding_size": ("model.embedding_size", cfg.model.embedding_size),
        "num_classes": ("data.num_classes", cfg.data.num_classes),
        "num_subcenters": ("head.num_subcenters", cfg.head.num_subcenters),
    }
    for key, (field, value) in now.items():
        if key in meta and meta[key] != value:
            raise ConfigError(
                f"{where}: the checkpoint has {key}={_short(meta[key])} but {field} is "
                f"{value!r}; a resume keeps the model and head sizes (start a new run, or use "
                "model.pretrained for the backbone)"
            )


def check_tensor(file: str, name: str, saved: object, shape: Any, dtype: torch.dtype) -> None:
    """`saved` is a tensor of `shape` and `dtype` (`heads.checkpoint.check_tensor`); else
    ConfigError naming `file` and `name`."""
    try:
        check_head_tensor(file, name, saved, shape, dtype, owner="the run's tensor")
    except ValueError as err:
        raise ConfigError(f"{err} (a checkpoint of another model or head size)") from None


def _pairs(saved: Any, live: Any, where: str) -> Iterator[tuple[str, Any, torch.Tensor]]:
    """(path, saved value, live tensor) for every live tensor reached in both structures."""
    if isinstance(live, torch.Tensor):
        yield where, saved, live
    elif isinstance(live, Mapping) and isinstance(saved, Mapping):
        for key, value in live.items():
            if key in saved:
                yield from _pairs(saved[key], value, f"{where}.{key}" if where else str(key))
    elif isinstance(live, list | tuple) and isinstance(saved, list | tuple):
        if len(saved) != len(live):
            raise ConfigError(f"'{where}' has {len(saved)} entries, the run's {len(live)}")
        for i, (s, v) in enumerate(zip(saved, live)):
            yield from _pairs(s, v, f"{where}[{i}]")


def _rank_files(engine_dir: str, kind: str, rank: int) -> list[str]:
    """This rank's `*<kind>.pt` engine files (a file without `zero_pp_rank_<r>_` is everyone's)."""
    found = []
    for path in sorted(glob.glob(os.path.join(glob.escape(engine_dir), f"*{kind}.pt"))):
        m = _RANK_RE.search(os.path.basename(path))
        if m is None or int(m.group(1)) == rank:
            found.append(path)
    return found


def _partition_state(file: str, saved: Mapping[str, Any], live: Mapping[str, Any]) -> None:
    """Per-parameter optimizer state (momentum, Adam moments) has its group's fp32 partition's
    shape: it is created at the first step, so a fresh engine has none to compare with."""
    parts = live.get("single_partition_of_fp32_groups", live.get("fp32_flat_groups"))
    base = saved.get("base_optimizer_state", saved.get("optimizer_state_dict"))
    if not isinstance(parts, list) or not isinstance(base, Mapping):
        return
    state = base.get("state")
    for group, entries in (state or {}).items() if isinstance(state, Mapping) else ():
        if not isinstance(group, int) or not 0 <= group < len(parts):
            raise ConfigError(
                f"{file}: optimizer state of group {group!r}, the run has {len(parts)}"
            )
        for key, value in (entries or {}).items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                check_tensor(file, f"state[{group}].{key}", value, parts[group].shape,
                             parts[group].dtype)  # fmt: skip


def check_engine_files(
    engine_dir: str, engine: DeepSpeedEngine, rank: int, safe: Callable[[], Any]
) -> None:
    """Every tensor of this rank's DeepSpeed model and ZeRO optimizer files in `engine_dir`
    against the live engine's (module state dict, `param_shapes`, fp32 partitions, optimizer
    state), read memory-mapped within `safe()` (`store.weights_only_loads`: no code runs)
    before DeepSpeed loads them.

    Raises:
        ConfigError: a missing file or a tensor of another shape or dtype (file and tensor named).
    """
    models = _rank_files(engine_dir, "model_states", rank)
    if not models:
        raise ConfigError(f"{engine_dir}: no DeepSpeed model states file for rank {rank}")
    params = dict(engine.module.named_parameters())
    shapes = {n: getattr(p, "ds_shape", p.shape) for n, p in params.items()}
    # ZeRO-3 saves its partitioned parameters as empty tensors (their values are in the
    # optimizer files): those are checked through `param_shapes` and the partitions instead.
    live_module = {
        n: t
        for n, t in engine.module.state_dict().items()
        if not hasattr(params.get(n), "ds_shape")
    }
    for path in models:
        saved = _load(path, safe)
        for name, value, tensor in _pairs(saved.get("module"), live_module, ""):
            check_tensor(path, name, value, tensor.shape, tensor.dtype)
        for group in saved.get("param_shapes") or []:
            for name, shape in group.items() if isinstance(group, Mapping) else ():
                if name in shapes and tuple(shape) != tuple(shapes[name]):
                    raise ConfigError(
                        f"{path}: param_shapes '{name}' is {tuple(shape)}, the run's "
                        f"{tuple(shapes[name])}"
                    )
    optimizer = getattr(engine, "optimizer", None)
    if optimizer is None or not hasattr(optimizer, "state_dict"):
        return
    live = optimizer.state_dict()
    for path in _rank_files(engine_dir, "optim_states", rank):
        opt = _load(path, safe).get("optimizer_state_dict")
        if not isinstance(opt, Mapping):
            raise ConfigError(f"{path}: no optimizer_state_dict")
        try:
            for name, value, tensor in _pairs(opt, live, ""):
                check_tensor(path, name, value, tensor.shape, tensor.dtype)
        except ConfigError as e:
            raise ConfigError(str(e) if str(e).startswith(path) else f"{path}: {e}") from None
        _partition_state(path, opt, live)


def _load(path: str, safe: Callable[[], Any]) -> dict[str, Any]:
    with safe():
        try:
            state = torch.load(path, map_location="cpu", mmap=True)
        except ConfigError:
            raise
        except Exception as e:  # torch raises several types for unreadable files
            raise ConfigError(load_error(path, e)) from None
    if not isinstance(state, dict):
        raise ConfigError(f"{path}: not a DeepSpeed checkpoint file (a dict expected)")
    return state
