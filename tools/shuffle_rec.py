"""Rewrite an insightface ``.rec``/``.idx`` pair with its images in a seeded random order.

    python tools/shuffle_rec.py SRC OUT_DIR [--seed 0] [--threads 8] [--no-progress]

SRC is a ``train.rec`` (its ``.idx`` beside it) or the folder holding them. Packs written one
identity after another hurt every sequential reader (DALI's ``fn.readers.mxnet`` shuffles only
inside a buffer of a few thousand records); arcface_torch ships such a script for that reason.
OUT_DIR receives ``train.rec``, ``train.idx`` and, when SRC has them, ``property`` and
``train.lst`` (rewritten in the new order). Each record is copied byte for byte: new image key
``k`` holds the record of source image ``perm[k - first]``, with ``perm`` =
``numpy.random.default_rng(seed).permutation(N)``. The layout stays insightface's: with a header
record (key 0) images are keys 1..N followed by one identity record per identity, whose image
range is empty (``[N+1, N+1)``: a shuffled file has no contiguous identity ranges); without one,
images are keys 0..N-1.

Memory is bounded: 16 B per image (the offsets and the permutation: ~0.7 GB at 42M images) plus a
window of records read ahead by ``--threads`` threads (``os.pread``, in the new order); the files
are written under temporary names and appear together at the end. The work is done by
``data/rec_copy.py``.
"""

from __future__ import annotations

import argparse
import sys

from data.rec_copy import shuffle_rec


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("src", help="train.rec (with train.idx beside it) or its folder")
    p.add_argument("out_dir", help="output folder for train.rec/.idx (+ property, train.lst)")
    p.add_argument("--seed", type=int, default=0, help="permutation seed (default 0)")
    p.add_argument("--threads", type=int, default=8, help="reader threads (default 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 1 bad input, 2 usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    try:
        summary = shuffle_rec(args.src, args.out_dir, args.seed, args.threads, not args.no_progress)
    except (OSError, ValueError) as e:
        print(f"shuffle_rec: error: {e}", file=sys.stderr)
        return 1
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
