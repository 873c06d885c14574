"""Face crops as JPEG bytes: read an image file, crop, resize, encode; in worker processes.

The one encoder behind the dataset builders (``data/pack_rec.py`` for a training ``.rec``,
``data/lfw.py`` for a verification ``.bin``).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, NotRequired, TypedDict

import cv2
import numpy as np
import simplejpeg

from data.decode import decode_image

if TYPE_CHECKING:
    from rich.progress import Progress

Box = tuple[int, int, int, int]
EncodeJob = tuple[str, "Box | None", int, int]  # (path, crop, size, quality)
EncodeResult = tuple[bytes | None, bool, str | None]  # (jpeg or None, copied, error or None)


class EncodingOptions(TypedDict):
    """Keyword arguments of the dataset builders, from ``encoding_options``."""

    crop: NotRequired[Box | None]  # only for a parser with ``--crop``
    size: int
    quality: int
    workers: int
    progress: bool


def check_crop(box: Sequence[int] | None) -> Box | None:
    """A crop box (left, top, right, bottom) as a tuple of 4 ints, or None for no crop.

    Raises:
        ValueError: not 4 values, or not ``0 <= left < right`` and ``0 <= top < bottom``.
    """
    if box is None:
        return None
    if len(box) != 4:
        raise ValueError(f"crop box {tuple(box)}: need 4 values L T R B")
    left, top, right, bottom = (int(v) for v in box)
    if not (0 <= left < right and 0 <= top < bottom):
        raise ValueError(f"crop box {tuple(box)}: need 0 <= L < R and 0 <= T < B")
    return left, top, right, bottom


def encode_face(
    path: str, crop: Box | None = None, size: int = 112, quality: int = 95
) -> tuple[bytes, bool]:
    """Read one image file, crop it, resize it to ``size`` x ``size`` and JPEG-encode it.

    Args:
        path: image file (JPEG/PNG/BMP/WebP).
        crop: None or box (left, top, right, bottom) in pixels, right/bottom exclusive.
        size: output side in pixels.
        quality: JPEG quality 1..100.
    Returns:
        (jpeg bytes, copied: bool). A JPEG that already is ``size`` x ``size`` with no crop is
        returned unchanged (copied=True) to avoid a second lossy encode.
    Raises:
        OSError: unreadable file. ValueError: undecodable image or crop box outside the image.
    """
    with open(path, "rb") as f:
        buf = f.read()
    img = decode_image(buf, where=str(path))
    h, w = img.shape[:2]
    if crop is None and (h, w) == (size, size) and simplejpeg.is_jpeg(buf):
        return buf, True
    if crop is not None:
        left, top, right, bottom = crop
        if not (0 <= left < right <= w and 0 <= top < bottom <= h):
            raise ValueError(f"crop box {tuple(crop)} is outside the {w}x{h} image")
        img = img[top:bottom, left:right]
    if img.shape[:2] != (size, size):
        shrink = img.shape[0] > size or img.shape[1] > size
        interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
        img = np.asarray(cv2.resize(img, (size, size), interpolation=interp), dtype=np.uint8)
    jpeg = simplejpeg.encode_jpeg(np.ascontiguousarray(img), quality=quality, colorspace="RGB")
    return jpeg, False


def encode_job(job: EncodeJob) -> EncodeResult:
    """``encode_face(*job)`` for a worker pool: returns (jpeg or None, copied, error or None)."""
    path, crop, size, quality = job
    try:
        jpeg, copied = encode_face(path, crop, size, quality)
        return jpeg, copied, None
    except (OSError, ValueError) as e:
        return None, False, str(e).replace(f"{path}: ", "")


@contextmanager
def encoded(jobs: Sequence[EncodeJob], workers: int = 1) -> Iterator[Iterable[EncodeResult]]:
    """``encode_job`` results in job order, from ``workers`` processes (1 = this process).

    A context manager: leaving it (also by an exception) terminates the pool.
    """
    pool = mp.Pool(workers) if workers > 1 else None
    try:
        yield pool.imap(encode_job, jobs, chunksize=8) if pool else map(encode_job, jobs)
    finally:
        if pool is not None:
            pool.terminate()


def progress_bar(enabled: bool) -> Progress:
    """A rich progress bar (count, ETA); a no-op when ``enabled`` is False."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    cols = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    return Progress(*cols, disable=not enabled)


def default_workers() -> int:
    """Encoding processes a command line uses by default: the CPU count, at most 8."""
    return min(8, os.cpu_count() or 1)


def add_encoding_arguments(parser: argparse.ArgumentParser, crop: bool = True) -> None:
    """The encoder's command-line options: ``--crop L T R B`` (when ``crop``), ``--size``,
    ``--quality``, ``--workers`` (``default_workers()``) and ``--no-progress``."""
    if crop:
        box = ("L", "T", "R", "B")
        parser.add_argument("--crop", type=int, nargs=4, metavar=box, help="crop box")
    parser.add_argument("--size", type=int, default=112, help="output side in pixels (default 112)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95)")
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def encoding_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> EncodingOptions:
    """The options of ``add_encoding_arguments`` as keyword arguments of the dataset builders
    (``crop`` when the parser has it, ``size``, ``quality``, ``workers``, ``progress``).

    Bad values end the program through ``parser.error`` (exit status 2).
    """
    opts: EncodingOptions = {
        "size": args.size,
        "quality": args.quality,
        "workers": args.workers,
        "progress": not args.no_progress,
    }
    if not 1 <= args.quality <= 100 or args.size < 1 or args.workers < 1:
        parser.error("--quality must be 1..100; --size and --workers >= 1")
    if hasattr(args, "crop"):
        try:
            opts["crop"] = check_crop(args.crop)
        except ValueError as e:
            parser.error(f"--crop: {e}")
    return opts
