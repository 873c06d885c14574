"""A saved backbone for evaluation and export: find its weights and build the model around them.

Accepted inputs: a consolidated ``backbone.pt`` / arcface_torch ``backbone.pth`` (a plain state
dict saved with ``torch.save``); a step directory ``checkpoints/step_<N>/`` holding ``backbone.pt``
and ``meta.json`` (``{"network": ..., "embedding_size": ..., "model_kwargs": {...}}``, the layout
``trainer/checkpoint.py`` writes); or a run directory / checkpoints directory whose ``latest`` file
names the step directory. Weights are read with ``weights_only=True`` (no code runs).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

import models
from trainer.checkpoint import STEP_RE

__all__ = [
    "describe_mismatches",
    "key_mismatches",
    "load_backbone",
    "read_state_dict",
    "resolve_checkpoint",
]


def resolve_checkpoint(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any] | None]:
    """Find the state-dict file and its meta.json (if any) behind `path`.

    Returns:
        (path of the `backbone.pt`/`.pth` file, parsed meta.json or None).

    Raises:
        FileNotFoundError: `path`, `backbone.pt` in a step dir, or the step dir named by `latest`
            does not exist, or a directory has none of the expected layouts.
        ValueError: meta.json is not valid JSON / not an object.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist")
    if path.is_file():
        return path, None
    for latest in (path / "latest", path / "checkpoints" / "latest"):
        if latest.is_file():
            name = latest.read_text(errors="replace")[:256].strip()
            if not STEP_RE.match(name):  # confined to the run's own checkpoints/ folder
                raise ValueError(f"{latest} must name a step_<N> folder, got {name!r}")
            step_dir = latest.parent / name
            if not step_dir.is_dir():
                raise FileNotFoundError(f"{latest} names {step_dir}, which does not exist")
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


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The plain state dict (str -> tensor, on CPU) in ``path``, loaded with ``weights_only``.

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
    return dict(state)


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
        models.UnknownModelError: unknown network name.
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
    model = models.create(network, **build_kwargs)
    state = read_state_dict(weights)
    _check_keys(model, state, weights, network)
    model.load_state_dict(state, strict=True)
    return model.eval()
