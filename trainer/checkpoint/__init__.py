"""Atomic, re-shardable training checkpoints (layout in docs/design.md).

```
<output>/checkpoints/
  step_<N>/            complete checkpoints only (written as step_<N>.tmp, then renamed)
    engine/            DeepSpeed engine state of the backbone (engine.save_checkpoint, tag "engine")
    head/              Partial FC rows + optimizer-state rows by class range (heads.save_head)
    rng_rank<r>.pt     python/numpy/torch RNG states of rank r
    backbone.pt        consolidated fp32 backbone state dict, insightface key names
    meta.json          step, epoch, loader position, world size, network, ... (written last)
  latest               text file naming the last complete step_<N>
```
A run killed at any moment leaves `latest` naming a complete checkpoint; stale `*.tmp` folders
are reported and removed at the next start.
"""

from models.weights import STEP_RE, checkpoint_root, latest_checkpoint, list_complete
from trainer.checkpoint.layout import (
    TMP_RE,
    clean_incomplete,
    foreign_checkpoints,
    prepare_fresh_output,
    prune_checkpoints,
)
from trainer.checkpoint.manager import (
    Checkpointer,
    check_output_shared,
    preflight_output,
    prepare_output_folder,
    resolve_resume,
    resume_off,
)
from trainer.checkpoint.store import (
    Meta,
    RngState,
    consolidate_backbone,
    load_backbone_weights,
    load_checkpoint,
    load_meta,
    rng_state,
    save_checkpoint,
    set_rng_state,
    weights_only_loads,
)

__all__ = [
    "STEP_RE",
    "TMP_RE",
    "Checkpointer",
    "check_output_shared",
    "Meta",
    "RngState",
    "checkpoint_root",
    "clean_incomplete",
    "consolidate_backbone",
    "foreign_checkpoints",
    "latest_checkpoint",
    "list_complete",
    "load_backbone_weights",
    "load_checkpoint",
    "load_meta",
    "preflight_output",
    "prepare_output_folder",
    "prepare_fresh_output",
    "prune_checkpoints",
    "resolve_resume",
    "resume_off",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "weights_only_loads",
]
