"""Pack an image folder (one sub-folder per identity) into an insightface-style RecordIO dataset.

    python tools/folder2rec.py SRC_DIR OUT_DIR [--crop L T R B] [--size 112] [--quality 95]
        [--workers N] [--insightface-header] [--min-images 1]

Writes ``OUT_DIR/train.rec``, ``train.idx``, ``train.lst`` (im2rec format ``key\\tlabel\\tpath``)
and ``property`` (``num_classes,size,size``). Identities are the sorted sub-folder names, labelled
0..C-1. Images are optionally cropped to a box, resized to ``size`` x ``size`` and JPEG-encoded in
worker processes; images that already have the target size and are JPEG (with no crop) are copied
as they are. Everything is written under temporary names and renamed at the end. With
``--insightface-header`` the layout is insightface's: key 0 = header (label ``[first identity
key, end key)``), images at keys 1..N, identity records (label ``[first image key, end key)``).
"""

import argparse
import dataclasses
import multiprocessing as mp
import os
import sys
import time

import cv2
import numpy as np
import simplejpeg

if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.decode import decode_image
from data.recordio import IRHeader, RecordIOWriter, frame_record, pack

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
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
    skipped: list = dataclasses.field(default_factory=list)  # (path, reason)
    empty_classes: list = dataclasses.field(default_factory=list)  # labels left with no image

    def lines(self):
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


def encode_face(path, crop=None, size=112, quality=95):
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
        img = cv2.resize(img, (size, size), interpolation=interp)
    jpeg = simplejpeg.encode_jpeg(np.ascontiguousarray(img), quality=quality, colorspace="RGB")
    return jpeg, False


def encode_job(job):
    """``encode_face(*job)`` for a worker pool: returns (jpeg or None, copied, error or None)."""
    path, crop, size, quality = job
    try:
        jpeg, copied = encode_face(path, crop, size, quality)
        return jpeg, copied, None
    except (OSError, ValueError) as e:
        return None, False, str(e).replace(f"{path}: ", "")


_LST_BREAKERS = ("\t", "\n", "\r")  # train.lst is 'key<TAB>label<TAB>path<NEWLINE>'


def lst_unsafe(name):
    """Why ``name`` cannot be written to ``train.lst`` (a tab or line break), or None."""
    if any(c in name for c in _LST_BREAKERS):
        return f"name {name!r} holds a tab or line break (would corrupt train.lst)"
    return None


def scan_folder(src_dir, min_images=1):
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
    samples, names, skipped = [], [], []
    for entry in sorted(os.listdir(src_dir)):
        folder = os.path.join(src_dir, entry)
        if not os.path.isdir(folder):
            skipped.append((folder, "not an identity folder (a file at the top level)"))
            continue
        if why := lst_unsafe(entry):
            skipped.append((folder, f"identity folder left out: {why}"))
            continue
        files, others = [], []
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if why := lst_unsafe(name):
                skipped.append((path, why))
                continue
            ok = os.path.isfile(path) and name.lower().endswith(IMAGE_EXTS)
            (files if ok else others).append(path)
        skipped += [(p, f"not an image file ({', '.join(IMAGE_EXTS)})") for p in others]
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


def progress_bar(enabled):
    """A rich progress bar (count, ETA); a no-op when ``enabled`` is False."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    cols = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    return Progress(*cols, disable=not enabled)


def convert(
    samples,
    out_dir,
    *,
    crop=None,
    size=112,
    quality=95,
    workers=1,
    insightface_header=False,
    num_classes=None,
    root=None,
    progress=True,
):
    """Encode ``samples`` into ``out_dir/train.rec|idx|lst`` + ``property``.

    Args:
        samples: list of (image path, int label); stably sorted by label before writing.
        out_dir: output folder (created); existing outputs are replaced only at the very end.
        crop, size, quality: see ``encode_face``.
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
    tmp = {name: os.path.join(out_dir, f".{name}.tmp-{os.getpid()}") for name in _OUTPUTS}
    summary = ConvertSummary(str(out_dir), num_classes, 0, 0, 0, 0, 0.0)
    key = 1 if insightface_header else 0
    ranges = {}  # label -> [first image key, end key)
    jobs = [(path, crop, size, quality) for path, _ in samples]
    pool = mp.Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(encode_job, jobs, chunksize=8) if pool else map(encode_job, jobs)
        bar = progress_bar(progress)
        with (
            RecordIOWriter(tmp["train.rec"], tmp["train.idx"]) as writer,
            open(tmp["train.lst"], "w", encoding="utf-8") as lst,
            bar,
        ):
            task = bar.add_task("encoding", total=len(jobs))
            if insightface_header:  # placeholder, rewritten in place once the counts are known
                writer.write(0, pack(IRHeader(0, [0, 0], 0, 0), b""))
            for (path, label), (jpeg, copied, error) in zip(samples, results):
                bar.advance(task)
                shown = os.path.relpath(path, root) if root else path
                error = error if jpeg is None else lst_unsafe(shown)
                if error is not None:
                    summary.skipped.append((path, error))
                    continue
                writer.write(key, pack(IRHeader(0, float(label), key, 0), jpeg))
                lst.write(f"{key}\t{float(label):f}\t{shown}\n")
                ranges.setdefault(int(label), [key, key])[1] = key + 1
                summary.copied += copied
                summary.reencoded += not copied
                key += 1
            summary.num_images = len(samples) - len(summary.skipped)
            if summary.num_images == 0:
                raise ValueError(
                    f"convert: no image could be encoded (first: {summary.skipped[0]})"
                )
            if insightface_header:
                first_id = key
                for c in range(num_classes):
                    start, end = ranges.get(c, [key, key])
                    writer.write(
                        first_id + c, pack(IRHeader(0, [start, end], first_id + c, 0), b"")
                    )
        if insightface_header:
            # Same 40 bytes as the placeholder: fixed-size header, two float32 labels, no magic.
            head = frame_record(pack(IRHeader(0, [first_id, first_id + num_classes], 0, 0), b""))
            with open(tmp["train.rec"], "r+b") as f:
                f.write(head)
        with open(tmp["property"], "w", encoding="ascii") as f:
            f.write(f"{num_classes},{size},{size}\n")
        for name in _OUTPUTS:
            os.replace(tmp[name], os.path.join(out_dir, name))
    finally:
        if pool is not None:
            pool.terminate()
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)
    summary.rec_bytes = os.path.getsize(os.path.join(out_dir, "train.rec"))
    summary.empty_classes = [c for c in range(num_classes) if c not in ranges]
    summary.seconds = time.perf_counter() - t0
    return summary


def parse_crop(values):
    """Validate a ``--crop L T R B`` box; returns a tuple of 4 ints or None."""
    if values is None:
        return None
    left, top, right, bottom = values
    if not (0 <= left < right and 0 <= top < bottom):
        raise argparse.ArgumentTypeError(f"--crop {values}: need 0 <= L < R and 0 <= T < B")
    return tuple(values)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("src_dir", help="folder with one sub-folder of images per identity")
    p.add_argument("out_dir", help="output folder for train.rec/.idx/.lst and property")
    p.add_argument("--crop", type=int, nargs=4, metavar=("L", "T", "R", "B"), help="crop box")
    p.add_argument("--size", type=int, default=112, help="output side in pixels (default 112)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--insightface-header", action="store_true", help="header + identity records")
    p.add_argument("--min-images", type=int, default=1, help="drop identities with fewer images")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    """CLI entry point; returns the exit status (0 ok, 1 bad input, 2 usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        crop = parse_crop(args.crop)
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    if not 1 <= args.quality <= 100 or args.size < 1 or args.workers < 1 or args.min_images < 1:
        parser.error("--quality must be 1..100; --size, --workers, --min-images >= 1")
    try:
        samples, names, skipped = scan_folder(args.src_dir, args.min_images)
        summary = convert(
            samples,
            args.out_dir,
            crop=crop,
            size=args.size,
            quality=args.quality,
            workers=args.workers,
            insightface_header=args.insightface_header,
            num_classes=len(names),
            root=args.src_dir,
            progress=not args.no_progress,
        )
    except (OSError, ValueError) as e:
        print(f"folder2rec: error: {e}", file=sys.stderr)
        return 1
    summary.skipped[:0] = skipped
    print("\n".join(summary.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
