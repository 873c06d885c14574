"""Fine-tuning: the backbone starts from saved weights (`model.pretrained`) before DeepSpeed.

Accepted (models/weights.py finds the file): our `backbone.pt` or `backbone.safetensors` (its
header names the network, checked like meta.json's), a step dir, a run dir, an arcface_torch
`backbone.pth` or `model.pt` (`torch.save(backbone.module.state_dict())`, train_v2.py writes
`model.pt`: the insightface key names our networks use), or a folder holding one of them.
The weights load into the bare module on every rank before `accelerator.prepare`, so ZeRO-3
partitions the loaded values. The Partial FC head is not touched: it starts fresh for the new
dataset's classes. `checkpoint.resume` is another thing: it restores a whole run (head, optimizer,
loader, RNG) and, when it does, wins over these weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from models.weights import (
    describe_mismatches,
    key_mismatches,
    read_state_dict,
    resolve_checkpoint,
    state_bytes,
)
from trainer.config import Config, ConfigError


def load_pretrained(cfg: Config, model: nn.Module, log: Callable[[str], object] = print) -> int:
    """Loads `cfg.model.pretrained` into `model` (in place, CPU fp32 values copied into its own
    parameters and buffers). No-op when the field is empty.

    With `model.pretrained_strict` (default) every key must match in name and shape; with
    `pretrained_strict: false` the matching keys load and the rest are logged.

    Args:
        cfg: the run's config (`model.pretrained`, `model.pretrained_strict`, `model.network`).
        model: the bare backbone, before any DeepSpeed wrapping.
        log: where the summary line (and, non-strict, the mismatches) go.

    Returns:
        the number of tensors loaded.

    Raises:
        ConfigError: missing or unreadable file, a step dir whose meta.json names another
            network, or (strict) missing / unexpected / shape-mismatched keys, all listed.
    """
    path = cfg.model.pretrained
    if not path:
        return 0
    where = f"model.pretrained: {path}"
    try:
        weights, meta = resolve_checkpoint(path)
        state = read_state_dict(weights, max_bytes=state_bytes(model))  # before inflating
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from None
    saved_network = (meta or {}).get("network")
    if saved_network is not None and saved_network != cfg.model.network:
        raise ConfigError(
            f"{where}: {weights.parent}/meta.json says network {saved_network!r} but "
            f"model.network is {cfg.model.network!r}"
        )
    mismatches = key_mismatches(model, state)
    lines = describe_mismatches(mismatches)
    if lines and cfg.model.pretrained_strict:
        raise ConfigError(
            "\n".join(
                [
                    f"{where}: {weights} does not fit network {cfg.model.network!r} "
                    "(model.pretrained_strict=false loads the matching keys)",
                    *lines,
                ]
            )
        )
    expected = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in expected and v.shape == expected[k].shape}
    with torch.no_grad():
        for key, value in fitting.items():
            expected[key].copy_(value)  # state_dict() tensors share storage with the module
    log(
        f"[arcscale] pretrained backbone: {len(fitting)}/{len(expected)} tensors from {weights}"
        + (" (not strict; skipped:)" if lines else "")
    )
    for line in lines:
        log(line)
    return len(fitting)
