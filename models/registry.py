"""Backbone registry: network name -> builder function.

Every builder takes `embedding_size` plus its family's keyword overrides (IResNet: `base_width`,
`dropout`; MobileFaceNet: `scale`; ViT: `embed_dim`, `depth`, `num_heads`, `drop_path_rate`,
`mask_ratio`) and returns an `nn.Module` with the common backbone interface:
`forward(images (B, 3, 112, 112)) -> (B, embedding_size)`, attribute `embedding_size`,
`set_grad_checkpointing(enable=True)`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from models import iresnet, mobilefacenet, vit
from models.backbone import Backbone

__all__ = ["MODELS", "UnknownModelError", "create", "list_models", "model_kwargs"]

MODELS: dict[str, Callable[..., Backbone]] = {
    "r18": iresnet.r18,
    "r34": iresnet.r34,
    "r50": iresnet.r50,
    "r100": iresnet.r100,
    "r200": iresnet.r200,
    "mbf": mobilefacenet.mbf,
    "mbf_large": mobilefacenet.mbf_large,
    "vit_t": vit.vit_t,
    "vit_s": vit.vit_s,
    "vit_b": vit.vit_b,
    "vit_l": vit.vit_l,
    "vit_h": vit.vit_h,
}


class UnknownModelError(KeyError, ValueError):
    """Raised for a network name not in the registry (catchable as KeyError or ValueError)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def list_models() -> list[str]:
    """Registered network names, in registry order (ResNets, MobileFaceNets, ViTs)."""
    return list(MODELS)


def _builder(name: str) -> Callable[..., Backbone]:
    if name not in MODELS:
        raise UnknownModelError(f"unknown network {name!r}; valid names: {', '.join(MODELS)}")
    return MODELS[name]


def model_kwargs(name: str) -> dict[str, object]:
    """Keyword overrides accepted by `name`'s builder with their defaults (embedding_size included).

    Raises:
        UnknownModelError: `name` is not registered.
    """
    params = inspect.signature(_builder(name)).parameters
    return {k: p.default for k, p in params.items()}


def create(name: str, embedding_size: int = 512, **kwargs: Any) -> Backbone:
    """Build backbone `name` with output width `embedding_size` (D) and builder overrides.

    Args:
        name: one of `list_models()`.
        embedding_size: D of the returned embeddings (B, D).
        **kwargs: family overrides, see the module docstring; unknown keys are errors.

    Returns:
        The backbone in train mode, fp32 parameters on the CPU.

    Raises:
        UnknownModelError (a KeyError and ValueError): unknown `name`.
        TypeError: a keyword the builder does not accept (the message lists the accepted ones).
        ValueError: an out-of-range value (raised by the model class).
    """
    builder = _builder(name)
    accepted = model_kwargs(name)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(
            f"network {name!r} does not accept {unknown}; accepted keywords: {sorted(accepted)}"
        )
    return builder(embedding_size=embedding_size, **kwargs)
