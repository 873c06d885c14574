"""A run's checkpoint folder: which step folders are complete, what is left half-written or
belongs to another run, and how many are kept (`checkpoint.keep_last`). Names and the `latest`
reader are shared with evaluation in `models/weights.py`."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from typing import TYPE_CHECKING

from models.weights import STEP_RE, checkpoint_root, list_complete
from trainer.config import ConfigError

if TYPE_CHECKING:
    pass


TMP_RE = re.compile(r"^step_(\d+)\.tmp$")


Log = Callable[[str], None]


def clean_incomplete(root: str, log: Log = print) -> list[str]:
    """Removes the half-written `step_<N>.tmp` folders this project writes (rank 0 at start-up).

    Only that temporary name is deleted: a `step_<N>` folder without `meta.json` was not written
    by arcscale (its own folders get their final name only once complete), so it is reported and
    left alone.
    """
    removed: list[str] = []
    if not os.path.isdir(root):
        return removed
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if not os.path.isdir(path):
            continue
        if TMP_RE.match(name):
            log(f"[checkpoint] removing incomplete checkpoint {path} (a run died while writing it)")
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        elif STEP_RE.match(name) and not os.path.isfile(os.path.join(path, "meta.json")):
            log(f"[checkpoint] ignoring {path}: no meta.json, not a checkpoint of arcscale")
    return removed


def foreign_checkpoints(root: str) -> list[str]:
    """`step_<N>` folders (complete or not) and `latest` under `root`: another run's state."""
    if not os.path.isdir(root):
        return []
    return sorted(
        os.path.join(root, n) for n in os.listdir(root) if STEP_RE.match(n) or n == "latest"
    )


def prepare_fresh_output(output: str, overwrite: bool, log: Log = print) -> None:
    """Start-up check of a run that does not resume (call before any process group starts).

    Raises:
        ConfigError: `output/checkpoints` holds another run's checkpoints and `overwrite` is
            false (a fresh run there would prune them by step number or be resumed as them).
    """
    root = checkpoint_root(output)
    found = foreign_checkpoints(root)
    if not found:
        return
    names = ", ".join(os.path.basename(p) for p in found[:4]) + (" ..." if len(found) > 4 else "")
    if not overwrite:
        raise ConfigError(
            f"output: {root} holds another run's checkpoints ({names}); continue it with "
            f"checkpoint.resume=true, pick another output, or set checkpoint.overwrite=true"
        )
    if int(os.environ.get("RANK", "0")) == 0:
        for path in found:
            log(f"[checkpoint] checkpoint.overwrite=true: removing {path}")
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)


def prune_checkpoints(root: str, keep_last: int, keep: str) -> list[str]:
    """Removes complete checkpoints beyond `keep_last`, never `keep` (the one just written),
    whatever the step numbers of the others; returns the removed paths."""
    others = [p for _, p in list_complete(root) if os.path.normpath(p) != os.path.normpath(keep)]
    removed = others[: max(len(others) - (keep_last - 1), 0)]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed
