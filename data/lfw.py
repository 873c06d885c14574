"""LFW: where it lives, its face box, its ``pairs.txt`` protocol, and verification ``.bin`` files
built from an LFW-style ``pairs.txt``.

``pairs.txt`` (LFW View 2, Huang et al. 2007): first line ``folds n``; then per fold n matched
lines ``name i j`` followed by n mismatched lines ``name1 i name2 j``. Image numbers are 1-based
and map to ``IMAGE_ROOT/<name>/<name>_%04d.jpg``.
"""

from __future__ import annotations

import os
from typing import Any

from data.datasets import IMAGE_EXTENSIONS
from data.face_jpeg import Box, encoded, progress_bar
from data.verification_bin import write_bin

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# LFW folder (``lfw-deepfunneled/`` + ``pairs.txt``): $ARCSCALE_LFW, else ../shared/data/lfw
# beside the checkout.
DEFAULT_LFW = os.environ.get(
    "ARCSCALE_LFW", os.path.join(os.path.dirname(_REPO_ROOT), "shared", "data", "lfw")
)
# (left, top, right, bottom) of the face in a 250x250 deep-funneled LFW image; resized to 112x112.
LFW_CROP: Box = (59, 56, 191, 188)
Pair = tuple[str, int, str, int, bool]  # (name1, i, name2, j, issame), 1-based image numbers
PathPair = tuple[str, str, bool]  # (image path 1, image path 2, same person)


def check_name(name: str) -> str:
    """A person name from ``pairs.txt`` must be one folder name under the image root: no path
    separator, not ``.``/``..``, no NUL, so a crafted ``pairs.txt`` cannot read files elsewhere.

    Raises:
        ValueError: naming the offending name.
    """
    bad = not name or name in (".", "..") or any(c in name for c in ("/", "\\", "\0", os.sep))
    if bad:
        raise ValueError(f"name {name!r} is not a folder name inside the image root")
    return name


def lfw_image_path(root: str, name: str, number: int) -> str:
    """``root/<name>/<name>_%04d.jpg`` for a 1-based image ``number``.

    Raises:
        ValueError: ``name`` would leave ``root`` (see ``check_name``).
    """
    return os.path.join(root, check_name(name), f"{name}_{int(number):04d}.jpg")


def parse_pairs(path: str | os.PathLike[str]) -> list[list[Pair]]:
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


def parse_folds(text: str | None, num_folds: int) -> list[int]:
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
    pairs: list[Pair], image_root: str, out_path: str | os.PathLike[str], **options: Any
) -> int:
    """Encode the images of LFW ``pairs`` and write them as a verification ``.bin``.

    Args:
        pairs: list of (name1, i, name2, j, issame) as from ``parse_pairs``.
        image_root: folder holding ``<name>/<name>_%04d.jpg``.
        out_path: output ``.bin`` (written atomically).
        options: ``crop``, ``size``, ``quality``, ``workers``, ``progress`` of
            ``build_path_bin``.
    Returns:
        number of pairs written.
    Raises:
        ValueError: no pairs, a name outside ``image_root``, or a pair's image is missing or
            unreadable (a .bin must be complete).
    """
    path_pairs = [
        (lfw_image_path(image_root, n1, i), lfw_image_path(image_root, n2, j), same)
        for n1, i, n2, j, same in pairs
    ]
    return build_path_bin(path_pairs, out_path, **options)


def build_path_bin(
    pairs: list[PathPair],
    out_path: str | os.PathLike[str],
    *,
    crop: Box | None = None,
    size: int = 112,
    quality: int = 95,
    workers: int = 1,
    progress: bool = True,
) -> int:
    """Encode the images of path ``pairs`` (each image once) and write the ``.bin`` atomically.

    Args:
        pairs: list of (image path 1, image path 2, same person).
        out_path: output ``.bin`` (written atomically).
        crop, size, quality: see ``data.face_jpeg.encode_face``.
        workers: encoding processes (1 = in this process).
    Returns:
        number of pairs written.
    Raises:
        ValueError: no pairs, or an image that is missing or unreadable (names the pair).
    """
    if not pairs:
        raise ValueError(f"{out_path}: no pairs to write")
    order = [path for a, b, _ in pairs for path in (a, b)]
    unique = list(dict.fromkeys(order))  # an image in several pairs is encoded once
    jobs = [(path, crop, size, quality) for path in unique]
    jpegs: dict[str, bytes] = {}
    with encoded(jobs, workers) as results, progress_bar(progress) as bar:
        task = bar.add_task("encoding pair images", total=len(jobs))
        for path, (jpeg, _, error) in zip(unique, results):
            if jpeg is None:
                k = order.index(path) // 2
                raise ValueError(f"pair {k} ({pairs[k][0]}, {pairs[k][1]}): {path}: {error}")
            jpegs[path] = jpeg
            bar.advance(task)
    write_bin(out_path, [jpegs[p] for p in order], [same for _, _, same in pairs])
    return len(pairs)


def split_lfw(
    lfw_root: str, eval_folds: list[int]
) -> tuple[list[tuple[str, int]], list[str], list[Pair]]:
    """Choose training people and held-out pairs.

    Args:
        lfw_root: folder with ``lfw-deepfunneled/`` and ``pairs.txt``.
        eval_folds: 1-based fold numbers whose pairs form the held-out set.
    Returns:
        (samples: list of (path, label) for training, names: training identities by label,
        pairs: held-out (name1, i, name2, j, issame) tuples, matched and mismatched
        alternating within each fold, so that any contiguous k-fold split of the held-out set
        (insightface's 10-fold protocol on fewer than 10 LFW folds) is balanced).
    Raises:
        FileNotFoundError / ValueError: missing files, bad pairs.txt or folds.
    """
    image_root = os.path.join(lfw_root, "lfw-deepfunneled")
    folds = parse_pairs(os.path.join(lfw_root, "pairs.txt"))
    chosen = parse_folds(",".join(map(str, eval_folds)), len(folds))
    pairs = [pair for k in chosen for pair in _interleave(folds[k - 1])]
    held_out = {p[0] for p in pairs} | {p[2] for p in pairs}
    samples: list[tuple[str, int]] = []
    names: list[str] = []
    for name in sorted(os.listdir(image_root)):
        folder = os.path.join(image_root, name)
        if name in held_out or not os.path.isdir(folder):
            continue
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
        if len(files) < 2:
            continue
        samples += [(os.path.join(folder, f), len(names)) for f in files]
        names.append(name)
    if not names:
        raise ValueError(f"{image_root}: no person with >= 2 images outside folds {chosen}")
    return samples, names, pairs


def _interleave(fold: list[Pair]) -> list[Pair]:
    """(m0..mn-1, u0..un-1) -> (m0, u0, m1, u1, ...): LFW lists matched pairs before mismatched."""
    half = len(fold) // 2
    return [p for pair in zip(fold[:half], fold[half:]) for p in pair]
