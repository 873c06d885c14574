"""Reading a finished or running training run: the scalar series of its TensorBoard events.

Used by ``tools/plot_curves.py`` (curves of one run), ``tools/compare_runs.py`` (final
verification accuracy per arm over seeds) and the tests that check what a run logged. Every
event file under the folder is read (one run may hold several, e.g. after a resume) with
TensorBoard's ``event_accumulator``; points of one tag from several files are merged by step, a
later file winning on a repeated step (the resumed run).
"""

from __future__ import annotations

import os
import struct

from tensorboard.backend.event_processing import event_accumulator

__all__ = ["check_event_file", "find_event_dirs", "read_scalars"]


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


_PARTIAL_RECORD = 1 << 20  # a live run's last record may be cut short; no scalar event is 1 MiB


def check_event_file(path: str) -> None:
    """Walks the record frames of a TensorBoard event file (TFRecord: uint64 length, uint32
    length CRC, data, uint32 data CRC) reading only their 12-byte headers, so a record that
    declares more bytes than the file holds is refused before TensorBoard's reader allocates
    it (a 24-byte file declaring a 2^40-byte record raised MemoryError). A short last record
    under 1 MiB is left to the reader (a run still writing it).

    Raises:
        ValueError: names the file, the record's offset and declared length.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        offset = 0
        while offset + 12 <= size:
            f.seek(offset)
            (length,) = struct.unpack("<Q", f.read(8))
            end = offset + 12 + length + 4
            if end > size:
                if length > _PARTIAL_RECORD:
                    raise ValueError(
                        f"{path}: the record at byte {offset} declares {length} bytes but the "
                        f"file holds {size}: not a TensorBoard event file, or a damaged one"
                    )
                return
            offset = end


def read_scalars(root: str) -> dict[str, tuple[list[int], list[float]]]:
    """All scalar series under ``root``: tag -> (steps, values), sorted by step.

    Args:
        root: a run folder or a TensorBoard event folder (searched recursively).

    Returns:
        ``{tag: (steps, values)}``: steps ascending, one value per step (the last file's on a
        repeated step), values as logged (float32 read back as Python floats).

    Raises:
        FileNotFoundError: ``root`` is missing or holds no event file.
        ValueError: an event file with a record larger than the file (``check_event_file``).
    """
    merged: dict[str, dict[int, float]] = {}
    for d in find_event_dirs(root):
        for fname in sorted(f for f in os.listdir(d) if f.startswith("events.out.tfevents")):
            path = os.path.join(d, fname)
            check_event_file(path)
            acc = event_accumulator.EventAccumulator(
                path, size_guidance={event_accumulator.SCALARS: 0}
            )
            acc.Reload()
            for tag in acc.Tags()["scalars"]:
                series = merged.setdefault(tag, {})
                for ev in acc.Scalars(tag):
                    series[ev.step] = ev.value
    return {tag: (sorted(s), [s[k] for k in sorted(s)]) for tag, s in merged.items()}
