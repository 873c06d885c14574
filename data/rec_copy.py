"""Copy the images of an insightface ``.rec``/``.idx`` pair, in a chosen order, into a new pair.

The library side of ``tools/shuffle_rec.py`` (a seeded permutation), ``tools/folder2rec.py
--shuffle`` and ``tools/clean_subcenters.py`` (a subset): reading, layout and atomic writing of
the copy live here; the scripts keep only their command lines.

Each record is copied byte for byte: new image key ``first + k`` holds the record of source image
``order[k]`` (``shuffle_rec``: ``order`` = ``numpy.random.default_rng(seed).permutation(N)``). The
layout stays insightface's: with a header record (key 0) images are keys 1..M followed by one
identity record per identity, whose image range is empty (``[M+1, M+1)``: a shuffled file has no
contiguous identity ranges); without one, images are keys 0..M-1. ``train.lst`` (rewritten in the
new order) and ``property`` come along when the source folder has them.

Memory is bounded: 16 B per image (the offsets and the permutation: ~0.7 GB at 42M images) plus a
window of records read ahead by ``threads`` threads (``os.pread``, in the new order); the files
are written under temporary names and appear together at the end.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any

import numpy as np
from numpy.typing import NDArray

from data.atomic import atomic_path, same_place
from data.face_jpeg import progress_bar
from data.image_index import ImageIndex, image_index_of
from data.recordio import IRHeader, RecordIOReader, RecordIOWriter, pack, unpack

__all__ = [
    "WINDOW",
    "ShuffleSummary",
    "check_output_folder",
    "copy_records",
    "header_of",
    "shuffle_rec",
    "source_paths",
]

WINDOW = 1024  # records read ahead (x ~10 KiB per 112x112 JPEG: ~10 MiB)


@dataclasses.dataclass
class ShuffleSummary:
    """What ``shuffle_rec`` wrote: counts, ``train.rec`` bytes, seconds, the copied side files."""

    out_dir: str
    num_images: int
    identity_records: int
    rec_bytes: int
    seconds: float
    copied: list[str]

    def line(self) -> str:
        """One human-readable line."""
        extra = f", {' and '.join(self.copied)} rewritten" if self.copied else ""
        return (
            f"shuffled {self.num_images} images ({self.identity_records} identity records) into "
            f"{self.out_dir}/train.rec ({self.rec_bytes / 2**20:.1f} MiB) in {self.seconds:.1f} s"
            f"{extra}"
        )


def source_paths(src: str) -> tuple[str, str]:
    """(``.rec``, ``.idx``) of SRC, a ``.rec`` file or a folder holding ``train.rec``.

    Raises:
        FileNotFoundError: either file missing (the message names it).
    """
    rec = os.path.join(src, "train.rec") if os.path.isdir(src) else src
    idx = os.path.splitext(rec)[0] + ".idx"
    for path in (rec, idx):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: file not found")
    return rec, idx


def _records(reader: RecordIOReader, offsets: NDArray[np.int64], threads: int) -> Iterator[bytes]:
    """The records at ``offsets``, in that order, read ``WINDOW`` at a time by ``threads``."""
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="shuffle-read") as pool:
        for start in range(0, len(offsets), WINDOW):
            window = offsets[start : start + WINDOW].tolist()
            yield from pool.map(lambda off: reader.read_at(off)[0], window)


def _lst_rows(path: str, n: int) -> NDArray[np.int64] | None:
    """Byte offset of each of the ``n`` lines of ``path`` (None unless it has exactly ``n``)."""
    starts, pos = [], 0
    with open(path, "rb") as f:
        for line in f:
            starts.append(pos)
            pos += len(line)
    return np.asarray(starts, dtype=np.int64) if len(starts) == n else None


def _write_lst(src: str, dst: str, rows: NDArray[np.int64], perm: NDArray[Any], first: int) -> None:
    """``train.lst`` in the new order, each line's key replaced by its new key."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        for new, old in enumerate(perm.tolist()):
            fin.seek(int(rows[old]))
            fields = fin.readline().rstrip(b"\r\n").split(b"\t", 1)
            fout.write(b"%d\t%s\n" % (new + first, fields[-1]))


def shuffle_rec(
    src: str, out_dir: str, seed: int = 0, threads: int = 8, progress: bool = True
) -> ShuffleSummary:
    """Write ``out_dir/train.rec|idx`` with the images of ``src`` in a seeded random order.

    Args:
        src: a ``.rec`` file (``.idx`` beside it) or a folder holding ``train.rec``/``train.idx``.
        out_dir: output folder (created); must not be the source folder.
        seed: seed of ``numpy.random.default_rng(seed).permutation``.
        threads: reader threads (``os.pread`` releases the GIL: hides storage latency).
        progress: show a rich progress bar.

    Returns:
        ShuffleSummary.

    Raises:
        FileNotFoundError: a missing ``.rec``/``.idx``. ValueError: ``out_dir`` is the source
            folder, or the index is malformed or lists no image (RecordIOError included).
    """
    t0 = time.perf_counter()
    rec, idx = source_paths(src)
    reader = RecordIOReader(rec, idx)
    index = image_index_of(reader, rec)
    perm = np.random.default_rng(seed).permutation(len(index))
    return copy_records(rec, reader, index, out_dir, perm, threads, progress, "shuffling", t0)


def check_output_folder(rec: str, out_dir: str) -> str:
    """The folder of ``rec``; ValueError when ``out_dir`` is that folder (it would be
    overwritten while read)."""
    src_dir = os.path.dirname(os.path.abspath(rec))
    if same_place(out_dir, src_dir):  # a symlink to the source folder included
        raise ValueError(
            f"{out_dir}: the output folder must differ from the source folder {src_dir}"
        )
    return src_dir


def copy_records(
    rec: str,
    reader: RecordIOReader,
    index: ImageIndex,
    out_dir: str,
    order: NDArray[Any],
    threads: int = 8,
    progress: bool = True,
    desc: str = "copying",
    t0: float | None = None,
) -> ShuffleSummary:
    """Write ``out_dir/train.rec|idx`` holding the images ``order`` of ``rec``, in that order.

    Records are copied byte for byte (labels included); new image key ``first + k`` holds
    source image ``order[k]`` (``first`` = 1 with an insightface header record, else 0). The
    identity records keep their count with an empty image range. ``train.lst`` (rewritten in
    the new order, when the source has one line per image) and ``property`` come along. Used by
    ``shuffle_rec`` (a permutation) and ``tools/clean_subcenters.py`` (a subset).

    Args:
        rec: the source ``.rec`` path; reader, index: its open reader and image index.
        out_dir: output folder (created); must not be the source folder.
        order: (M,) int indices into ``index`` (a permutation, or a subset, any order).
        threads, progress: as for ``shuffle_rec``; desc: the progress bar's label.
        t0: ``time.perf_counter()`` at the start, for the summary's seconds.

    Raises:
        ValueError: ``out_dir`` is the source folder, or ``order`` is out of range.
    """
    t0 = time.perf_counter() if t0 is None else t0
    src_dir = check_output_folder(rec, out_dir)
    n, m = len(index), len(order)
    if m and (int(order.min()) < 0 or int(order.max()) >= n):
        raise ValueError(f"{rec}: image order out of range [0, {n})")
    first = 0 if header_of(reader) is None else 1  # insightface: images at keys 1..N
    ids = index.identity_keys
    num_ids = 0 if ids is None else max(0, ids[1] - ids[0])
    os.makedirs(out_dir, exist_ok=True)
    lst_src = os.path.join(src_dir, "train.lst")
    rows = _lst_rows(lst_src, n) if os.path.isfile(lst_src) else None
    copied = []
    with ExitStack() as stack:  # all files appear together at the end, or none
        tmp_rec = stack.enter_context(atomic_path(os.path.join(out_dir, "train.rec")))
        tmp_idx = stack.enter_context(atomic_path(os.path.join(out_dir, "train.idx")))
        bar = stack.enter_context(progress_bar(progress))
        task = bar.add_task(desc, total=m)
        with RecordIOWriter(tmp_rec, tmp_idx) as writer:
            if first:
                end = m + 1
                writer.write(0, pack(IRHeader(2, [end, end + num_ids], 0, 0), b""))
            for k, record in enumerate(_records(reader, index.offsets[order], threads)):
                writer.write(first + k, record)
                bar.advance(task)
            if first:
                for c in range(num_ids):  # empty image range: no contiguous identities
                    writer.write(end + c, pack(IRHeader(2, [end, end], end + c, 0), b""))
        if rows is not None:
            tmp_lst = stack.enter_context(atomic_path(os.path.join(out_dir, "train.lst")))
            _write_lst(lst_src, tmp_lst, rows, order, first)
            copied.append("train.lst")
        prop = os.path.join(src_dir, "property")
        if os.path.isfile(prop):
            tmp_prop = stack.enter_context(atomic_path(os.path.join(out_dir, "property")))
            shutil.copyfile(prop, tmp_prop)
            copied.append("property")
    size = os.path.getsize(os.path.join(out_dir, "train.rec"))
    return ShuffleSummary(out_dir, m, num_ids, size, time.perf_counter() - t0, copied)


def header_of(reader: RecordIOReader) -> IRHeader | None:
    """The insightface header record (key 0, ``flag > 0``) of an open reader, or None."""
    if 0 not in reader:
        return None
    head, _ = unpack(reader.read(0))
    return head if head.flag > 0 else None
