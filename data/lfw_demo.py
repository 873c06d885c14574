"""The LFW demo split: a training ``.rec`` and a held-out verification ``.bin`` from LFW.

Verification pairs are the chosen folds of LFW View 2 ``pairs.txt``; training identities are the
people with at least 2 images who appear in none of those pairs (folds are identity-disjoint, so
the split is clean). Every image is cropped to ``data.lfw.LFW_CROP`` of the deep-funneled 250x250
image and resized. Outputs in OUT: ``train.rec/.idx/.lst``, ``property`` (insightface layout with
header record), ``lfw_heldout.bin`` and the manifest ``prepare_lfw.json``; a rebuild with the same
settings and intact outputs does nothing.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from typing import Any, TypedDict

from data.atomic import write_text_atomic
from data.lfw import LFW_CROP, build_bin, split_lfw
from data.pack_rec import convert

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(_REPO_ROOT, "work_dirs", "lfw_demo")
DEFAULT_EVAL_FOLDS = (1, 2, 3)  # pairs.txt folds held out for verification
MANIFEST = "prepare_lfw.json"
OUTPUTS = ("train.rec", "train.idx", "train.lst", "property", "lfw_heldout.bin")


class DemoSettings(TypedDict):
    """What a build depends on; stored in the manifest to tell whether a rebuild is needed."""

    pair_order: str
    lfw: str
    eval_folds: list[int]
    crop: list[int]
    size: int
    quality: int


# The manifest as written and read back (JSON): out, settings, summary, outputs.
Manifest = dict[str, Any]


def _settings(lfw: str, eval_folds: list[int], size: int, quality: int) -> DemoSettings:
    return {
        "pair_order": "interleaved",
        "lfw": os.path.abspath(lfw),
        "eval_folds": eval_folds,
        "crop": list(LFW_CROP),
        "size": size,
        "quality": quality,
    }


def _up_to_date(out: str, settings: DemoSettings) -> Manifest | None:
    path = os.path.join(out, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("settings") != settings:
        return None  # JSON that is not an object is not a manifest either
    outputs = manifest.get("outputs", {})
    if not isinstance(outputs, dict):
        return None
    for name, size in outputs.items():
        file = os.path.join(out, name)
        if not os.path.isfile(file) or os.path.getsize(file) != size:
            return None
    return manifest if set(outputs) == set(OUTPUTS) else None


def build_demo_split(
    lfw: str,
    out: str = DEFAULT_OUT,
    *,
    eval_folds: Sequence[int] = DEFAULT_EVAL_FOLDS,
    size: int = 112,
    quality: int = 95,
    workers: int = 1,
    force: bool = False,
    progress: bool = True,
) -> tuple[Manifest, bool]:
    """Build (or confirm) the split of ``lfw`` (``lfw-deepfunneled/`` + ``pairs.txt``) in ``out``.

    Args:
        eval_folds: 1-based ``pairs.txt`` folds held out for verification.
        size, quality, workers: output side (px), JPEG quality, encoding processes.
        force: rebuild even when the manifest says the outputs match these settings.
    Returns:
        (manifest dict: ``out``, ``settings``, ``summary`` counts, ``outputs`` name -> bytes;
        whether it was built now, False when the outputs were already up to date).
    Raises:
        FileNotFoundError / ValueError: missing LFW files, bad pairs.txt or folds, an unreadable
            image (the split must be complete).
    """
    eval_folds = list(eval_folds)  # as JSON gives it back from the manifest
    settings = _settings(lfw, eval_folds, size, quality)
    out = os.path.abspath(out)
    if not force and (current := _up_to_date(out, settings)):
        return current, False
    t0 = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    if os.path.exists(os.path.join(out, MANIFEST)):
        os.remove(os.path.join(out, MANIFEST))  # a crash below must not leave a matching manifest
    samples, names, pairs = split_lfw(lfw, eval_folds)
    image_root = os.path.join(lfw, "lfw-deepfunneled")
    result = convert(
        samples, out, workers=workers, insightface_header=True, num_classes=len(names),
        root=image_root, crop=LFW_CROP, size=size, quality=quality, progress=progress,
    )  # fmt: skip
    if result.skipped:
        raise ValueError("unreadable LFW images:\n" + "\n".join(result.lines()[2:]))
    bin_path = os.path.join(out, "lfw_heldout.bin")
    build_bin(
        pairs, image_root, bin_path, crop=LFW_CROP, size=size, quality=quality, progress=progress
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
    write_text_atomic(os.path.join(out, MANIFEST), json.dumps(manifest, indent=1))
    return manifest, True
