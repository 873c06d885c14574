"""Atomic, re-shardable training checkpoints (layout in docs/design.md).

```
<output>/checkpoints/
  step_<N>/            complete checkpoints only (written as step_<N>.tmp, then renamed)
    engine/            DeepSpeed engine state of the backbone (engine.save_checkpoint, tag "engine")
    head/              Partial FC rows + optimizer-state rows by class range (heads.save_head)
    rng_rank<r>.pt     python/numpy/torch RNG states of rank r
    backbone.pt        consolidated fp32 backbone state dict, insightface key names
    meta.json          step, epoch, loader position, world size, network, ... (written last)
  latest               text file naming the last complete step_<N>
```
A run killed at any moment leaves `latest` naming a complete checkpoint; stale `*.tmp` folders
are reported and removed at the next start.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NotRequired, TypedDict

import numpy as np
import torch
import torch.distributed as dist

from data.atomic import atomic_path, write_text_atomic

if TYPE_CHECKING:
    from deepspeed.runtime.engine import DeepSpeedEngine

    from heads import HeadOptimizer, PartialFC
    from trainer.config import Config, ConfigError
    from trainer.run import Run

STEP_RE = re.compile(r"^step_(\d+)$")
TMP_RE = re.compile(r"^step_(\d+)\.tmp$")

Log = Callable[[str], None]
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


def _broadcast_str(value: str, rank: int) -> str:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box: list[str | None] = [value if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0] or ""  # rank 0's string on every rank


def checkpoint_root(output: str) -> str:
    """`output/checkpoints`, the folder of a run's checkpoints."""
    return os.path.join(output, "checkpoints")


def list_complete(root: str) -> list[tuple[int, str]]:
    """Complete checkpoints under `root` as (step, path), oldest first (meta.json present)."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = STEP_RE.match(name)
        path = os.path.join(root, name)
        if m and os.path.isfile(os.path.join(path, "meta.json")):
            out.append((int(m.group(1)), path))
    return sorted(out)


def clean_incomplete(root: str, log: Log = print) -> list[str]:
    """Removes the half-written `step_<N>.tmp` folders this project writes (rank 0 at start-up).

    Only that temporary name is deleted: a `step_<N>` folder without `meta.json` was not written
    by arcscale (its own folders get their final name only once complete), so it is reported and
    left alone.
    """
    removed: list[str] = []
    if not os.path.isdir(root):
        return removed
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if not os.path.isdir(path):
            continue
        if TMP_RE.match(name):
            log(f"[checkpoint] removing incomplete checkpoint {path} (a run died while writing it)")
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        elif STEP_RE.match(name) and not os.path.isfile(os.path.join(path, "meta.json")):
            log(f"[checkpoint] ignoring {path}: no meta.json, not a checkpoint of arcscale")
    return removed


def foreign_checkpoints(root: str) -> list[str]:
    """`step_<N>` folders (complete or not) and `latest` under `root`: another run's state."""
    if not os.path.isdir(root):
        return []
    return sorted(
        os.path.join(root, n) for n in os.listdir(root) if STEP_RE.match(n) or n == "latest"
    )


def prepare_fresh_output(output: str, overwrite: bool, log: Log = print) -> None:
    """Start-up check of a run that does not resume (call before any process group starts).

    Raises:
        ConfigError: `output/checkpoints` holds another run's checkpoints and `overwrite` is
            false (a fresh run there would prune them by step number or be resumed as them).
    """
    from trainer.config import ConfigError

    root = checkpoint_root(output)
    found = foreign_checkpoints(root)
    if not found:
        return
    names = ", ".join(os.path.basename(p) for p in found[:4]) + (" ..." if len(found) > 4 else "")
    if not overwrite:
        raise ConfigError(
            f"output: {root} holds another run's checkpoints ({names}); continue it with "
            f"checkpoint.resume=true, pick another output, or set checkpoint.overwrite=true"
        )
    if int(os.environ.get("RANK", "0")) == 0:
        for path in found:
            log(f"[checkpoint] checkpoint.overwrite=true: removing {path}")
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)


def latest_checkpoint(output_or_root: str) -> str | None:
    """The checkpoint named by `latest` (or the newest complete one if `latest` is stale).

    `latest` must hold a bare `step_<N>` name: anything else (an absolute path, `../..`) is
    ignored, so a checkpoint is only ever taken from the run's own `checkpoints/` folder.
    """
    root = output_or_root
    if os.path.basename(os.path.normpath(root)) != "checkpoints":
        root = checkpoint_root(output_or_root)
    pointer = os.path.join(root, "latest")
    if os.path.isfile(pointer):
        with open(pointer, errors="replace") as f:
            name = f.read(256).strip()
        path = os.path.join(root, name)
        if STEP_RE.match(name) and os.path.isfile(os.path.join(path, "meta.json")):
            return path
    done = list_complete(root)
    return done[-1][1] if done else None


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
    from trainer.config import ConfigError

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


def prune_checkpoints(root: str, keep_last: int, keep: str) -> list[str]:
    """Removes complete checkpoints beyond `keep_last`, never `keep` (the one just written),
    whatever the step numbers of the others; returns the removed paths."""
    others = [p for _, p in list_complete(root) if os.path.normpath(p) != os.path.normpath(keep)]
    removed = others[: max(len(others) - (keep_last - 1), 0)]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


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
    from heads import save_head

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
    from trainer.config import ConfigError

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


def resume_off(resume: object) -> bool:
    """`checkpoint.resume` asks for a fresh start (false, or an empty / "false" string)."""
    return resume is False or resume in ("", "false", "False")


def resolve_resume(resume: bool | str, output: str, rank: int = 0) -> str | None:
    """`checkpoint.resume` -> a checkpoint dir: false -> None, true -> latest in `output` (None,
    logged by the caller, when there is none), a path -> that checkpoint or that run's latest.

    Raises:
        ConfigError: an explicit path that is not a complete checkpoint nor a run folder holding
            one (an explicit path never falls back to a fresh start), or a broken meta.json.
    """
    from trainer.config import ConfigError

    if resume_off(resume):
        return None
    if resume is True or resume in ("true", "True", "latest", "auto"):
        path = latest_checkpoint(output)
    else:
        given = str(resume)
        path = given
        if not os.path.isfile(os.path.join(path, "meta.json")):
            path = latest_checkpoint(given)
        if path is None:
            raise ConfigError(
                f"checkpoint.resume: {given} is not a complete checkpoint (no meta.json) nor a "
                f"run folder with one under checkpoints/"
            )
    path = _broadcast_str(path or "", rank) or None
    if path is not None:
        load_meta(path)
    return path


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
    from heads import load_head

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


class Checkpointer:
    """Owns a run's checkpoints: the meta schema, `checkpoint.every` / `keep_last`, resume, the
    rule that a step with a non-finite loss is never saved, and the final `backbone.pt` export.

    Args:
        run: the `trainer.run.Run` whose engine, head, head optimizer and loader are saved.
    """

    def __init__(self, run: Run) -> None:
        self.run = run
        self.cfg = run.cfg
        self.root = checkpoint_root(run.cfg.output)
        self.last_saved = latest_checkpoint(run.cfg.output)  # same on every rank (shared disk)

    def meta(self, step: int) -> Meta:
        """meta.json of a checkpoint at `step` (JSON-serializable; written last)."""
        cfg, run = self.cfg, self.run
        from trainer.config import to_dict

        return {
            "step": step,
            "epoch": run.loader.epoch,
            "loader": run.loader.state_dict(),
            "world_size": run.world,
            "network": cfg.model.network,
            "embedding_size": cfg.model.embedding_size,
            "model_kwargs": cfg.model.kwargs,
            "num_classes": cfg.data.num_classes,
            "precision": run.settings.precision,
            "zero_stage": run.settings.zero_stage,
            "config": to_dict(cfg),
        }

    def resume(self) -> int:
        """Restores the run from `checkpoint.resume`; returns the step to continue from (0 for a
        fresh start). Every rank must call it."""
        run = self.run
        path = resolve_resume(self.cfg.checkpoint.resume, self.cfg.output, run.rank)
        if path is None:
            if not resume_off(self.cfg.checkpoint.resume):
                run.log(f"[checkpoint] no checkpoint in {self.root}: starting fresh")
            run.loader.set_epoch(0)
            return 0
        meta = load_checkpoint(
            path, run.engine, run.head, run.head_opt, run.rank, run.world, run.log
        )
        run.loader.set_epoch(int(meta["epoch"]))
        run.loader.load_state_dict(meta["loader"])  # global-sample offset: any world size
        run.log(f"[arcscale] resumed from {path} at step {meta['step']}, epoch {meta['epoch']}")
        return int(meta["step"])

    def save(self, step: int) -> None:
        """Writes `checkpoints/step_<step>/` (collective)."""
        run = self.run
        save_checkpoint(
            self.cfg.output,
            step,
            run.engine,
            self.run.head,
            run.head_opt,
            self.meta(step),
            run.rank,
            self.cfg.checkpoint.keep_last,
            run.log,
        )
        self.last_saved = os.path.join(self.root, f"step_{step}")

    def maybe_save(self, step: int, finite: bool) -> None:
        """Saves every `checkpoint.every` steps, unless this step's loss was non-finite."""
        every = self.cfg.checkpoint.every
        if not every or step % every:
            return
        if not finite:
            self.run.log(f"[checkpoint] step {step}: not saved, the loss is non-finite")
            return
        self.save(step)

    def finish(self, step: int) -> None:
        """Saves the last step (if not saved yet) and exports its `backbone.pt` to the output
        folder, where arcface_torch users look for the final weights."""
        if self.last_saved is None or not self.last_saved.endswith(f"step_{step}"):
            self.save(step)
        if self.run.rank == 0:
            final = os.path.join(self.root, f"step_{step}", "backbone.pt")
            target = os.path.join(self.cfg.output, "backbone.pt")
            with atomic_path(target) as tmp:
                shutil.copyfile(final, tmp)


def preflight_output(cfg: Config) -> None:
    """Start-up checks of the run folder, before any process group (every rank, shared disk).

    Raises:
        ConfigError: `output` cannot be created or written; an explicit `checkpoint.resume`
            path that is not a complete checkpoint; a fresh run (`checkpoint.resume=false`) in
            a folder holding another run's checkpoints without `checkpoint.overwrite=true`.
    """
    import tempfile

    from trainer.config import ConfigError

    try:
        os.makedirs(cfg.output, exist_ok=True)
        with tempfile.TemporaryFile(dir=cfg.output):
            pass
    except OSError as e:
        raise ConfigError(f"output: cannot write to {cfg.output} ({e.strerror or e})") from None
    if resume_off(cfg.checkpoint.resume):
        prepare_fresh_output(cfg.output, cfg.checkpoint.overwrite)
    else:
        resolve_resume(cfg.checkpoint.resume, cfg.output)  # an explicit path must resolve
