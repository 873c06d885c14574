"""Reading a finished or running training run: the scalar series of its TensorBoard events.

Used by ``tools/plot_curves.py`` (curves of one run), ``tools/compare_runs.py`` (final
verification accuracy per arm over seeds) and the tests that check what a run logged. Every
event file under the folder is read (one run may hold several, e.g. after a resume) with
TensorBoard's ``event_accumulator``; points of one tag from several files are merged by step, a
later file winning on a repeated step (the resumed run).
"""

from __future__ import annotations

import os

from tensorboard.backend.event_processing import event_accumulator

__all__ = ["find_event_dirs", "read_scalars"]


def find_event_dirs(root: str) -> list[str]:
    """Folders under ``root`` (itself included) holding ``events.out.tfevents*`` files, sorted.

    Raises:
        FileNotFoundError: ``root`` is missing or holds no event file.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no run folder {root}")
    found = sorted(
        d
        for d, _, files in os.walk(root)
        if any(f.startswith("events.out.tfevents") for f in files)
    )
    if not found:
        raise FileNotFoundError(f"no events.out.tfevents* file under {root}")
    return found


def read_scalars(root: str) -> dict[str, tuple[list[int], list[float]]]:
    """All scalar series under ``root``: tag -> (steps, values), sorted by step.

    Args:
        root: a run folder or a TensorBoard event folder (searched recursively).

    Returns:
        ``{tag: (steps, values)}``: steps ascending, one value per step (the last file's on a
        repeated step), values as logged (float32 read back as Python floats).

    Raises:
        FileNotFoundError: ``root`` is missing or holds no event file.
    """
    merged: dict[str, dict[int, float]] = {}
    for d in find_event_dirs(root):
        for fname in sorted(f for f in os.listdir(d) if f.startswith("events.out.tfevents")):
            acc = event_accumulator.EventAccumulator(
                os.path.join(d, fname), size_guidance={event_accumulator.SCALARS: 0}
            )
            acc.Reload()
            for tag in acc.Tags()["scalars"]:
                series = merged.setdefault(tag, {})
                for ev in acc.Scalars(tag):
                    series[ev.step] = ev.value
    return {tag: (sorted(s), [s[k] for k in sorted(s)]) for tag, s in merged.items()}
