"""Build an insightface verification ``.bin`` from a pairs protocol: LFW, a list, CFP-FP, AgeDB-30.

    python tools/make_bin.py PAIRS_TXT IMAGE_ROOT OUT.bin [--folds 1,2,3]          # LFW
    python tools/make_bin.py --format list PAIRS.txt IMAGE_ROOT OUT.bin           # any pairs
    python tools/make_bin.py --format cfp-fp cfp-dataset/Protocol cfp-dataset/Protocol cfp_fp.bin
    python tools/make_bin.py --format agedb-30 AgeDB AgeDB_aligned agedb_30.bin
        common: [--crop L T R B] [--size 112] [--quality 95] [--workers N] [--no-progress]

Formats (SOURCE is the first positional argument):

- ``lfw`` (default): LFW View 2 ``pairs.txt`` (Huang et al. 2007): first line ``folds n``; per
  fold n matched lines ``name i j`` then n mismatched lines ``name1 i name2 j``; images are
  ``IMAGE_ROOT/<name>/<name>_%04d.jpg``. ``--folds`` picks folds. AgeDB-30 pairs lists written
  in this layout work the same way.
- ``list``: one pair per line, ``path1 path2 label`` (label 1 = same person, 0 = different),
  paths relative to IMAGE_ROOT (or absolute); blank lines and ``#`` comments are skipped.
- ``cfp-fp``: the CFP protocol folder (Sengupta et al., WACV 2016): ``Pair_list_F.txt`` and
  ``Pair_list_P.txt`` (``index path`` per line, paths relative to IMAGE_ROOT, normally the
  protocol folder itself) and ``Split/FP/01..10/{same,diff}.txt`` (``frontal,profile`` indices);
  written split by split, 350 same then 350 different pairs each (7,000 pairs: 10 contiguous
  balanced folds, as insightface's ``cfp_fp.bin``). Use ``--crop``/``--size`` to cut the face.
- ``agedb-30``: the AgeDB release's 30-year protocol (Moschoglou et al., CVPRW 2017), SOURCE the
  folder holding ``04_FINAL_protocol_30_years.mat`` (or that file): a MATLAB v5 file whose
  variable ``splits`` holds 10 splits; each split is a struct whose first field is a 2 x N cell
  (column j = pair j, row 1/2 = its first/second image) of structs ``(image name without .jpg,
  age)`` and whose second field holds the N labels (1 = same person, -1 = different). Fields are
  read by position, as insightface's ``src/data/agedb2pack2.py`` reads them. Images are
  ``IMAGE_ROOT/<name>.jpg`` (``03_Protocol_Images`` of the release, or an aligned copy with the
  same names). Written split by split in protocol order (6,000 pairs: 10 contiguous folds, as
  insightface's ``agedb_30.bin``); splits of unequal size are refused.

Each image is cropped/resized/encoded as in ``tools/folder2rec.py``; pairs are written in
protocol order. Bad input: one line ``make_bin: error: FILE:LINE: ...`` (for the AgeDB ``.mat``,
``FILE: split S pair P: ...``), exit 1.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import time
import zlib
from typing import Any

import numpy as np
from scipy.io import loadmat

from data.face_jpeg import add_encoding_arguments, encoding_options
from data.lfw import (
    PathPair,
    build_path_bin,
    check_name,
    lfw_image_path,
    parse_folds,
    parse_pairs,
)

CFP_SPLITS = 10
AGEDB_30_MAT = "04_FINAL_protocol_30_years.mat"  # name in the AgeDB release
AGEDB_SPLITS = 10


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "pairs_txt",
        help="pairs.txt (lfw), pair list (list), Protocol folder (cfp-fp) or the folder holding "
        f"{AGEDB_30_MAT} (agedb-30)",
    )
    p.add_argument("image_root", help="folder the image names/paths are relative to")
    p.add_argument("out_bin", help="output .bin")
    p.add_argument("--format", choices=sorted(READERS), default="lfw", help="protocol (lfw)")
    add_encoding_arguments(p)
    p.add_argument("--folds", help="lfw: comma-separated 1-based folds (default: all)")
    return p


def read_lfw(source: str, image_root: str, folds: str | None) -> tuple[list[PathPair], str]:
    """LFW ``pairs.txt`` -> path pairs of the chosen folds and a description."""
    parsed = parse_pairs(source)
    chosen = parse_folds(folds, len(parsed))
    pairs = [
        (lfw_image_path(image_root, n1, i), lfw_image_path(image_root, n2, j), same)
        for k in chosen
        for n1, i, n2, j, same in parsed[k - 1]
    ]
    return pairs, f"folds {chosen}"


def _resolve(image_root: str, path: str, where: str) -> str:
    if not path or "\0" in path:
        raise ValueError(f"{where}: empty or invalid image path {path!r}")
    return os.path.normpath(os.path.join(image_root, path))


def read_list(source: str, image_root: str, folds: str | None = None) -> tuple[list[PathPair], str]:
    """Generic ``path1 path2 label`` list -> path pairs.

    Raises:
        FileNotFoundError: no list. ValueError: a line without 3 fields or a label other than
            0/1, or no pairs (names the file and line).
    """
    pairs: list[PathPair] = []
    with open(source, encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            fields = text.split()
            if len(fields) != 3 or fields[2] not in ("0", "1"):
                raise ValueError(f"{source}:{no}: expected 'path1 path2 label(0|1)', got {text!r}")
            where = f"{source}:{no}"
            a, b = (_resolve(image_root, v, where) for v in fields[:2])
            pairs.append((a, b, fields[2] == "1"))
    if not pairs:
        raise ValueError(f"{source}: no pairs listed")
    return pairs, "list"


def _cfp_images(path: str, image_root: str) -> dict[int, str]:
    images: dict[int, str] = {}
    with open(path, encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or not fields[0].isdigit():
                raise ValueError(f"{path}:{no}: expected 'index path', got {line.strip()!r}")
            images[int(fields[0])] = _resolve(image_root, fields[1], f"{path}:{no}")
    return images


def read_cfp_fp(
    source: str, image_root: str, folds: str | None = None
) -> tuple[list[PathPair], str]:
    """CFP frontal-profile protocol folder -> 7,000 path pairs, split by split (same, diff).

    Raises:
        FileNotFoundError: a missing list or split file. ValueError: a malformed line or an
            index not in the image lists (names the file and line).
    """
    frontal = _cfp_images(os.path.join(source, "Pair_list_F.txt"), image_root)
    profile = _cfp_images(os.path.join(source, "Pair_list_P.txt"), image_root)
    pairs: list[PathPair] = []
    for split in range(1, CFP_SPLITS + 1):
        for kind, same in (("same", True), ("diff", False)):
            path = os.path.join(source, "Split", "FP", f"{split:02d}", f"{kind}.txt")
            with open(path, encoding="utf-8") as f:
                for no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        i, j = (int(v) for v in line.strip().split(","))
                        pairs.append((frontal[i], profile[j], same))
                    except (ValueError, KeyError):
                        raise ValueError(
                            f"{path}:{no}: expected 'frontal,profile' indices of the pair "
                            f"lists, got {line.strip()!r}"
                        ) from None
    return pairs, f"CFP-FP, {CFP_SPLITS} splits"


def _brief(value: object) -> str:
    """``repr`` of ``value`` on one line, at most 80 characters (error messages are one line)."""
    return " ".join(repr(value).split())[:80]


def _single(value: Any, what: str, where: str) -> Any:
    """The one element of a MATLAB 1x1 value (cells, structs and strings load as arrays).

    Raises:
        ValueError: ``value`` holds no or several elements (names ``where``).
    """
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(f"{where}: expected one {what}, got shape {array.shape}")
    return array.reshape(-1)[0]


def _struct_fields(value: Any, count: int, what: str, where: str) -> tuple[Any, ...]:
    """The first ``count`` fields (by position) of a MATLAB 1x1 struct.

    Raises:
        ValueError: not a struct, or fewer fields (names ``where``).
    """
    record = _single(value, what, where)
    names = getattr(getattr(record, "dtype", None), "names", None)
    if not isinstance(record, np.void) or names is None or len(names) < count:
        raise ValueError(f"{where}: not a {what} ({count} fields): {_brief(record)}")
    return tuple(record[i] for i in range(count))


def _agedb_split(split: Any, image_root: str, where: str) -> list[PathPair]:
    """One split of the AgeDB protocol -> its path pairs in protocol order."""
    images, labels = _struct_fields(split, 2, "split struct (pairs, labels)", where)
    images, labels = np.asarray(images, dtype=object), np.asarray(labels)
    if images.ndim != 2 or images.shape[0] != 2 or images.shape[1] < 1:
        raise ValueError(f"{where}: expected a 2 x N cell of pair images, got {images.shape}")
    if labels.dtype.kind not in "iuf" or labels.size != images.shape[1]:
        raise ValueError(
            f"{where}: expected {images.shape[1]} numeric labels, got {labels.dtype} {labels.shape}"
        )
    pairs: list[PathPair] = []
    for j, label in enumerate(labels.reshape(-1).tolist()):
        at = f"{where} pair {j + 1}"
        if label not in (1, -1):
            raise ValueError(f"{at}: label must be 1 (same) or -1 (different), got {label}")
        paths = []
        for r in (0, 1):
            name, _age = _struct_fields(images[r, j], 2, "pair image struct (name, age)", at)
            name = _single(name, "image name", at)
            if not isinstance(name, str):
                raise ValueError(f"{at}: image name must be text, got {_brief(name)}")
            try:
                paths.append(os.path.join(image_root, check_name(str(name)) + ".jpg"))
            except ValueError as e:
                raise ValueError(f"{at}: {e}") from None
        pairs.append((paths[0], paths[1], label == 1))
    return pairs


def read_agedb_30(
    source: str, image_root: str, folds: str | None = None
) -> tuple[list[PathPair], str]:
    """AgeDB-30 protocol ``.mat`` -> 6,000 path pairs (10 splits of 300 same + 300 different).

    The layout of ``04_FINAL_protocol_30_years.mat`` is in the module docstring; the pairs are
    written split by split in the file's order, so the 10 contiguous folds of the evaluation are
    the 10 protocol splits (insightface's ``agedb_30.bin`` order).

    Args:
        source: the release folder holding ``04_FINAL_protocol_30_years.mat``, or that file.
        image_root: folder of ``<name>.jpg`` (``03_Protocol_Images`` or an aligned copy).
        folds: unused (``--folds`` is for LFW).
    Returns:
        (pairs, description).
    Raises:
        FileNotFoundError: no protocol file. ValueError: not a MATLAB v5 file, one inflating
            past ``AGEDB_MAX_BYTES``, no ``splits`` variable (a cell or struct array), not 10
            splits, a malformed split or pair, a label other than 1/-1, an image name that is
            not a file name, or splits of unequal size (names the file, and the 1-based split
            and pair).
    """
    path = source if source.endswith(".mat") else os.path.join(source, AGEDB_30_MAT)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: AgeDB-30 protocol file not found")
    check_mat_size(path, AGEDB_MAX_BYTES)
    try:
        mat = loadmat(path, variable_names=["splits"])  # other variables are never inflated
    except Exception as e:  # scipy raises several types for a corrupt or foreign file
        why = " ".join(str(e).split())
        raise ValueError(f"{path}: not a MATLAB v5 .mat file ({type(e).__name__}: {why})") from e
    if "splits" not in mat:
        raise ValueError(f"{path}: no 'splits' variable")
    splits = _splits(mat["splits"], path)
    if len(splits) != AGEDB_SPLITS:
        raise ValueError(f"{path}: expected {AGEDB_SPLITS} splits, found {len(splits)}")
    per_split = [_agedb_split(s, image_root, f"{path}: split {k}") for k, s in enumerate(splits, 1)]
    sizes = [len(p) for p in per_split]
    if len(set(sizes)) != 1:
        raise ValueError(
            f"{path}: splits hold {sizes} pairs; {AGEDB_SPLITS} contiguous folds need equal splits"
        )
    return [pair for split in per_split for pair in split], (
        f"AgeDB-30, {AGEDB_SPLITS} splits of {sizes[0]} pairs"
    )


def _splits(value: Any, path: str) -> list[Any]:
    """The split records of ``splits``: a cell array of 1x1 structs (the release) or a struct
    array (one record per split), flattened in MATLAB order."""
    array = np.asarray(value)
    if array.dtype.names is not None:  # a struct array: each element is one split's record
        return list(array.reshape(-1))
    try:
        return list(np.asarray(array, dtype=object).reshape(-1))
    except (ValueError, TypeError):
        raise ValueError(
            f"{path}: 'splits' is not a cell or struct array: {_brief(value)}"
        ) from None


# The AgeDB-30 protocol (6,000 pairs of short names) takes a few MB once inflated: a .mat whose
# variables expand past this is refused before scipy inflates it.
AGEDB_MAX_BYTES = 64 << 20
_MI_COMPRESSED = 15  # MAT v5 data type of a zlib-compressed element


def check_mat_size(path: str, limit: int) -> None:
    """Walks the top-level elements of a MATLAB v5 file and counts the bytes they hold once
    inflated (compressed elements are inflated in 1 MiB steps and discarded), so a small file
    that inflates to gigabytes is refused before it is loaded.

    Raises:
        ValueError: more than ``limit`` bytes (names the file); other damage is left to loadmat.
    """
    with open(path, "rb") as f:
        header = f.read(128)
        if len(header) < 128:
            return
        order = "<" if header[126:128] == b"IM" else ">"
        total = 0
        while total <= limit:
            tag = f.read(8)
            if len(tag) < 8:
                return
            kind, nbytes = struct.unpack(order + "II", tag)
            if kind == _MI_COMPRESSED:
                total += _inflated_size(f, nbytes, limit - total)
            else:
                total += nbytes
                f.seek(nbytes + (-nbytes % 8), os.SEEK_CUR)
    raise ValueError(
        f"{path}: its variables inflate to more than {limit} bytes; a protocol file is a few MB"
    )


def _inflated_size(f: Any, nbytes: int, allowance: int) -> int:
    """Bytes the next ``nbytes`` zlib bytes of ``f`` inflate to, counting stops past
    ``allowance`` (a damaged stream counts what inflated before the damage)."""
    inflate, total, left = zlib.decompressobj(), 0, nbytes
    try:
        while left > 0 and total <= allowance:
            chunk = f.read(min(left, 1 << 16))
            if not chunk:
                break
            left -= len(chunk)
            data = inflate.decompress(chunk, 1 << 20)
            total += len(data)
            while inflate.unconsumed_tail and total <= allowance:
                total += len(inflate.decompress(inflate.unconsumed_tail, 1 << 20))
    except zlib.error:
        pass  # loadmat reports the damage
    return total


READERS = {"lfw": read_lfw, "list": read_list, "cfp-fp": read_cfp_fp, "agedb-30": read_agedb_30}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 1 bad input, 2 usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    encoding = encoding_options(parser, args)
    if args.folds and args.format != "lfw":
        parser.error("--folds applies to --format lfw only")
    t0 = time.perf_counter()
    try:
        pairs, desc = READERS[args.format](args.pairs_txt, args.image_root, args.folds)
        n = build_path_bin(pairs, args.out_bin, **encoding)
    except (OSError, ValueError) as e:
        print(f"make_bin: error: {e}", file=sys.stderr)
        return 1
    same = sum(p[2] for p in pairs)
    print(
        f"{args.out_bin}: {n} pairs ({same} same, {n - same} different) from {desc}, "
        f"{2 * n} images, {os.path.getsize(args.out_bin) / 2**20:.1f} MiB, "
        f"{time.perf_counter() - t0:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
