"""Writing and reading one checkpoint: engine state, head shards, RNG states, the consolidated
fp32 `backbone.pt` and meta.json, written as `step_<N>.tmp` and renamed when complete; every
`torch.load` of a resume runs with `weights_only=True` and an allow-list of DeepSpeed's types."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import shutil
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NotRequired, TypedDict

import numpy as np
import torch
import torch.distributed as dist

from data.atomic import write_text_atomic
from heads import HeadOptimizer, PartialFC, load_head, save_head
from models.weights import checkpoint_root
from trainer.config import ConfigError

if TYPE_CHECKING:
    from deepspeed.runtime.engine import DeepSpeedEngine

from trainer.checkpoint.layout import Log, prune_checkpoints

# A checkpoint's meta.json (JSON: written by `Checkpointer.meta`, checked by `load_meta`).
Meta = dict[str, Any]


class RngState(TypedDict):
    """`rng_state()`: Python's, numpy's legacy (MT19937) and torch's generators."""

    python: tuple[Any, ...]  # random.getstate()
    numpy: tuple[str, torch.Tensor, int, int, float]  # keys as int64: weights_only loads them
    torch: torch.Tensor
    cuda: NotRequired[torch.Tensor]


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rng_state() -> RngState:
    """Python/numpy/torch(/CUDA) RNG states as tensors and plain Python values only, so the file
    loads with `torch.load(weights_only=True)` (no pickled numpy objects, no code)."""
    legacy = np.random.get_state()
    if not isinstance(legacy, tuple):  # numpy's global generator is always MT19937
        raise RuntimeError(f"numpy's global RNG is not MT19937: {legacy.get('bit_generator')}")
    kind, keys, pos, has_gauss, gauss = legacy
    state: RngState = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: RngState) -> None:
    """Inverse of `rng_state`."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# What DeepSpeed 0.19 pickles besides tensors in its ZeRO optimizer files (fp32/fp16/bf16, ZeRO
# 1-3): the loss scaler, the stage enum and fragment addresses. Nothing else may be unpickled.
def _engine_safe_globals() -> list[Callable[..., Any] | tuple[Callable[..., Any], str]]:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _refused(path: object, error: Exception) -> ConfigError:
    first = (str(error).strip().splitlines() or [""])[0]
    detail = next((ln.strip() for ln in str(error).splitlines() if "GLOBAL" in ln), first)
    return ConfigError(
        f"{path}: refused to load: it holds objects other than tensors and the few DeepSpeed "
        f"types a checkpoint needs, possibly code ({detail[:200]})"
    )


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Within the block every `torch.load` (DeepSpeed's `weights_only=False` ones included) runs
    with `weights_only=True` and only `_engine_safe_globals()` allowed, so a checkpoint file
    carrying a pickled payload raises `pickle.UnpicklingError` instead of running it."""
    original = torch.load

    def load(f: Any, *args: Any, **kwargs: Any) -> Any:  # torch.load's arguments, passed on
        kwargs["weights_only"] = True
        try:
            return original(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            raise _refused(f, e) from None

    torch.load = load
    try:
        with torch.serialization.safe_globals(_engine_safe_globals()):
            yield
    finally:
        torch.load = original


def save_checkpoint(
    output: str,
    step: int,
    engine: DeepSpeedEngine,
    head: PartialFC,
    head_opt: HeadOptimizer,
    meta: Meta,
    rank: int,
    keep_last: int,
    log: Log = print,
) -> str:
    """Writes `checkpoints/step_<step>/` atomically; every rank must call it.

    Args:
        output: run directory.
        step: optimizer steps done.
        engine: the DeepSpeed engine of the backbone.
        head, head_opt: the Partial FC head and its optimizer (each rank saves its rows).
        meta: JSON-serializable run state written by rank 0 (epoch, loader position, ...).
        rank: this process's rank.
        keep_last: complete checkpoints to keep (older ones removed).

    Returns:
        The final checkpoint directory.
    """
    t0 = time.time()
    root = checkpoint_root(output)
    final = os.path.join(root, f"step_{step}")
    tmp = final + ".tmp"
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    engine.save_checkpoint(os.path.join(tmp, "engine"), tag="engine")
    save_head(tmp, head, head_opt)
    torch.save(rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
    _barrier()
    if rank == 0:
        state_dict = consolidate_backbone(os.path.join(tmp, "engine"), engine.module)
        torch.save(state_dict, os.path.join(tmp, "backbone.pt"))
        write_text_atomic(os.path.join(tmp, "meta.json"), json.dumps(meta, indent=1))
        if os.path.isdir(final):
            if not os.path.isfile(os.path.join(final, "meta.json")):
                raise RuntimeError(
                    f"{final} exists and is not an arcscale checkpoint: not replaced"
                )
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_text_atomic(os.path.join(root, "latest"), f"step_{step}\n")
        prune_checkpoints(root, keep_last, keep=final)
        log(f"[checkpoint] saved {final} in {time.time() - t0:.1f}s")
    _barrier()
    return final


def consolidate_backbone(engine_dir: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """fp32 backbone state dict from a saved engine checkpoint (DeepSpeed's zero_to_fp32).

    Works for ZeRO 1/2/3: the fp32 master weights come from the optimizer partitions of all ranks.
    Under ZeRO 1/2 zero_to_fp32 leaves out frozen parameters (e.g. IResNet's `features.weight`,
    fixed at 1); they are replicated and never updated, so they are taken from `module`.
    Keys and order follow `module.state_dict()` (insightface names for IResNet).
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(engine_dir, tag="engine")
    out: dict[str, torch.Tensor] = {}
    for key, value in module.state_dict().items():
        value = state.get(key, value).detach().cpu()
        out[key] = value.float() if value.is_floating_point() else value
    return out


def load_meta(path: str) -> Meta:
    """Reads `meta.json` of a checkpoint directory.

    Raises:
        ConfigError: no `meta.json` (not a complete checkpoint), or one that is not a JSON object
            with integer `step`, `epoch` and `world_size` (the message names the file).
    """
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isfile(meta_path):
        raise ConfigError(f"checkpoint.resume: {path} is not a complete checkpoint (no meta.json)")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{meta_path}: not a checkpoint meta.json ({e})") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"{meta_path}: not a checkpoint meta.json (a JSON object expected)")
    for key in ("step", "epoch", "world_size"):
        if not isinstance(meta.get(key), int) or isinstance(meta.get(key), bool):
            raise ConfigError(f"{meta_path}: '{key}' must be an integer, got {meta.get(key)!r}")
    return meta


def load_checkpoint(
    path: str,
    engine: DeepSpeedEngine,
    head: PartialFC,
    head_opt: HeadOptimizer,
    rank: int,
    world_size: int,
    log: Log = print,
) -> Meta:
    """Restores engine, head rows and RNG from `path`; returns its meta dict.

    Same world size: the engine state (fp32 master weights, optimizer state, loss scale) is
    loaded exactly. Different world size: DeepSpeed cannot re-partition a ZeRO optimizer state,
    so the backbone restarts from the consolidated fp32 `backbone.pt` with fresh optimizer state
    (logged); the head is always re-sharded exactly (each rank reads its new class range).
    """
    meta = load_meta(path)
    saved_world = int(meta["world_size"])
    if saved_world == world_size:
        with weights_only_loads():
            engine.load_checkpoint(os.path.join(path, "engine"), tag="engine")
    else:
        if rank == 0:
            log(
                f"[checkpoint] world size {saved_world} -> {world_size}: backbone weights from "
                f"backbone.pt, backbone optimizer state restarts; head re-sharded exactly"
            )
        load_backbone_weights(engine, os.path.join(path, "backbone.pt"))
    load_head(path, head, head_opt)
    rng_file = os.path.join(path, f"rng_rank{rank}.pt")
    if saved_world == world_size and os.path.isfile(rng_file):
        try:
            set_rng_state(torch.load(rng_file, weights_only=True))
        except pickle.UnpicklingError as e:
            raise _refused(rng_file, e) from None
    return meta


def load_backbone_weights(engine: DeepSpeedEngine, path: str) -> None:
    """Copies an fp32 state dict into the engine's module and its fp32 master weights."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    module = engine.module
    import deepspeed

    params = dict(module.named_parameters())
    for name, tensor in module.named_buffers():
        if name in state:
            tensor.data.copy_(state[name].to(tensor.dtype))
    for name, param in params.items():
        if name not in state:
            raise KeyError(f"{path}: missing backbone parameter '{name}'")
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            param.data.copy_(state[name].to(param.dtype))
    # ZeRO 1/2 keep fp32 masters apart from the module: refresh them from the loaded weights.
    refresh = getattr(engine.optimizer, "refresh_fp32_params", None)
    if callable(refresh):
        refresh()
