"""What a run makes of a `Config`: the head's margin loss, derived step counts, the saved file.

These factories read a `Config` and nothing else of this package: they import only
`trainer.config.schema`. They sit directly on the schema, below validation and loading, not
above them, because validation uses one of them: `trainer.config.validate` checks
`head.loss_kwargs` by building the margin once through `build_head_margin`, the same call the
run makes, so a config that validates is a config whose margin the run can build. The order of
the package is therefore schema <- factories <- validate <- load, every import pointing down.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import yaml

from data.atomic import write_text_atomic
from trainer.config.schema import Config, ConfigError


def build_head_margin(cfg: Config) -> Any:
    """The head's margin loss (a `heads.Margin`) for `cfg.head` and `cfg.seed`.

    Raises:
        ValueError / TypeError: as `heads.build_margin` (unknown loss, bad kwargs).
    """
    from heads import build_margin  # torch: imported only when needed

    h = cfg.head
    m1, m2, m3 = h.margin_list
    return build_margin(
        h.loss,
        h.scale,
        (m1, m2, m3),
        h.interclass_filtering_threshold,
        h.margin_gradient,
        h.clamping,
        cfg.seed,
        h.loss_kwargs,
    )


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML dumps and logs."""

    def conv(v: Any) -> Any:
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    out: dict[str, Any] = conv(dataclasses.asdict(cfg))
    return out


def save_config(cfg: Config, path: str, resolved: dict[str, Any] | None = None) -> None:
    """Writes the config, and the derived values as a trailing comment block, atomically."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if resolved:
        text += "# resolved:\n" + "".join(f"#   {k}: {v}\n" for k, v in resolved.items())
    write_text_atomic(path, text)


@dataclass(frozen=True)
class Resolved:
    """Values derived once from the config, the world size and the dataset; never written back.

    `global_batch` = batch_size * world_size * gradient_acc samples per optimizer step.
    """

    world_size: int
    num_image: int
    global_batch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def resolve(cfg: Config, world_size: int, num_image: int) -> Resolved:
    """Derives step counts as arcface_torch does (`num_image // global_batch` steps per epoch).

    Raises:
        ConfigError: when the dataset is smaller than one global batch.
    """
    global_batch = cfg.data.batch_size * world_size * cfg.optim.gradient_acc
    steps_per_epoch = num_image // global_batch
    if steps_per_epoch == 0 and cfg.schedule.max_steps <= 0:
        raise ConfigError(
            f"data.batch_size: global batch {global_batch} (batch_size {cfg.data.batch_size} x "
            f"world size {world_size} x gradient_acc {cfg.optim.gradient_acc}) exceeds the "
            f"{num_image} images of the dataset"
        )
    total = cfg.schedule.max_steps or steps_per_epoch * cfg.schedule.num_epoch
    warmup = min(total, steps_per_epoch * cfg.schedule.warmup_epoch)
    return Resolved(world_size, num_image, global_batch, max(steps_per_epoch, 1), total, warmup)
