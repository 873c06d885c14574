"""Build the LFW demo split: a training ``.rec`` and a held-out verification ``.bin``.

    python tools/prepare_lfw.py [--lfw ../shared/data/lfw] [--out work_dirs/lfw_demo]
        [--eval-folds 1,2,3] [--workers N] [--force]

Verification pairs are the chosen folds of LFW View 2 ``pairs.txt``; training identities are the
people with at least 2 images who appear in none of those pairs (folds are identity-disjoint, so
the split is clean). Every image is cropped to the face box of the deep-funneled 250x250 image
(``data.lfw.LFW_CROP``) and resized to 112x112. Outputs in OUT: ``train.rec/.idx/.lst``,
``property`` (insightface layout with header record), ``lfw_heldout.bin`` and
``prepare_lfw.json``; a rerun with the same settings and intact outputs does nothing. The work is
done by ``data/lfw_demo.py``.

    python tools/prepare_lfw.py --finetune-folds 4,5,6 --out work_dirs/lfw_finetune

builds instead the fine-tuning split of docs/finetune.md: OUT/pretrain (people in no pair of the
eval folds or the fine-tune folds), OUT/finetune (the people with >= 2 images of the fine-tune
folds' pairs: identity-disjoint from pretrain and from the eval folds), and OUT/lfw_heldout.bin
(the eval folds' pairs, the demo's held-out set).
"""

import argparse
import os
import sys

from data.face_jpeg import add_encoding_arguments, encoding_options
from data.lfw import DEFAULT_LFW, LFW_CROP, build_bin, parse_folds, split_lfw
from data.lfw_demo import DEFAULT_EVAL_FOLDS, DEFAULT_OUT, build_demo_split
from data.pack_rec import convert

LFW_SOURCE = (
    "LFW (Huang, Ramesh, Berg, Learned-Miller, 'Labeled Faces in the Wild',\n"
    "  UMass Amherst TR 07-49, 2007):\n"
    "  download the deep-funneled images (lfw-deepfunneled) and pairs.txt (View 2) from the LFW\n"
    "  site, and lay them out as LFW/lfw-deepfunneled/<Name>/<Name>_NNNN.jpg and LFW/pairs.txt."
)


def _print_summary(m: dict) -> None:
    s = m["summary"]
    print(
        f"LFW demo split in {m['out']}: eval folds {m['settings']['eval_folds']}\n"
        f"  train: {s['train_identities']} identities, {s['train_images']} images "
        f"(train.rec {s['rec_mib']:.1f} MiB)\n"
        f"  held-out: {s['pairs']} pairs ({s['same_pairs']} same, "
        f"{s['pairs'] - s['same_pairs']} different) in lfw_heldout.bin\n"
        f"  built in {s['seconds']:.1f} s"
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lfw", default=DEFAULT_LFW, help=f"LFW folder (default {DEFAULT_LFW})")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    folds = ",".join(map(str, DEFAULT_EVAL_FOLDS))
    p.add_argument("--eval-folds", default=folds, help=f"1-based held-out folds (default {folds})")
    add_encoding_arguments(p, crop=False)  # the crop is LFW's face box
    p.add_argument("--force", action="store_true", help="rebuild even if outputs match")
    p.add_argument(
        "--finetune-folds",
        default="",
        help="build the fine-tuning split (docs/finetune.md): pretrain/ outside these and the "
        "eval folds, finetune/ the people of these folds",
    )
    return p


def build_finetune_split(
    lfw: str, out: str, eval_folds: list[int], finetune_folds: list[int], encoding: dict
) -> dict[str, int]:
    """Writes OUT/pretrain and OUT/finetune (`.rec` + `property`, labels from 0) and
    OUT/lfw_heldout.bin (the `eval_folds` pairs). Folds are identity-disjoint in LFW View 2, so
    the three sets share no person.

    Returns:
        counts: pretrain / finetune identities and images, held-out pairs.

    Raises:
        ValueError: overlapping fold lists, or an unreadable image.
    """
    if set(eval_folds) & set(finetune_folds):
        raise ValueError(f"--finetune-folds {finetune_folds} overlap --eval-folds {eval_folds}")
    image_root = os.path.join(lfw, "lfw-deepfunneled")
    outside_eval, names_all, pairs = split_lfw(lfw, eval_folds)
    pretrain, names_pre, _ = split_lfw(lfw, eval_folds + finetune_folds)
    keep = sorted(set(names_all) - set(names_pre))
    label = {names_all.index(n): i for i, n in enumerate(keep)}
    finetune = [(path, label[y]) for path, y in outside_eval if y in label]
    counts = {"held_out_pairs": len(pairs)}
    for name, samples, classes in (
        ("pretrain", pretrain, len(names_pre)),
        ("finetune", finetune, len(keep)),
    ):
        result = convert(
            samples, os.path.join(out, name), insightface_header=True, num_classes=classes,
            root=image_root, crop=LFW_CROP, **encoding,
        )  # fmt: skip
        if result.skipped:
            raise ValueError("unreadable LFW images:\n" + "\n".join(result.lines()[2:]))
        counts[f"{name}_identities"], counts[f"{name}_images"] = classes, len(samples)
    build_bin(pairs, image_root, os.path.join(out, "lfw_heldout.bin"), crop=LFW_CROP, **encoding)
    return counts


def main(argv=None) -> int:
    """CLI entry point; returns 0 on success, 1 when LFW is missing or the build fails."""
    parser = build_parser()
    args = parser.parse_args(argv)
    encoding = encoding_options(parser, args)
    missing = [
        p
        for p in (os.path.join(args.lfw, "lfw-deepfunneled"), os.path.join(args.lfw, "pairs.txt"))
        if not os.path.exists(p)
    ]
    if missing:
        print(f"prepare_lfw: LFW not found: {', '.join(missing)}\n{LFW_SOURCE}", file=sys.stderr)
        return 1
    if args.finetune_folds:
        try:
            counts = build_finetune_split(
                args.lfw,
                args.out,
                parse_folds(args.eval_folds, 10**6),
                parse_folds(args.finetune_folds, 10**6),
                dict(encoding, progress=False),
            )
        except (OSError, ValueError) as e:
            print(f"prepare_lfw: error: {e}", file=sys.stderr)
            return 1
        print(f"LFW fine-tuning split in {args.out}: {counts}")
        return 0
    try:
        manifest, built = build_demo_split(
            args.lfw,
            args.out,
            eval_folds=parse_folds(args.eval_folds, 10**6),
            force=args.force,
            **encoding,
        )
    except (OSError, ValueError) as e:
        print(f"prepare_lfw: error: {e}", file=sys.stderr)
        return 1
    if not built:
        print(f"{manifest['out']}: outputs exist and match the settings; nothing to do (--force)")
    _print_summary(manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
