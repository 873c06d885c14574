"""Build an insightface verification ``.bin`` from an LFW-style ``pairs.txt``.

    python tools/make_bin.py PAIRS_TXT IMAGE_ROOT OUT.bin [--crop L T R B] [--size 112]
        [--quality 95] [--folds 1,2,3] [--workers N]

``pairs.txt`` (LFW View 2, Huang et al. 2007): first line ``folds n``; then per fold n matched
lines ``name i j`` followed by n mismatched lines ``name1 i name2 j``. Image numbers are 1-based
and map to ``IMAGE_ROOT/<name>/<name>_%04d.jpg``. Each image is cropped/resized/encoded as in
``tools/folder2rec.py`` and the pairs are written in file order.
"""

import argparse
import multiprocessing as mp
import os
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.verification_bin import write_bin
from tools.folder2rec import encode_job, parse_crop, progress_bar


def check_name(name):
    """A person name from ``pairs.txt`` must be one folder name under the image root: no path
    separator, not ``.``/``..``, no NUL, so a crafted ``pairs.txt`` cannot read files elsewhere.

    Raises:
        ValueError: naming the offending name.
    """
    bad = not name or name in (".", "..") or any(c in name for c in ("/", "\\", "\0", os.sep))
    if bad:
        raise ValueError(f"name {name!r} is not a folder name inside the image root")
    return name


def lfw_image_path(root, name, number):
    """``root/<name>/<name>_%04d.jpg`` for a 1-based image ``number``.

    Raises:
        ValueError: ``name`` would leave ``root`` (see ``check_name``).
    """
    return os.path.join(root, check_name(name), f"{name}_{int(number):04d}.jpg")


def parse_pairs(path):
    """Parse an LFW ``pairs.txt``.

    Args:
        path: the pairs file.
    Returns:
        list of folds; each a list of (name1, i, name2, j, issame) with 1-based image numbers,
        the n matched pairs first, then the n mismatched pairs.
    Raises:
        FileNotFoundError: missing file. ValueError: malformed header (or 0 folds / 0 pairs),
            line or fold, or a name that is not a folder name (names the file and line number).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: pairs file not found")
    with open(path, encoding="utf-8") as f:
        lines = [(no, line.split()) for no, line in enumerate(f, 1) if line.strip()]
    if not lines:
        raise ValueError(f"{path}: empty pairs file")
    try:
        num_folds, per_fold = (int(v) for v in lines[0][1])
    except ValueError:
        raise ValueError(f"{path}:1: expected header 'folds n', got {lines[0][1]}") from None
    if num_folds < 1 or per_fold < 1:
        raise ValueError(
            f"{path}:1: header says {num_folds} folds of {per_fold} + {per_fold} pairs; a .bin "
            "needs at least one fold with one pair"
        )
    body = lines[1:]
    if len(body) != num_folds * 2 * per_fold:
        raise ValueError(
            f"{path}: header says {num_folds} folds x 2 x {per_fold} pairs = "
            f"{num_folds * 2 * per_fold} lines, found {len(body)}"
        )
    folds = []
    for k in range(num_folds):
        fold = []
        for m, (no, fields) in enumerate(body[k * 2 * per_fold : (k + 1) * 2 * per_fold]):
            matched = m < per_fold
            want = 3 if matched else 4
            if len(fields) != want:
                kind = "matched 'name i j'" if matched else "mismatched 'name1 i name2 j'"
                raise ValueError(f"{path}:{no}: expected a {kind} pair, got {fields}")
            try:
                if matched:
                    pair = (fields[0], int(fields[1]), fields[0], int(fields[2]), True)
                else:
                    pair = (fields[0], int(fields[1]), fields[2], int(fields[3]), False)
            except ValueError:
                raise ValueError(f"{path}:{no}: image numbers must be integers: {fields}") from None
            if pair[1] < 1 or pair[3] < 1:
                raise ValueError(f"{path}:{no}: image numbers are 1-based: {fields}")
            try:
                check_name(pair[0]), check_name(pair[2])
            except ValueError as e:
                raise ValueError(f"{path}:{no}: {e}") from None
            fold.append(pair)
        folds.append(fold)
    return folds


def parse_folds(text, num_folds):
    """``"1,2,3"`` -> [1, 2, 3] (1-based, validated against ``num_folds``); None -> all folds."""
    if text is None:
        return list(range(1, num_folds + 1))
    try:
        chosen = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise ValueError(f"--folds {text!r}: expected comma-separated fold numbers") from None
    if not chosen or chosen[0] < 1 or chosen[-1] > num_folds:
        raise ValueError(f"--folds {text!r}: folds are 1..{num_folds}")
    return chosen


def build_bin(
    pairs, image_root, out_path, *, crop=None, size=112, quality=95, workers=1, progress=True
):
    """Encode the images of ``pairs`` and write them as a verification ``.bin``.

    Args:
        pairs: list of (name1, i, name2, j, issame) as from ``parse_pairs``.
        image_root: folder holding ``<name>/<name>_%04d.jpg``.
        out_path: output ``.bin`` (written atomically).
        crop, size, quality: see ``tools.folder2rec.encode_face``.
        workers: encoding processes (1 = in this process).
    Returns:
        number of pairs written.
    Raises:
        ValueError: no pairs, a name outside ``image_root``, or a pair's image is missing or
            unreadable (a .bin must be complete).
    """
    if not pairs:
        raise ValueError(f"{out_path}: no pairs to write")
    paths = [
        lfw_image_path(image_root, name, number)
        for name1, i, name2, j, _ in pairs
        for name, number in ((name1, i), (name2, j))
    ]
    unique = list(dict.fromkeys(paths))  # an image in several pairs is encoded once
    jobs = [(path, crop, size, quality) for path in unique]
    encoded = {}
    pool = mp.Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(encode_job, jobs, chunksize=8) if pool else map(encode_job, jobs)
        with progress_bar(progress) as bar:
            task = bar.add_task("encoding pair images", total=len(jobs))
            for path, (jpeg, _, error) in zip(unique, results):
                if jpeg is None:
                    k = paths.index(path) // 2
                    name1, i, name2, j, _ = pairs[k]
                    raise ValueError(f"pair {k} ({name1} {i}, {name2} {j}): {path}: {error}")
                encoded[path] = jpeg
                bar.advance(task)
    finally:
        if pool is not None:
            pool.terminate()
    write_bin(out_path, [encoded[p] for p in paths], [p[4] for p in pairs])
    return len(pairs)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("pairs_txt", help="LFW-style pairs.txt")
    p.add_argument("image_root", help="folder with <name>/<name>_NNNN.jpg")
    p.add_argument("out_bin", help="output .bin")
    p.add_argument("--crop", type=int, nargs=4, metavar=("L", "T", "R", "B"), help="crop box")
    p.add_argument("--size", type=int, default=112, help="output side in pixels (default 112)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95)")
    p.add_argument("--folds", help="comma-separated 1-based folds (default: all)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
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
    t0 = time.perf_counter()
    try:
        folds = parse_pairs(args.pairs_txt)
        chosen = parse_folds(args.folds, len(folds))
        pairs = [pair for k in chosen for pair in folds[k - 1]]
        n = build_bin(
            pairs,
            args.image_root,
            args.out_bin,
            crop=crop,
            size=args.size,
            quality=args.quality,
            workers=args.workers,
            progress=not args.no_progress,
        )
    except (OSError, ValueError) as e:
        print(f"make_bin: error: {e}", file=sys.stderr)
        return 1
    same = sum(p[4] for p in pairs)
    print(
        f"{args.out_bin}: {n} pairs ({same} same, {n - same} different) from folds {chosen}, "
        f"{2 * n} images, {os.path.getsize(args.out_bin) / 2**20:.1f} MiB, "
        f"{time.perf_counter() - t0:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
