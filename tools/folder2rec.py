"""Pack an image folder (one sub-folder per identity) into an insightface-style RecordIO dataset.

    python tools/folder2rec.py SRC_DIR OUT_DIR [--crop L T R B] [--size 112] [--quality 95]
        [--workers N] [--insightface-header] [--min-images 1] [--shuffle [--seed 0]]

Writes ``OUT_DIR/train.rec``, ``train.idx``, ``train.lst`` (im2rec format ``key\\tlabel\\tpath``)
and ``property`` (``num_classes,size,size``). Identities are the sorted sub-folder names, labelled
0..C-1. Images are optionally cropped to a box, resized to ``size`` x ``size`` and JPEG-encoded in
worker processes; images that already have the target size and are JPEG (with no crop) are copied
as they are. Everything is written under temporary names and renamed at the end. With
``--insightface-header`` the layout is insightface's: key 0 = header (label ``[first identity
key, end key)``), images at keys 1..N, identity records (label ``[first image key, end key)``).
The work is done by ``data/pack_rec.py``. ``--shuffle`` writes the images in a seeded random
order instead of one identity after another (what DALI and any sequential reader need): the pack
goes to a temporary folder inside OUT_DIR and ``tools/shuffle_rec.py`` rewrites it (one extra
sequential write; the temporary folder is removed, also on failure).
"""

import argparse
import os
import shutil
import sys

from data.face_jpeg import add_encoding_arguments, encoding_options
from data.pack_rec import convert, scan_folder
from data.rec_copy import shuffle_rec


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("src_dir", help="folder with one sub-folder of images per identity")
    p.add_argument("out_dir", help="output folder for train.rec/.idx/.lst and property")
    add_encoding_arguments(p)
    p.add_argument("--insightface-header", action="store_true", help="header + identity records")
    p.add_argument("--min-images", type=int, default=1, help="drop identities with fewer images")
    p.add_argument("--shuffle", action="store_true", help="images in a seeded random order")
    p.add_argument("--seed", type=int, default=0, help="--shuffle permutation seed (default 0)")
    return p


def main(argv=None) -> int:
    """CLI entry point; returns the exit status (0 ok, 1 bad input, 2 usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    encoding = encoding_options(parser, args)
    if args.min_images < 1:
        parser.error("--min-images must be >= 1")
    packed = os.path.join(args.out_dir, f".unshuffled-{os.getpid()}") if args.shuffle else None
    try:
        samples, names, skipped = scan_folder(args.src_dir, args.min_images)
        summary = convert(
            samples,
            packed or args.out_dir,
            insightface_header=args.insightface_header,
            num_classes=len(names),
            root=args.src_dir,
            **encoding,
        )
        if packed is not None:
            done = shuffle_rec(packed, args.out_dir, args.seed, progress=encoding["progress"])
            summary.out_dir = args.out_dir
            summary.seconds += done.seconds
    except (OSError, ValueError) as e:
        print(f"folder2rec: error: {e}", file=sys.stderr)
        return 1
    finally:
        if packed is not None:
            shutil.rmtree(packed, ignore_errors=True)
    summary.skipped[:0] = skipped
    print("\n".join(summary.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
