"""Atomic, re-shardable training checkpoints (layout in design.md).

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

import json
import os
import random
import re
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist

STEP_RE = re.compile(r"^step_(\d+)$")


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _broadcast_str(value: str, rank: int) -> str:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def checkpoint_root(output: str) -> str:
    return os.path.join(output, "checkpoints")


def write_text_atomic(path: str, text: str) -> None:
    """Writes `text` to `path` through a temp file + fsync + os.replace."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def clean_incomplete(root: str, log=print) -> list[str]:
    """Removes half-written `step_<N>.tmp` folders (rank 0 at start-up) and reports each."""
    removed = []
    if not os.path.isdir(root):
        return removed
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        half = name.endswith(".tmp") or (
            STEP_RE.match(name) and not os.path.isfile(os.path.join(path, "meta.json"))
        )
        if half and os.path.isdir(path):
            log(f"[checkpoint] removing incomplete checkpoint {path} (a run died while writing it)")
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def latest_checkpoint(output_or_root: str) -> str | None:
    """The checkpoint named by `latest` (or the newest complete one if `latest` is stale)."""
    root = output_or_root
    if os.path.basename(os.path.normpath(root)) != "checkpoints":
        root = checkpoint_root(output_or_root)
    pointer = os.path.join(root, "latest")
    if os.path.isfile(pointer):
        with open(pointer) as f:
            path = os.path.join(root, f.read().strip())
        if os.path.isfile(os.path.join(path, "meta.json")):
            return path
    done = list_complete(root)
    return done[-1][1] if done else None


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    output: str,
    step: int,
    engine,
    head,
    head_opt,
    meta: dict,
    rank: int,
    keep_last: int,
    log=print,
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
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_text_atomic(os.path.join(root, "latest"), f"step_{step}\n")
        for _, old in list_complete(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        log(f"[checkpoint] saved {final} in {time.time() - t0:.1f}s")
    _barrier()
    return final


def consolidate_backbone(engine_dir: str, module: torch.nn.Module) -> dict:
    """fp32 backbone state dict from a saved engine checkpoint (DeepSpeed's zero_to_fp32).

    Works for ZeRO 1/2/3: the fp32 master weights come from the optimizer partitions of all ranks.
    Under ZeRO 1/2 zero_to_fp32 leaves out frozen parameters (e.g. IResNet's `features.weight`,
    fixed at 1); they are replicated and never updated, so they are taken from `module`.
    Keys and order follow `module.state_dict()` (insightface names for IResNet).
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(engine_dir, tag="engine")
    out = {}
    for key, value in module.state_dict().items():
        value = state.get(key, value).detach().cpu()
        out[key] = value.float() if value.is_floating_point() else value
    return out


def load_meta(path: str) -> dict:
    """Reads `meta.json` of a checkpoint directory; raises FileNotFoundError naming it."""
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no meta.json)")
    with open(meta_path) as f:
        return json.load(f)


def resolve_resume(resume, output: str, rank: int) -> str | None:
    """`checkpoint.resume` -> a checkpoint dir: false -> None, true -> latest in output, path -> it.

    Raises:
        FileNotFoundError: an explicit path without a complete checkpoint.
    """
    if resume is False or resume in ("", "false", "False"):
        return None
    if resume is True or resume in ("true", "True", "latest"):
        path = latest_checkpoint(output)
    else:
        path = str(resume)
        if os.path.isfile(os.path.join(path, "checkpoints", "latest")):
            path = latest_checkpoint(path)
    path = _broadcast_str(path or "", rank) or None
    if path is not None:
        load_meta(path)
    return path


def load_checkpoint(path: str, engine, head, head_opt, rank: int, world_size: int, log=print):
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
        set_rng_state(torch.load(rng_file, weights_only=False))
    return meta


def load_backbone_weights(engine, path: str) -> None:
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
