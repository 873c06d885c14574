"""Fine-tuning controls on the backbone: frozen stem and stages, head warm-up, frozen BatchNorm
statistics, backbone learning-rate multiplier (docs/finetune.md).

Frozen parameters stay in the optimizer and under ZeRO like any other (DeepSpeed partitions and
flattens its param groups once, at `accelerator.prepare`; toggling `requires_grad` afterwards
would leave ZeRO-3's hooks and partitions inconsistent). Instead, while a part is frozen:
its gradients are replaced by zeros before they accumulate (a tensor hook on each parameter,
so every ZeRO stage reduces and partitions as usual), its param group gets lr 0 and weight
decay 0 (SGD: the momentum buffer stays 0, so unfreezing starts like a fresh optimizer; AdamW:
the update and decoupled decay are 0) and its BatchNorm layers run in eval mode (running
statistics unchanged). Together the frozen weights and buffers stay bit-identical.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from trainer.config import Config, ConfigError

_BN = nn.modules.batchnorm._BatchNorm


def stage_names(model: nn.Module) -> list[tuple[str, ...]]:
    """The backbone's stem then its stages, in forward order, as module/parameter names.

    Raises:
        ConfigError: a network whose stages this table does not know.
    """
    from models.iresnet import IResNet
    from models.mobilefacenet import MobileFaceNet
    from models.vit import FaceViT

    if isinstance(model, IResNet):
        return [("conv1", "bn1", "prelu"), ("layer1",), ("layer2",), ("layer3",), ("layer4",)]
    if isinstance(model, MobileFaceNet):
        return [(f"layers.{i}",) for i in range(len(model.layers))]
    if isinstance(model, FaceViT):
        return [("patch_embed", "pos_embed")] + [(f"blocks.{i}",) for i in range(len(model.blocks))]
    raise ConfigError(f"model.freeze_stages: no stage table for {type(model).__name__}")


def frozen_prefixes(model: nn.Module, num_stages: int) -> tuple[str, ...]:
    """Names of the stem and the first `num_stages` stages (`model.freeze_stages`).

    Raises:
        ConfigError: `num_stages` exceeds the network's stages.
    """
    stages = stage_names(model)
    if num_stages > len(stages) - 1:
        raise ConfigError(
            f"model.freeze_stages: {type(model).__name__} has {len(stages) - 1} stages after "
            f"its stem, got {num_stages}"
        )
    return tuple(name for stage in stages[: num_stages + 1] for name in stage)


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def param_groups(cfg: Config, model: nn.Module) -> list[dict[str, Any]] | None:
    """The backbone optimizer's param groups: [stem + first `model.freeze_stages` stages, rest]
    (trainable parameters), or None (one group of `model.parameters()`) without stage freezing.
    Built before `accelerator.prepare`: DeepSpeed flattens and partitions each group.

    Raises:
        ConfigError: see `frozen_prefixes`.
    """
    if cfg.model.freeze_stages <= 0:
        return None
    prefixes = frozen_prefixes(model, cfg.model.freeze_stages)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    stage = [p for n, p in params if _under(n, prefixes)]
    rest = [p for n, p in params if not _under(n, prefixes)]
    return [{"params": stage}] + ([{"params": rest}] if rest else [])


@dataclass
class FreezePlan:
    """Which backbone parts are frozen at which step; applied once per step by `apply`.

    `prefixes`: names of the stem and frozen stages; `stage_group`: the index of their param
    group in `param_groups` (or None); `stages_frozen` / `all_frozen`: the state `apply` set for
    the current step (read by the gradient hooks and the BatchNorm `train` overrides).
    """

    cfg: Config
    model: nn.Module
    prefixes: tuple[str, ...] = ()
    stage_group: int | None = None
    stages_frozen: bool = False
    all_frozen: bool = False
    _stage_modules: set[int] = field(default_factory=set)

    def param_frozen(self, in_stage: bool) -> bool:
        """Whether a parameter (in the frozen stages or not) takes a zero gradient now."""
        return self.all_frozen or (in_stage and self.stages_frozen)

    def bn_frozen(self, module: nn.Module) -> bool:
        """Whether this BatchNorm must run in eval mode now."""
        if self.cfg.model.freeze_bn or self.all_frozen:
            return True
        return self.stages_frozen and id(module) in self._stage_modules

    def apply(self, step: int, lr: float, groups: list[dict[str, Any]]) -> None:
        """Sets, for optimizer step `step` (0-based), which parts are frozen, each backbone param
        group's lr (`lr * optim.backbone_lr_scale`, 0 when frozen) and weight decay (0 when
        frozen), and the BatchNorm modes.

        Args:
            step: optimizer steps already taken.
            lr: the schedule's learning rate for this step (the head's).
            groups: the engine optimizer's `param_groups`, in `param_groups()` order.
        """
        m, o = self.cfg.model, self.cfg.optim
        self.all_frozen = step < o.head_warmup_steps
        self.stages_frozen = self.all_frozen or (
            m.freeze_stages > 0 and (m.freeze_steps == 0 or step < m.freeze_steps)
        )
        for i, group in enumerate(groups):
            frozen = self.all_frozen or (i == self.stage_group and self.stages_frozen)
            group["lr"] = 0.0 if frozen else lr * o.backbone_lr_scale
            group["weight_decay"] = 0.0 if frozen else o.weight_decay
        for module in self.model.modules():
            if isinstance(module, _BN):
                module.train(self.model.training)  # the override below decides


def build_freeze_plan(cfg: Config, model: nn.Module) -> FreezePlan:
    """The plan for `model` (the backbone module, bare or already inside the DeepSpeed engine:
    hooks on ZeRO-3's partitioned parameters work the same), with its gradient hooks and
    BatchNorm mode overrides installed when any freezing is configured.

    Raises:
        ConfigError: `model.freeze_stages` beyond the network's stages or an unknown network.
    """
    plan = FreezePlan(cfg, model)
    if cfg.model.freeze_stages > 0:
        plan.prefixes = frozen_prefixes(model, cfg.model.freeze_stages)
        plan.stage_group = 0
    if cfg.model.freeze_stages > 0 or cfg.optim.head_warmup_steps > 0:
        for name, param in model.named_parameters():
            if param.requires_grad:
                frozen = functools.partial(plan.param_frozen, _under(name, plan.prefixes))
                param.register_hook(_zero_when(frozen))  # type: ignore[no-untyped-call]
    elif not cfg.model.freeze_bn:
        return plan
    for name, module in model.named_modules():
        if not isinstance(module, _BN):
            continue
        if _under(name, plan.prefixes):
            plan._stage_modules.add(id(module))
        module.train = types.MethodType(_bn_train(plan), module)  # type: ignore[method-assign]
    return plan


def _zero_when(frozen: Callable[[], bool]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A gradient hook: zeros instead of the gradient while `frozen()`."""

    def hook(grad: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(grad) if frozen() else grad

    return hook


def _bn_train(plan: FreezePlan) -> Callable[..., nn.Module]:
    def train(self: nn.Module, mode: bool = True) -> nn.Module:
        return nn.Module.train(self, mode and not plan.bn_frozen(self))

    return train
