"""Pack face images into an insightface-style RecordIO training set (``train.rec/.idx/.lst``).

``scan_folder`` lists an image folder with one sub-folder per identity; ``convert`` encodes a list
of (path, label) samples (``data/face_jpeg.py``) into ``train.rec``, ``train.idx``, ``train.lst``
(im2rec format ``key\\tlabel\\tpath``) and ``property`` (``num_classes,size,size``). With
``insightface_header`` the layout is insightface's: key 0 = header (label ``[first identity key,
end key)``), images at keys 1..N, identity records (label ``[first image key, end key)``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable
from contextlib import ExitStack

from data.atomic import atomic_path
from data.datasets import IMAGE_EXTENSIONS
from data.face_jpeg import Box, EncodeResult, encoded, progress_bar
from data.recordio import IRHeader, RecordIOWriter, frame_record, pack

_OUTPUTS = ("train.rec", "train.idx", "train.lst", "property")


@dataclasses.dataclass
class ConvertSummary:
    """What ``convert`` wrote: counts, sizes (bytes), time (s) and every skipped file + reason."""

    out_dir: str
    num_classes: int
    num_images: int
    rec_bytes: int
    copied: int
    reencoded: int
    seconds: float
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (path, reason)
    empty_classes: list[int] = dataclasses.field(default_factory=list)  # labels with no image

    def lines(self) -> list[str]:
        """Human-readable summary lines."""
        out = [
            f"identities: {self.num_classes}   images: {self.num_images} "
            f"({self.copied} copied, {self.reencoded} re-encoded)   "
            f"train.rec: {self.rec_bytes / 2**20:.1f} MiB   time: {self.seconds:.1f} s",
            f"skipped files: {len(self.skipped)}",
        ]
        out += [f"  {path}: {reason}" for path, reason in self.skipped]
        if self.empty_classes:
            out.append(f"WARNING: labels with no image left: {self.empty_classes}")
        return out


_LST_BREAKERS = ("\t", "\n", "\r")  # train.lst is 'key<TAB>label<TAB>path<NEWLINE>'


def lst_unsafe(name: str) -> str | None:
    """Why ``name`` cannot be written to ``train.lst`` (a tab or line break), or None."""
    if any(c in name for c in _LST_BREAKERS):
        return f"name {name!r} holds a tab or line break (would corrupt train.lst)"
    return None


def scan_folder(
    src_dir: str, min_images: int = 1
) -> tuple[list[tuple[str, int]], list[str], list[tuple[str, str]]]:
    """List ``src_dir/<identity>/<image>`` files.

    Args:
        src_dir: root folder, one sub-folder per identity.
        min_images: identities with fewer image files are left out (and reported).
    Returns:
        (samples: list of (path, label) grouped by label, names: list of identity names by label,
        skipped: list of (path, reason) for every file or folder not used).
    Raises:
        FileNotFoundError: ``src_dir`` missing. ValueError: no identity left.
    """
    if not os.path.isdir(src_dir):
        raise FileNotFoundError(f"{src_dir}: source folder not found")
    samples: list[tuple[str, int]] = []
    names: list[str] = []
    skipped: list[tuple[str, str]] = []
    for entry in sorted(os.listdir(src_dir)):
        folder = os.path.join(src_dir, entry)
        if not os.path.isdir(folder):
            skipped.append((folder, "not an identity folder (a file at the top level)"))
            continue
        if why := lst_unsafe(entry):
            skipped.append((folder, f"identity folder left out: {why}"))
            continue
        files: list[str] = []
        others: list[str] = []
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if why := lst_unsafe(name):
                skipped.append((path, why))
                continue
            ok = os.path.isfile(path) and name.lower().endswith(IMAGE_EXTENSIONS)
            (files if ok else others).append(path)
        skipped += [(p, f"not an image file ({', '.join(IMAGE_EXTENSIONS)})") for p in others]
        if len(files) < min_images:
            skipped += [(p, f"identity has {len(files)} < --min-images images") for p in files]
            if not files:
                skipped.append((folder, "identity folder without images"))
            continue
        samples += [(p, len(names)) for p in files]
        names.append(entry)
    if not names:
        raise ValueError(f"{src_dir}: no identity folder with at least {min_images} image(s)")
    return samples, names, skipped


def convert(
    samples: list[tuple[str, int]],
    out_dir: str | os.PathLike[str],
    *,
    crop: Box | None = None,
    size: int = 112,
    quality: int = 95,
    workers: int = 1,
    insightface_header: bool = False,
    num_classes: int | None = None,
    root: str | None = None,
    progress: bool = True,
) -> ConvertSummary:
    """Encode ``samples`` into ``out_dir/train.rec|idx|lst`` + ``property``.

    Args:
        samples: list of (image path, int label); stably sorted by label before writing.
        out_dir: output folder (created); existing outputs are replaced only at the very end.
        crop, size, quality: see ``data.face_jpeg.encode_face``.
        workers: encoding processes (1 = in this process).
        insightface_header: write insightface's header record 0 and identity records.
        num_classes: C for ``property``; default max label + 1. Labels must lie in [0, C).
        root: if given, ``train.lst`` stores paths relative to it.
        progress: show a progress bar.
    Returns:
        ConvertSummary. Unreadable images, and paths holding a tab or line break (they would
        corrupt ``train.lst``), are skipped and listed there, never silently.
    Raises:
        ValueError: empty samples, a label outside [0, C), or nothing could be encoded.
    """
    t0 = time.perf_counter()
    if not samples:
        raise ValueError("convert: no samples given")
    samples = sorted(samples, key=lambda s: int(s[1]))
    labels = [int(label) for _, label in samples]
    num_classes = labels[-1] + 1 if num_classes is None else int(num_classes)
    if labels[0] < 0 or labels[-1] >= num_classes:
        raise ValueError(
            f"convert: labels span [{labels[0]}, {labels[-1]}], need [0, {num_classes})"
        )
    os.makedirs(out_dir, exist_ok=True)
    summary = ConvertSummary(str(out_dir), num_classes, 0, 0, 0, 0, 0.0)
    jobs = [(path, crop, size, quality) for path, _ in samples]
    with ExitStack() as stack:  # all four files appear together at the end, or none
        tmp = {n: stack.enter_context(atomic_path(os.path.join(out_dir, n))) for n in _OUTPUTS}
        results = stack.enter_context(encoded(jobs, workers))
        ranges = _write_records(tmp, samples, results, summary, insightface_header, root, progress)
        with open(tmp["property"], "w", encoding="ascii") as f:
            f.write(f"{num_classes},{size},{size}\n")
    summary.rec_bytes = os.path.getsize(os.path.join(out_dir, "train.rec"))
    summary.empty_classes = [c for c in range(num_classes) if c not in ranges]
    summary.seconds = time.perf_counter() - t0
    return summary


def _write_records(
    tmp: dict[str, str],
    samples: list[tuple[str, int]],
    results: Iterable[EncodeResult],
    summary: ConvertSummary,
    insightface_header: bool,
    root: str | None,
    progress: bool,
) -> dict[int, list[int]]:
    """Write the images (and header / identity records) to the temporary ``.rec/.idx/.lst``;
    count them in ``summary``; returns label -> [first image key, end key)."""
    num_classes = summary.num_classes
    key = 1 if insightface_header else 0
    ranges: dict[int, list[int]] = {}  # label -> [first image key, end key)
    bar = progress_bar(progress)
    with (
        RecordIOWriter(tmp["train.rec"], tmp["train.idx"]) as writer,
        open(tmp["train.lst"], "w", encoding="utf-8") as lst,
        bar,
    ):
        task = bar.add_task("encoding", total=len(samples))
        if insightface_header:  # placeholder, rewritten in place once the counts are known
            writer.write(0, pack(IRHeader(0, [0, 0], 0, 0), b""))
        for (path, label), (jpeg, copied, error) in zip(samples, results):
            bar.advance(task)
            shown = os.path.relpath(path, root) if root else path
            error = error if jpeg is None else lst_unsafe(shown)
            if error is not None or jpeg is None:  # encode_job gives an error with every None
                summary.skipped.append((path, error or "could not be encoded"))
                continue
            writer.write(key, pack(IRHeader(0, float(label), key, 0), jpeg))
            lst.write(f"{key}\t{float(label):f}\t{shown}\n")
            ranges.setdefault(int(label), [key, key])[1] = key + 1
            summary.copied += copied
            summary.reencoded += not copied
            key += 1
        summary.num_images = len(samples) - len(summary.skipped)
        if summary.num_images == 0:
            raise ValueError(f"convert: no image could be encoded (first: {summary.skipped[0]})")
        if insightface_header:
            first_id = key
            for c in range(num_classes):
                start, end = ranges.get(c, [key, key])
                writer.write(first_id + c, pack(IRHeader(0, [start, end], first_id + c, 0), b""))
    if insightface_header:
        # Same 40 bytes as the placeholder: fixed-size header, two float32 labels, no magic.
        head = frame_record(pack(IRHeader(0, [first_id, first_id + num_classes], 0, 0), b""))
        with open(tmp["train.rec"], "r+b") as f:
            f.write(head)
    return ranges
