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
from models.weights import checkpoint_root, load_error, refused_global
from trainer.config import ConfigError

if TYPE_CHECKING:
    from deepspeed.runtime.engine import DeepSpeedEngine

from trainer.checkpoint.layout import Log, prune_checkpoints
from trainer.checkpoint.verify import check_engine_files, check_tensor, validate_meta

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
    """One line naming the refused object (never torch's advice to load with weights_only=False)."""
    what = refused_global(error)
    return ConfigError(
        f"{path}: refused to load: it holds objects other than tensors and the few DeepSpeed "
        f"types a checkpoint needs, possibly code (Unsupported global: {what or 'unknown'})"
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
    """Reads `meta.json` of a checkpoint directory and checks it (`verify.validate_meta`: types,
    ranges, the files it implies) before anything is allocated from it.

    Raises:
        ConfigError: no `meta.json` (not a complete checkpoint), or one that fails the schema
            (the message names the file and the field).
    """
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isfile(meta_path):
        raise ConfigError(f"checkpoint.resume: {path} is not a complete checkpoint (no meta.json)")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.loads(f.read(1 << 20), parse_int=_bounded_int)
    except RecursionError:
        raise ConfigError(f"{meta_path}: not a checkpoint meta.json (nested too deeply)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{meta_path}: not a checkpoint meta.json ({e})") from None
    return validate_meta(meta, path)


def _bounded_int(text: str) -> int:
    if len(text) > 20:  # Python's int() of a huge digit string costs quadratic time
        raise ValueError(f"integer of {len(text)} digits")
    return int(text)


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
        engine_dir = os.path.join(path, "engine", "engine")
        check_engine_files(engine_dir, engine, rank, weights_only_loads)
        with weights_only_loads():
            engine.load_checkpoint(os.path.join(path, "engine"), tag="engine")
    else:
        if rank == 0:
            log(
                f"[checkpoint] world size {saved_world} -> {world_size}: backbone weights from "
                f"backbone.pt, backbone optimizer state restarts; head re-sharded exactly"
            )
        load_backbone_weights(engine, os.path.join(path, "backbone.pt"))
    try:
        load_head(path, head, head_opt)
    except (ValueError, FileNotFoundError) as e:  # heads/ names the shard file
        raise ConfigError(f"checkpoint.resume: {e}") from None
    rng_file = os.path.join(path, f"rng_rank{rank}.pt")
    if saved_world == world_size and os.path.isfile(rng_file):
        try:
            state = torch.load(rng_file, weights_only=True)
        except pickle.UnpicklingError as e:
            raise _refused(rng_file, e) from None
        try:
            check_tensor(rng_file, "torch", state["torch"], torch.get_rng_state().shape,
                         torch.uint8)  # fmt: skip
            set_rng_state(state)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ConfigError(f"{rng_file}: not an RNG state of this run ({e})") from None
    return meta


def load_backbone_weights(engine: DeepSpeedEngine, path: str) -> None:
    """Copies an fp32 state dict into the engine's module and its fp32 master weights.

    Every tensor is checked first (`verify.check_tensor`): a parameter's full shape (`ds_shape`
    under ZeRO-3) and fp32 (a buffer: its own dtype, floating ones fp32), so a wrong file
    changes nothing.

    Raises:
        ConfigError: unreadable or refused file, a missing parameter, or a tensor of another
            shape or dtype (the message names the file and tensor).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refused(path, e) from None
    except Exception as e:  # torch raises several types for unreadable files
        raise ConfigError(load_error(path, e)) from None
    if not isinstance(state, dict):
        raise ConfigError(f"{path}: not a state dict (a dict of tensors expected)")
    module = engine.module
    import deepspeed

    params = dict(module.named_parameters())
    for name, param in params.items():
        if name not in state:
            raise ConfigError(f"{path}: missing backbone parameter '{name}'")
        want = getattr(param, "ds_shape", param.shape)
        check_tensor(path, name, state[name], want, torch.float32)
    buffers = [(n, t) for n, t in module.named_buffers() if n in state]
    for name, tensor in buffers:
        dtype = torch.float32 if tensor.is_floating_point() else tensor.dtype
        check_tensor(path, name, state[name], tensor.shape, dtype)
    for name, tensor in buffers:
        tensor.data.copy_(state[name].to(tensor.dtype))
    for name, param in params.items():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            param.data.copy_(state[name].to(param.dtype))
    # ZeRO 1/2 keep fp32 masters apart from the module: refresh them from the loaded weights.
    refresh = getattr(engine.optimizer, "refresh_fp32_params", None)
    if callable(refresh):
        refresh()
