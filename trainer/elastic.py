"""What a resumed run does when its world size changed (an elastic restart on fewer or more
nodes, a requeued job on another allocation): `elastic.on_resize` (docs/clusters.md).

- `keep_global_batch` (default): the global batch of the checkpoint is kept by gradient
  accumulation, `gradient_acc' = batch x gradient_acc x W_ckpt / (batch x W)`; the LR schedule,
  the step count and the data order (global sample positions) stay those of the run. Where
  the accumulation would not be a whole number the config's is kept, with a logged line.
- `scale_lr`: the per-rank batch and accumulation stay; the global batch follows the world size
  and `optim.lr` is scaled linearly with it (Goyal et al. 2017, "Accurate, Large Minibatch SGD").
- `none`: nothing changes (global batch and LR as the config says).

The checkpoint's meta.json holds the (adjusted) config it ran with, so a chain of restarts
(2 -> 1 -> 1 -> 2 ranks) keeps the first global batch / LR. The rule applies only when the
config's `data.batch_size` equals the checkpoint's: a user who sizes the per-rank batch for the
new world size (as docs/reliability.md does for 2 x 24 -> 3 x 16) gets exactly what was asked;
with `none`, `optim.gradient_acc` and `optim.lr` are the config's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from trainer.config import Config

RULES = ("keep_global_batch", "scale_lr", "none")


def resized_config(cfg: Config, world: int, log: Callable[[str], None] = print) -> Config:
    """`cfg` adjusted to `world` by `cfg.elastic.on_resize` when resuming a checkpoint written
    at another world size (rank 0 logs the change); `cfg` unchanged otherwise.

    Raises:
        ConfigError: a broken meta.json of the checkpoint to resume.
    """
    from trainer.checkpoint import load_meta, resolve_resume

    rule = cfg.elastic.on_resize
    path = resolve_resume(cfg.checkpoint.resume, cfg.output) if rule != "none" else None
    if path is None:
        return cfg
    meta = load_meta(path)
    old_world = int(meta["world_size"])
    saved = meta.get("config", {})
    batch = int(saved.get("data", {}).get("batch_size", cfg.data.batch_size))
    acc = int(saved.get("optim", {}).get("gradient_acc", cfg.optim.gradient_acc))
    if batch != cfg.data.batch_size:  # the user sized the batch for this world: as asked
        return cfg
    global_batch = batch * acc * old_world
    head = f"[arcscale] world size {old_world} -> {world}, elastic.on_resize={rule}:"
    if rule == "keep_global_batch":
        new_acc, left = divmod(global_batch, batch * world)
        if left or new_acc < 1:  # logged, not fatal: an elastic restart must not fail on it
            log(
                f"{head} the global batch {global_batch} is not a multiple of data.batch_size "
                f"{batch} x {world} ranks: training with global batch "
                f"{batch * cfg.optim.gradient_acc * world} (set data.batch_size to keep it)"
            )
            return cfg
        if new_acc != cfg.optim.gradient_acc:
            was = cfg.optim.gradient_acc
            log(f"{head} optim.gradient_acc {was} -> {new_acc} (global batch {global_batch})")
        return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, gradient_acc=new_acc))
    new_global = batch * cfg.optim.gradient_acc * world
    lr = float(saved.get("optim", {}).get("lr", cfg.optim.lr)) * new_global / global_batch
    if lr != cfg.optim.lr:
        log(f"{head} global batch {global_batch} -> {new_global}, lr {cfg.optim.lr:g} -> {lr:g}")
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=lr))
