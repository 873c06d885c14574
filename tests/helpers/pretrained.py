"""A pretrained-looking backbone file for the fine-tuning tests (docs/finetune.md)."""

from __future__ import annotations

import torch

import models

TINY_NET = {"embedding_size": 64, "base_width": 8}  # r18 as launch.TINY configures it


def pretrained_file(path, seed=0, prefix=""):
    """A trained-looking r18 saved as an arcface_torch-style plain state dict at ``path`` (keys
    prefixed with ``prefix``): random weights, BatchNorm statistics away from (0, 1). Returns
    its state dict without the prefix."""
    torch.manual_seed(seed)
    net = models.create("r18", **TINY_NET)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if name.endswith(("running_mean", "running_var")):
                t.copy_(torch.rand_like(t) + 0.5)
    state = {prefix + k: v for k, v in net.state_dict().items()}
    torch.save(state, path)
    return net.state_dict()
