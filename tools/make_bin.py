"""Build an insightface verification ``.bin`` from an LFW-style ``pairs.txt``.

    python tools/make_bin.py PAIRS_TXT IMAGE_ROOT OUT.bin [--crop L T R B] [--size 112]
        [--quality 95] [--folds 1,2,3] [--workers N]

``pairs.txt`` (LFW View 2, Huang et al. 2007): first line ``folds n``; then per fold n matched
lines ``name i j`` followed by n mismatched lines ``name1 i name2 j``. Image numbers are 1-based
and map to ``IMAGE_ROOT/<name>/<name>_%04d.jpg``. Each image is cropped/resized/encoded as in
``tools/folder2rec.py`` and the pairs are written in file order. The work is done by
``data/lfw.py``.
"""

import argparse
import os
import sys
import time

from data.face_jpeg import add_encoding_arguments, encoding_options
from data.lfw import build_bin, parse_folds, parse_pairs


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("pairs_txt", help="LFW-style pairs.txt")
    p.add_argument("image_root", help="folder with <name>/<name>_NNNN.jpg")
    p.add_argument("out_bin", help="output .bin")
    add_encoding_arguments(p)
    p.add_argument("--folds", help="comma-separated 1-based folds (default: all)")
    return p


def main(argv=None) -> int:
    """CLI entry point; returns the exit status (0 ok, 1 bad input, 2 usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    encoding = encoding_options(parser, args)
    t0 = time.perf_counter()
    try:
        folds = parse_pairs(args.pairs_txt)
        chosen = parse_folds(args.folds, len(folds))
        pairs = [pair for k in chosen for pair in folds[k - 1]]
        n = build_bin(pairs, args.image_root, args.out_bin, **encoding)
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
