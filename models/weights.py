"""Saved backbone weights: find them, read them safely, and build the model around them.

Accepted inputs: a consolidated ``backbone.pt`` / arcface_torch ``backbone.pth`` (a plain state
dict saved with ``torch.save``, also a DistributedDataParallel one whose keys all start with
``module.``); a step directory ``checkpoints/step_<N>/`` holding ``backbone.pt`` and ``meta.json``
(``{"network": ..., "embedding_size": ..., "model_kwargs": {...}}``, the layout the trainer writes,
docs/design.md "Checkpoint layout"); or a run directory / checkpoints directory whose ``latest``
file names the step directory. Weights are read with ``weights_only=True`` (no code runs).

The trainer's checkpoints, the evaluation tools and ``model.pretrained`` all read through here:
one ``STEP_RE``, one reader of ``latest`` (``latest_in``), one DDP prefix strip
(``clean_state_dict``), as timm keeps ``load_checkpoint``/``clean_state_dict`` with its models.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.registry import create

STEP_RE = re.compile(r"^step_(\d+)$")
_DDP_PREFIX = "module."  # a DistributedDataParallel state dict saved without `.module`

__all__ = [
    "STEP_RE",
    "checkpoint_root",
    "clean_state_dict",
    "describe_mismatches",
    "latest_checkpoint",
    "latest_in",
    "list_complete",
    "key_mismatches",
    "load_backbone",
    "read_state_dict",
    "resolve_checkpoint",
]


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


def latest_in(root: str) -> str | None:
    """The checkpoint named by `root/latest` (or the newest complete one if `latest` is stale).

    The one reader of `latest`, for resume and for evaluation alike. It must hold a bare
    `step_<N>` name: anything else (an absolute path, `../..`) is ignored, so a checkpoint is only
    ever taken from the run's own `checkpoints/` folder; a step is complete once its meta.json
    exists (written last).

    Args:
        root: a run's `checkpoints/` folder.
    Returns:
        the step folder's path, or None when there is no complete checkpoint.
    """
    pointer = os.path.join(root, "latest")
    if os.path.isfile(pointer):
        with open(pointer, errors="replace") as f:
            name = f.read(256).strip()
        path = os.path.join(root, name)
        if STEP_RE.match(name) and os.path.isfile(os.path.join(path, "meta.json")):
            return path
    done = list_complete(root)
    return done[-1][1] if done else None


def latest_checkpoint(output_or_root: str) -> str | None:
    """`latest_in` of a run's output folder (its `checkpoints/`) or of a `checkpoints/` folder."""
    root = output_or_root
    if os.path.basename(os.path.normpath(root)) != "checkpoints":
        root = checkpoint_root(output_or_root)
    return latest_in(root)


def resolve_checkpoint(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any] | None]:
    """Find the state-dict file and its meta.json (if any) behind `path`.

    Returns:
        (path of the `backbone.pt`/`.pth` file, parsed meta.json or None).

    Raises:
        FileNotFoundError: `path` or `backbone.pt` in a step dir does not exist, a `latest`
            file with no complete checkpoint behind it (see `latest_in`), or a
            directory with none of the expected layouts.
        ValueError: meta.json is not valid JSON / not an object.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist")
    if path.is_file():
        return path, None
    for root in (path, path / "checkpoints"):
        if (root / "latest").is_file():
            step_dir = latest_in(str(root))
            if step_dir is None:
                name = (root / "latest").read_text(errors="replace")[:256].strip()
                raise FileNotFoundError(
                    f"{root / 'latest'} names {name!r}, which is no complete step_<N> folder "
                    f"of {root}, and there is none to fall back to"
                )
            return resolve_checkpoint(step_dir)
    weights = path / "backbone.pt"
    if not weights.is_file():
        raise FileNotFoundError(
            f"{path} is a directory without backbone.pt, latest or checkpoints/latest"
        )
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        return weights, None
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{meta_file} is not valid JSON: {err}") from err
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_file} must hold a JSON object, got {type(meta).__name__}")
    return weights, meta


def clean_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the ``module.`` prefix a DistributedDataParallel model adds to every key
    (arcface_torch saves ``backbone.module.state_dict()``, but a ``torch.save(ddp.state_dict())``
    is common); unchanged when not every key carries it."""
    if state and all(k.startswith(_DDP_PREFIX) for k in state):
        return {k[len(_DDP_PREFIX) :]: v for k, v in state.items()}
    return dict(state)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The plain state dict (str -> tensor, on CPU) in ``path``, loaded with ``weights_only``;
    a DDP ``module.`` prefix is stripped (``clean_state_dict``).

    Raises:
        ValueError: unreadable file, or not a mapping of str to tensors.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for unreadable files
        raise ValueError(f"cannot read {path} as a torch state dict: {err}") from err
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"{path} must hold a plain state dict (str -> tensor)")
    return clean_state_dict(state)


def key_mismatches(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """How `state` fails to fit `model`: {"missing", "unexpected", "shape-mismatched"} -> sorted
    key lists (a mismatch reads "key: checkpoint (shape) vs model (shape)"); all empty: it fits."""
    expected = model.state_dict()
    return {
        "missing": sorted(set(expected) - set(state)),
        "unexpected": sorted(set(state) - set(expected)),
        "shape-mismatched": sorted(
            f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
            for k, v in expected.items()
            if k in state and state[k].shape != v.shape
        ),
    }


def describe_mismatches(mismatches: Mapping[str, list[str]]) -> list[str]:
    """One line per non-empty kind of `key_mismatches`: "  missing keys (N): a, b"."""
    return [
        f"  {label} keys ({len(keys)}): {', '.join(keys)}"
        for label, keys in mismatches.items()
        if keys
    ]


def _check_keys(
    model: nn.Module, state: Mapping[str, torch.Tensor], source: Path, network: str
) -> None:
    lines = describe_mismatches(key_mismatches(model, state))
    if lines:
        raise ValueError("\n".join([f"{source} does not fit network {network!r}", *lines]))


def load_backbone(
    path: str | os.PathLike[str], network: str | None = None, **kwargs: Any
) -> nn.Module:
    """Build the backbone and strictly load a checkpoint into it; returned in eval mode, fp32, CPU.

    Args:
        path: a state-dict file, a step dir or a run dir (see the module docstring).
        network: registered name; if None it comes from the step dir's meta.json.
        **kwargs: `embedding_size` and builder overrides; they win over meta.json's values.

    Raises:
        FileNotFoundError: missing input (see `resolve_checkpoint`).
        ValueError: no network known, meta.json disagrees with `network`, unreadable file, or
            keys that do not fit (missing / unexpected / shape-mismatched ones are listed).
        UnknownModelError: unknown network name (``models.registry``).
    """
    weights, meta = resolve_checkpoint(path)
    meta = meta or {}
    meta_network = meta.get("network")
    if network is None and meta_network is None:
        raise ValueError(f"no network given (--network) and no meta.json network for {weights}")
    if network is not None and meta_network is not None and network != meta_network:
        raise ValueError(
            f"network {network!r} given but {weights.parent}/meta.json says {meta_network!r}"
        )
    network = str(network or meta_network)
    build_kwargs = dict(meta.get("model_kwargs") or {})
    if "embedding_size" in meta:
        build_kwargs["embedding_size"] = int(meta["embedding_size"])
    build_kwargs.update({k: v for k, v in kwargs.items() if v is not None})
    model = create(network, **build_kwargs)
    state = read_state_dict(weights)
    _check_keys(model, state, weights, network)
    model.load_state_dict(state, strict=True)
    return model.eval()
