"""The engine precisions by name and their torch dtypes (``engine.precision``; DeepSpeed's
``fp16``/``bf16`` sections), and the fp32 tail a backbone keeps under a half-precision engine.
A leaf module: the memory planner reads the sizes without pulling in the engine."""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

__all__ = ["DTYPES", "keep_tail_fp32"]

# Name -> parameter/activation dtype of the backbone under that precision.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def keep_tail_fp32(model: nn.Module) -> list[str]:
    """Computes the submodules ``model.fp32_tail`` names in fp32 under a bf16/fp16 engine.

    arcface_torch runs its backbones under autocast except the last layers, which it feeds fp32
    (``self.fc(x.float() if self.fp16 else x)``): IResNet's ``fc`` sums K = 512 * 7 * 7 = 25,088
    products per output (fp16/bf16 accumulation and rounding of the 7x7 map lose digits there)
    and its ``features`` BatchNorm1d normalizes the embedding itself. DeepSpeed casts every
    parameter to the engine dtype, and its ZeRO partitions flatten them into one buffer of that
    dtype, so fp32 *parameters* for the tail are not an option. Instead each parameterized module
    of the tail computes in fp32: its floating inputs are upcast and its parameters are replaced,
    for the call only, by fp32 copies (a differentiable cast: the gradient reaches the bf16/fp16
    parameter through it, and ZeRO-3 has already gathered the parameter when the module's own
    forward runs). The model's output is then cast back to the dtype of its input, i.e. the
    engine dtype that `trainer.step.train_step` and the head expect: the embedding is rounded once
    to bf16/fp16 at the very end (relative error 2^-9 / 2^-11 per element, below what the head's
    cosine GEMM keeps), while the tail's accumulations, the BatchNorm statistics and the affine
    transforms are fp32, and the embedding travels between ranks at half the bytes. The cost is a
    transient fp32 copy of the tail's weights (r50: 25,088 x 512 x 4 B = 51 MB), kept for the
    backward.

    The names must be the model's last submodules in forward order (what follows them would see
    fp32 activations against half parameters). Model files only name their tail
    (`models.backbone.Backbone.fp32_tail`); this policy is the trainer's.

    Args:
        model: a backbone whose parameters are (or will be cast to) bf16/fp16; modified in place
            (instance ``forward`` of each parameterized tail module, one forward hook on
            ``model``). Apply it once, before the DeepSpeed engine is built.

    Returns:
        the tail names applied (``[]`` for a model without ``fp32_tail``).

    Raises:
        ValueError: a name in ``fp32_tail`` that is not a submodule of ``model``.
    """
    names = list(getattr(model, "fp32_tail", ()))
    if not names:
        return []
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules:
            raise ValueError(f"fp32_tail: {type(model).__name__} has no submodule {name!r}")
        for sub in modules[name].modules():
            if any(p is not None for p in sub._parameters.values()):
                sub.forward = types.MethodType(_forward_fp32, sub)
    model.register_forward_hook(_output_like_input)
    return names


def _fp32(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.float()
    return value


def _forward_fp32(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    # The class forward with fp32 inputs and fp32 views of this module's own parameters; the
    # parameters are put back whatever happens (BatchNorm's running statistics are fp32 already).
    saved = {n: p for n, p in self._parameters.items() if p is not None}
    try:
        for n, p in saved.items():
            self._parameters[n] = p.float()  # type: ignore[assignment]
        args = tuple(_fp32(a) for a in args)
        kwargs = {k: _fp32(v) for k, v in kwargs.items()}
        return type(self).forward(self, *args, **kwargs)
    finally:
        self._parameters.update(saved)


def _output_like_input(module: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
    # The embedding leaves in the dtype the images came in (the engine dtype).
    if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
        return out.to(args[0].dtype)
    return out
