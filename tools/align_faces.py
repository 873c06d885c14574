"""Align faces to the ArcFace 112x112 template from 5-point landmarks, in parallel.

    python tools/align_faces.py LANDMARKS OUT_DIR [--root DIR] [--images DIR] [--workers N]
        [--quality 95] [--report PATH] [--no-progress]

LANDMARKS is a text file with one face per line: ``path x1 y1 x2 y2 x3 y3 x4 y4 x5 y5`` (left eye,
right eye, nose tip, left and right mouth corner, in pixels of the image), fields separated by
spaces, tabs or commas (CSV/TSV); an optional 12th field (a detector score, as in the IJB
``*_name_5pts_score.txt`` meta files) is ignored; blank lines, ``#`` comments and a header line
are skipped. Paths are relative to ``--root`` (default: the folder of LANDMARKS). Each face is
warped by the similarity transform of ``data/align.py`` (the one the IJB evaluation uses) and
written as JPEG to ``OUT_DIR/<path without extension>.jpg`` (``_2``, ``_3``... for further faces
of the same image), so an identity-per-folder layout stays one and ``tools/folder2rec.py`` packs
it.

Nothing is dropped silently: a malformed line, a missing or unreadable image, degenerate
landmarks, and with ``--images DIR`` every image under DIR that has no landmarks line, are
listed in the report (``path<TAB>reason``; ``--report``, default ``OUT_DIR/align_report.tsv``:
``tools/folder2rec.py`` lists that file as skipped, so put it elsewhere before packing) and
counted in the summary. A missing LANDMARKS file is a one-line error (exit 1).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import simplejpeg

from data.align import align_face
from data.atomic import atomic_path, same_place, write_text_atomic
from data.datasets import IMAGE_EXTENSIONS
from data.decode import decode_image
from data.face_jpeg import default_workers, progress_bar

REPORT = "align_report.tsv"
_SPLIT = re.compile(r"[\s,]+")

# (image path, landmarks (5, 2), output path, JPEG quality)
Job = tuple[str, np.ndarray, str, int]


@dataclass
class AlignSummary:
    """Counts, seconds, and every face or file not aligned as ``(path or file:line, reason)``."""

    aligned: int = 0
    seconds: float = 0.0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def lines(self, out_dir: str, report: str) -> list[str]:
        """Human-readable summary lines (the first 20 skipped entries)."""
        out = [
            f"aligned {self.aligned} faces into {out_dir} in {self.seconds:.1f} s; "
            f"skipped {len(self.skipped)} (listed in {report})"
        ]
        out += [f"  {where}: {why}" for where, why in self.skipped[:20]]
        return out


def parse_landmarks(
    path: str, root: str
) -> tuple[list[tuple[str, np.ndarray]], list[tuple[str, str]]]:
    """Read a landmarks file.

    Args:
        path: the LANDMARKS file (see the module docstring). root: folder image paths are
            relative to (absolute paths are kept).

    Returns:
        (faces: ``(image path, float64 (5, 2) landmarks)`` in file order, bad lines:
        ``("FILE:LINE", reason)``).

    Raises:
        FileNotFoundError: ``path`` missing. OSError: unreadable.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: landmarks file not found")
    faces, bad = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            fields = _SPLIT.split(text)
            where = f"{path}:{lineno}"
            try:
                values = np.array([float(v) for v in fields[1:11]], dtype=np.float64)
                if len(fields) >= 13:
                    raise ValueError
                if len(fields) == 12:
                    float(fields[11])  # a detector score
            except ValueError:
                if lineno == 1 and len(fields) > 1 and not _is_number(fields[1]):
                    continue  # a header line such as 'path,x1,y1,...'
                bad.append((where, f"expected 'path x1 y1 ... x5 y5 [score]', got {text[:80]!r}"))
                continue
            if len(values) != 10:
                bad.append((where, f"expected 10 coordinates, got {len(values)}: {text[:80]!r}"))
                continue
            faces.append((os.path.join(root, fields[0]), values.reshape(5, 2)))
    return faces, bad


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _output_paths(faces: list[tuple[str, np.ndarray]], root: str, out_dir: str) -> list[str]:
    """``OUT_DIR/<path relative to root, .jpg>``, ``_2``, ``_3``... for repeated images; never
    one name twice (``a.png`` twice and ``a_2.png`` give ``a``, ``a_2`` and ``a_2_2``)."""
    seen: dict[str, int] = {}
    taken: set[str] = set()
    out = []
    for image, _ in faces:
        rel = os.path.splitext(os.path.relpath(image, root))[0]
        if rel.startswith(".."):  # outside the root: keep the name only
            rel = os.path.basename(rel)
        n = seen.get(rel, 0) + 1
        while (name := f"{rel}_{n}" if n > 1 else rel) in taken:
            n += 1
        seen[rel] = n
        taken.add(name)
        out.append(os.path.join(out_dir, f"{name}.jpg"))
    return out


def align_job(job: Job) -> str | None:
    """Align one face and write its JPEG atomically; returns None, or the reason it failed."""
    image_path, landmarks, out_path, quality = job
    try:
        with open(image_path, "rb") as f:
            image = decode_image(f.read(), where=image_path)
        crop = align_face(image, landmarks)
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
        with atomic_path(out_path, fsync=False) as tmp, open(tmp, "wb") as f:
            f.write(simplejpeg.encode_jpeg(crop, quality=quality, colorspace="RGB"))
    except FileNotFoundError:
        return "image file not found"
    except (OSError, ValueError) as e:
        return str(e).replace(f"{image_path}: ", "")
    return None


def _results(jobs: list[Job], workers: int) -> Iterator[str | None]:
    if workers <= 1:
        yield from map(align_job, jobs)
        return
    with mp.Pool(workers) as pool:
        yield from pool.imap(align_job, jobs, chunksize=8)


def unlisted_images(images_dir: str, listed: set[str]) -> list[str]:
    """Image files under ``images_dir`` (recursively, sorted; absolute paths) whose absolute path
    is not in ``listed``."""
    out = []
    for folder, dirs, files in os.walk(images_dir):
        dirs.sort()
        for name in sorted(files):
            path = os.path.abspath(os.path.join(folder, name))
            if name.lower().endswith(IMAGE_EXTENSIONS) and path not in listed:
                out.append(path)
    return out


def align_faces(
    landmarks: str,
    out_dir: str,
    root: str | None = None,
    images_dir: str | None = None,
    workers: int = 1,
    quality: int = 95,
    progress: bool = True,
    report: str | None = None,
) -> AlignSummary:
    """Align every face of ``landmarks`` into ``out_dir`` and write the report.

    Args:
        landmarks: the landmarks file. out_dir: output folder (created).
        root: folder the image paths are relative to (default: the landmarks file's folder).
        images_dir: also report every image under it that has no landmarks line.
        workers: processes (1: this one). quality: JPEG quality 1..100. progress: rich bar.
        report: the report file (default ``out_dir/align_report.tsv``).

    Returns:
        AlignSummary; the report lists its ``skipped`` entries.

    Raises:
        FileNotFoundError: ``landmarks`` or ``images_dir`` missing.
        ValueError: an output file would be a source image (``out_dir`` is, or links to, the
            image root and the images are JPEGs); nothing is written.
    """
    t0 = time.perf_counter()
    root = root if root is not None else os.path.dirname(os.path.abspath(landmarks))
    faces, bad = parse_landmarks(landmarks, root)
    summary = AlignSummary(skipped=bad)
    if images_dir is not None:
        if not os.path.isdir(images_dir):
            raise FileNotFoundError(f"{images_dir}: --images folder not found")
        listed = {os.path.abspath(p) for p, _ in faces}
        summary.skipped += [(p, "no landmarks line") for p in unlisted_images(images_dir, listed)]
    outputs = _output_paths(faces, root, out_dir)
    for (image, _), out in zip(faces, outputs):
        if same_place(image, out):  # e.g. OUT_DIR is the image root (or a link to it), JPEGs
            raise ValueError(
                f"{out}: would overwrite the source image {image}; pick another OUT_DIR"
            )
    os.makedirs(out_dir, exist_ok=True)
    jobs = [(image, lm, out, quality) for (image, lm), out in zip(faces, outputs)]
    with progress_bar(progress) as bar:
        task = bar.add_task("aligning", total=len(jobs))
        for (image, _), error in zip(faces, _results(jobs, workers)):
            bar.advance(task)
            if error is None:
                summary.aligned += 1
            else:
                summary.skipped.append((image, error))
    rows = "".join(f"{where}\t{why}\n" for where, why in summary.skipped)
    write_text_atomic(report or os.path.join(out_dir, REPORT), "path\treason\n" + rows)
    summary.seconds = time.perf_counter() - t0
    return summary


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("landmarks", help="text file: path x1 y1 ... x5 y5 [score] per face")
    p.add_argument("out_dir", help="output folder for the 112x112 crops and align_report.tsv")
    p.add_argument("--root", help="folder the image paths are relative to (default: LANDMARKS')")
    p.add_argument("--images", help="also report every image under this folder without landmarks")
    p.add_argument("--workers", type=int, default=default_workers())
    p.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95)")
    p.add_argument("--report", help=f"report file (default OUT_DIR/{REPORT})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 1 bad input, 2 usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers < 1 or not 1 <= args.quality <= 100:
        parser.error("--workers must be >= 1 and --quality 1..100")
    try:
        summary = align_faces(
            args.landmarks,
            args.out_dir,
            args.root,
            args.images,
            args.workers,
            args.quality,
            not args.no_progress,
            args.report,
        )
    except (OSError, ValueError) as e:
        print(f"align_faces: error: {e}", file=sys.stderr)
        return 1
    report = args.report or os.path.join(args.out_dir, REPORT)
    print("\n".join(summary.lines(args.out_dir, report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
