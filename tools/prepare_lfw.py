"""Build the LFW demo split: a training ``.rec`` and a held-out verification ``.bin``.

    python tools/prepare_lfw.py [--lfw ../shared/data/lfw] [--out work_dirs/lfw_demo]
        [--eval-folds 1,2,3] [--workers N] [--force]

Split (``/work/shared/data/README.md``): verification pairs are the chosen folds of LFW View 2
``pairs.txt``; training identities are the people with at least 2 images who appear in none of
those pairs (folds are identity-disjoint, so the split is clean). Every image is cropped to the box
(59, 56, 191, 188) of the deep-funneled 250x250 image and resized to 112x112. Outputs in OUT:
``train.rec/.idx/.lst``, ``property`` (insightface layout with header record), ``lfw_heldout.bin``
and ``prepare_lfw.json``; a rerun with the same settings and intact outputs does nothing.
"""

import argparse
import json
import os
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.folder2rec import IMAGE_EXTS, convert
from tools.make_bin import build_bin, parse_folds, parse_pairs

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_LFW = os.environ.get(
    "ARCSCALE_LFW", os.path.join(os.path.dirname(REPO_ROOT), "shared", "data", "lfw")
)
DEFAULT_OUT = os.path.join(REPO_ROOT, "work_dirs", "lfw_demo")
LFW_CROP = (59, 56, 191, 188)
MANIFEST = "prepare_lfw.json"
OUTPUTS = ("train.rec", "train.idx", "train.lst", "property", "lfw_heldout.bin")
LFW_SOURCE = (
    "LFW (Huang, Ramesh, Berg, Learned-Miller, 'Labeled Faces in the Wild',\n"
    "  UMass Amherst TR 07-49, 2007):\n"
    "  download the deep-funneled images (lfw-deepfunneled) and pairs.txt (View 2) from the LFW\n"
    "  site, and lay them out as LFW/lfw-deepfunneled/<Name>/<Name>_NNNN.jpg and LFW/pairs.txt."
)


def split_lfw(lfw_root, eval_folds):
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
    samples, names = [], []
    for name in sorted(os.listdir(image_root)):
        folder = os.path.join(image_root, name)
        if name in held_out or not os.path.isdir(folder):
            continue
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTS))
        if len(files) < 2:
            continue
        samples += [(os.path.join(folder, f), len(names)) for f in files]
        names.append(name)
    if not names:
        raise ValueError(f"{image_root}: no person with >= 2 images outside folds {chosen}")
    return samples, names, pairs


def _interleave(fold):
    """(m0..mn-1, u0..un-1) -> (m0, u0, m1, u1, ...): LFW lists matched pairs before mismatched."""
    half = len(fold) // 2
    return [p for pair in zip(fold[:half], fold[half:]) for p in pair]


def _settings(args):
    return {
        "pair_order": "interleaved",
        "lfw": os.path.abspath(args.lfw),
        "eval_folds": args.eval_folds,
        "crop": list(LFW_CROP),
        "size": args.size,
        "quality": args.quality,
    }


def _up_to_date(out, settings):
    path = os.path.join(out, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    if manifest.get("settings") != settings:
        return None
    for name, size in manifest.get("outputs", {}).items():
        file = os.path.join(out, name)
        if not os.path.isfile(file) or os.path.getsize(file) != size:
            return None
    return manifest if set(manifest.get("outputs", {})) == set(OUTPUTS) else None


def _print_summary(m):
    s = m["summary"]
    print(
        f"LFW demo split in {m['out']}: eval folds {m['settings']['eval_folds']}\n"
        f"  train: {s['train_identities']} identities, {s['train_images']} images "
        f"(train.rec {s['rec_mib']:.1f} MiB)\n"
        f"  held-out: {s['pairs']} pairs ({s['same_pairs']} same, "
        f"{s['pairs'] - s['same_pairs']} different) in lfw_heldout.bin\n"
        f"  built in {s['seconds']:.1f} s"
    )


def prepare(args):
    """Build (or confirm) the split described by parsed ``args``; returns the manifest dict."""
    settings = _settings(args)
    out = os.path.abspath(args.out)
    if not args.force and (manifest := _up_to_date(out, settings)):
        print(f"{out}: outputs exist and match the settings; nothing to do (--force rebuilds)")
        return manifest
    t0 = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    if os.path.exists(os.path.join(out, MANIFEST)):
        os.remove(os.path.join(out, MANIFEST))  # a crash below must not leave a matching manifest
    samples, names, pairs = split_lfw(args.lfw, args.eval_folds)
    progress = not args.no_progress
    result = convert(
        samples,
        out,
        crop=LFW_CROP,
        size=args.size,
        quality=args.quality,
        workers=args.workers,
        insightface_header=True,
        num_classes=len(names),
        root=os.path.join(args.lfw, "lfw-deepfunneled"),
        progress=progress,
    )
    if result.skipped:
        raise ValueError("unreadable LFW images:\n" + "\n".join(result.lines()[2:]))
    image_root = os.path.join(args.lfw, "lfw-deepfunneled")
    heldout = os.path.join(out, "lfw_heldout.bin")
    build_bin(
        pairs,
        image_root,
        heldout,
        crop=LFW_CROP,
        size=args.size,
        quality=args.quality,
        progress=progress,
    )
    manifest = {
        "out": out,
        "settings": settings,
        "summary": {
            "train_identities": len(names),
            "train_images": result.num_images,
            "rec_mib": result.rec_bytes / 2**20,
            "pairs": len(pairs),
            "same_pairs": sum(p[4] for p in pairs),
            "seconds": time.perf_counter() - t0,
        },
        "outputs": {name: os.path.getsize(os.path.join(out, name)) for name in OUTPUTS},
    }
    tmp = os.path.join(out, f".{MANIFEST}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(out, MANIFEST))
    return manifest


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lfw", default=DEFAULT_LFW, help=f"LFW folder (default {DEFAULT_LFW})")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--eval-folds", default="1,2,3", help="1-based held-out folds (default 1,2,3)")
    p.add_argument("--size", type=int, default=112, help="output side in pixels (default 112)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--force", action="store_true", help="rebuild even if outputs match")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    """CLI entry point; returns 0 on success, 1 when LFW is missing or the build fails."""
    args = build_parser().parse_args(argv)
    missing = [
        p
        for p in (os.path.join(args.lfw, "lfw-deepfunneled"), os.path.join(args.lfw, "pairs.txt"))
        if not os.path.exists(p)
    ]
    if missing:
        print(f"prepare_lfw: LFW not found: {', '.join(missing)}\n{LFW_SOURCE}", file=sys.stderr)
        return 1
    try:
        args.eval_folds = parse_folds(args.eval_folds, 10**6)
        manifest = prepare(args)
    except (OSError, ValueError) as e:
        print(f"prepare_lfw: error: {e}", file=sys.stderr)
        return 1
    _print_summary(manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
