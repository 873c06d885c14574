"""Saved backbone weights: find them, read them safely, and build the model around them.

Accepted inputs: a consolidated ``backbone.pt`` / arcface_torch ``backbone.pth`` or ``model.pt``
(``train_v2.py`` writes it: a plain state dict saved with ``torch.save``, also a
DistributedDataParallel one whose keys all start with ``module.``); a ``backbone.safetensors``
(the final export writes one next to ``backbone.pt``: no pickle, memory-mapped; its header
metadata holds the network as meta.json does); a folder holding one of those files (``WEIGHT_FILES``
order); a step directory ``checkpoints/step_<N>/`` holding ``backbone.pt`` and ``meta.json``
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
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.registry import create

STEP_RE = re.compile(r"^step_(\d+)$")
# Files a weights folder may hold, first found wins: ours (safe format first), arcface_torch's.
WEIGHT_FILES = ("backbone.safetensors", "backbone.pt", "model.pt", "backbone.pth")
_DDP_PREFIX = "module."  # a DistributedDataParallel state dict saved without `.module`

__all__ = [
    "STEP_RE",
    "WEIGHT_FILES",
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
    "refused_global",
    "load_error",
    "check_stored_bytes",
    "state_bytes",
    "missing_reason",
    "MAX_EMBEDDING",
    "save_safetensors",
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
        (path of the weights file, one of `WEIGHT_FILES` in a folder; the parsed meta.json, or
        a `.safetensors` header's same fields, or None).

    Raises:
        FileNotFoundError: `path` or `backbone.pt` in a step dir does not exist, a `latest`
            file with no complete checkpoint behind it (see `latest_in`), or a
            directory with none of the expected layouts.
        ValueError: meta.json is not valid JSON / not an object.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(missing_reason(path))
    if path.is_file():
        return path, _safetensors_meta(path)
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
    found = [path / name for name in WEIGHT_FILES if (path / name).is_file()]
    if not found:
        raise FileNotFoundError(
            f"{path} is a directory without {', '.join(WEIGHT_FILES)}, latest or checkpoints/latest"
        )
    weights = found[0]
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        return weights, _safetensors_meta(weights)
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


def _safetensors_meta(path: Path) -> dict[str, Any] | None:
    """meta.json's fields from a ``.safetensors`` header (``save_safetensors``), else None."""
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as err:  # safetensors raises its own SafetensorError and OSError
        raise ValueError(f"cannot read {path} as safetensors: {err}") from err
    if "network" not in header:
        return None
    try:
        return {
            "network": header["network"],
            "embedding_size": int(header.get("embedding_size", 512)),
            "model_kwargs": json.loads(header.get("model_kwargs", "{}")),
        }
    except ValueError as err:
        raise ValueError(f"{path}: bad arcscale header metadata: {err}") from err


def save_safetensors(
    state: Mapping[str, torch.Tensor], path: str | os.PathLike[str], meta: Mapping[str, Any]
) -> None:
    """Write a backbone state dict as safetensors with meta.json's fields in the header.

    Args:
        state: str -> tensor (copied to contiguous CPU tensors; shared storage is allowed).
        path: the target file, written in place (callers make it atomic).
        meta: ``network``, ``embedding_size``, ``model_kwargs`` (the step dir's meta.json).
    """
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    header = {
        "format": "pt",
        "network": str(meta["network"]),
        "embedding_size": str(int(meta["embedding_size"])),
        "model_kwargs": json.dumps(meta.get("model_kwargs") or {}, sort_keys=True),
    }
    save_file(tensors, str(path), metadata=header)


def missing_reason(path: Path) -> str:
    """Why an existing-looking `path` cannot be used: missing, a broken link or a link loop."""
    if not os.path.lexists(path):
        return f"input {path} does not exist"
    try:
        os.stat(path)
    except OSError as err:  # ELOOP: a symlink loop; ENOENT: a link to nothing
        return f"input {path} cannot be opened: {err.strerror or err} (a symbolic link)"
    return f"input {path} cannot be opened"


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def refused_global(error: BaseException) -> str:
    """The Python object a `weights_only` load refused (e.g. ``posix.mkdir``,
    ``torch.nn.modules.linear.Linear``) out of torch's multi-line message, or "" if none."""
    m = _GLOBAL_RE.search(str(error))
    return m.group(1) if m else ""


def load_error(path: str | os.PathLike[str], error: BaseException) -> str:
    """One line saying why `torch.load(path, weights_only=True)` failed: a refused object (named;
    never torch's advice to load with ``weights_only=False``), an empty file, or torch's first
    line of reason."""
    if isinstance(error, pickle.UnpicklingError):
        what = refused_global(error)
        if what:
            return (
                f"{path}: refused to load: it holds a pickled {what} (code could run), not a "
                "plain state dict of tensors; save `model.state_dict()` with torch.save"
            )
        # No object named: not a pickle torch can read at all (text, another format, damage).
        m = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(error))
        reason = m.group(1).strip()[:200] if m else str(error).strip().split("\n")[0][:200]
        return f"cannot read {path} as a torch state dict: not a torch file ({reason})"
    try:
        if os.path.getsize(path) == 0:
            return f"cannot read {path}: the file is empty (0 bytes)"
    except OSError as err:
        return f"cannot read {path}: {err.strerror or err}"
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    reason = lines[0][:200] if lines else type(error).__name__
    if isinstance(error, EOFError):
        reason = f"the file ends early ({reason}): cut short, or not a torch file"
    return f"cannot read {path} as a torch state dict: {reason}"


def check_stored_bytes(path: str | os.PathLike[str], max_bytes: int) -> None:
    """Refuses a zip-format torch file (what `torch.save` writes) whose members would expand to
    more than `max_bytes`, reading only the zip directory (a deflated member of a few KB can
    expand to gigabytes; `torch.save` stores members uncompressed). Other files pass.

    Raises:
        ValueError: one line naming `path`, the declared and the allowed sizes.
    """
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as z:
            total = sum(info.file_size for info in z.infolist())
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise ValueError(f"cannot read {path} as a torch state dict: {err}") from None
    if total > max_bytes:
        raise ValueError(
            f"{path}: refused: its members expand to {total} bytes, more than the {max_bytes} "
            "a state dict of this network can need"
        )


def state_bytes(model: nn.Module) -> int:
    """Bytes a state dict of `model` may take on disk: its tensors at up to 8 bytes an element
    (fp64 headroom) plus 16 MiB for the pickle and small extras; bounds `read_state_dict`."""
    return int(sum(8 * t.numel() for t in model.state_dict().values())) + (16 << 20)


def read_state_dict(path: Path, max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """The plain state dict (str -> tensor, on CPU) in ``path``, loaded with ``weights_only``
    (``.safetensors``: with safetensors, no pickle); a DDP ``module.`` prefix is stripped
    (``clean_state_dict``). With ``max_bytes`` a zip-format file whose members would expand to
    more bytes is refused before anything is decompressed (``check_stored_bytes``).

    Raises:
        ValueError: unreadable or refused file (one line: ``load_error``), too large, or not a
            mapping of str to tensors.
    """
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return clean_state_dict(load_file(str(path), device="cpu"))
        except Exception as err:  # SafetensorError, OSError
            raise ValueError(f"cannot read {path} as safetensors: {err}") from err
    if max_bytes is not None:
        check_stored_bytes(path, max_bytes)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for unreadable files
        raise ValueError(load_error(path, err)) from None
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
        ValueError: no network known, meta.json disagrees with `network` or fails its types
            (`embedding_size` in [1, 2^16], `model_kwargs` an object the builder takes),
            unreadable or refused file, one larger than the network can need, or keys that do
            not fit (missing / unexpected / shape-mismatched ones are listed). The sizes are
            checked on the meta device, before the network is allocated.
        UnknownModelError: unknown network name (``models.registry``).
    """
    weights, meta = resolve_checkpoint(path)
    meta = meta or {}
    meta_network = meta.get("network")
    if network is None and meta_network is None:
        raise ValueError(f"no network given (--network) and no meta.json network for {weights}")
    if network is not None and meta_network is not None and network != meta_network:
        source = weights if weights.suffix == ".safetensors" else weights.parent / "meta.json"
        raise ValueError(f"network {network!r} given but {source} says {meta_network!r}")
    network = str(network or meta_network)
    build_kwargs = _meta_kwargs(meta, weights)
    build_kwargs.update({k: v for k, v in kwargs.items() if v is not None})
    try:  # sizes checked on the meta device: nothing is allocated for a file that does not fit
        with torch.device("meta"):
            skeleton = create(network, **build_kwargs)
    except TypeError as err:  # a builder keyword from meta.json the network does not take
        raise ValueError(f"{_meta_source(weights)}: model_kwargs: {err}") from None
    state = read_state_dict(weights, max_bytes=state_bytes(skeleton))
    _check_keys(skeleton, state, weights, network)
    model = create(network, **build_kwargs)
    model.load_state_dict(state, strict=True)
    return model.eval()


MAX_EMBEDDING = 2**16  # far past any face model; bounds what a meta.json can make us allocate


def _meta_source(weights: Path) -> Path:
    """Where a weights file's meta fields come from: meta.json beside it, or its own header."""
    return weights if weights.suffix == ".safetensors" else weights.parent / "meta.json"


def _meta_kwargs(meta: Mapping[str, Any], weights: Path) -> dict[str, Any]:
    """Builder keywords from meta.json's `model_kwargs` and `embedding_size`, type-checked.

    Raises:
        ValueError: `model_kwargs` not an object of string keys, `embedding_size` not an
            integer in [1, 2^16] (names the meta.json).
    """
    where = _meta_source(weights)
    kwargs = meta.get("model_kwargs") or {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ValueError(f"{where}: 'model_kwargs' must be an object, got {str(kwargs)[:80]!r}")
    out = dict(kwargs)
    if "embedding_size" in meta:
        size = meta["embedding_size"]
        if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= MAX_EMBEDDING:
            raise ValueError(
                f"{where}: 'embedding_size' must be an integer in [1, {MAX_EMBEDDING}], got "
                f"{str(size)[:40]}"
            )
        out["embedding_size"] = size
    return out
