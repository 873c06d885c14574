"""The one builder of insightface-layout `.rec` files from real LFW faces.

``lfw_faces`` picks and crops the faces (PIL: LFW's face box, resized to 112x112, nothing from
data/), ``write_lfw_rec`` packs them (JPEG, header record, identity records, ``property``).
``write_lfw16`` is the 16-identity set the launch and fault tests train on (the session fixture
``lfw16`` of tests/conftest.py builds it once per session).
"""

from __future__ import annotations

import os

import numpy as np
import simplejpeg
from PIL import Image

from data.lfw import LFW_CROP
from data.recordio import IRHeader, RecordIOWriter, pack

# The 16-identity set: the first 16 people (sorted) with 20-60 images each, all of their images
# (481 faces): few enough for a 2-process CPU step well under a second, enough for a loss that
# can fall in 20 steps.
LFW16_CLASSES = 16
LFW16_IMAGES = (20, 60)


def lfw_faces(
    lfw_root: str,
    num_people: int,
    per_person: int | None = 3,
    *,
    min_images: int | None = None,
    max_images: int | None = None,
):
    """Real LFW crops ``[(name, uint8 (112, 112, 3) RGB)]``, people in sorted order.

    Args:
        num_people: how many people.
        per_person: the first this many images of each person (sorted file names); ``None``:
            all of them.
        min_images, max_images: only people with that many images (``min_images`` defaults to
            ``per_person``, or 1 with ``per_person=None``; ``max_images`` to no bound).
    """
    base = os.path.join(lfw_root, "lfw-deepfunneled")
    low = min_images if min_images is not None else per_person or 1
    out, people = [], 0
    for name in sorted(os.listdir(base)):
        files = sorted(os.listdir(os.path.join(base, name)))
        if len(files) < low or (max_images is not None and len(files) > max_images):
            continue
        for f in files[:per_person]:
            with Image.open(os.path.join(base, name, f)) as im:
                face = im.convert("RGB").crop(LFW_CROP).resize((112, 112), Image.BILINEAR)
            out.append((name, np.asarray(face)))
        people += 1
        if people == num_people:
            return out
    raise AssertionError(f"{base}: fewer than {num_people} people with {low}+ images")


def write_lfw_rec(folder, faces, with_header=True, property_file=True, quality=95):
    """insightface-layout .rec of ``faces``; returns (rec, idx, labels list, encoded jpegs)."""
    os.makedirs(folder, exist_ok=True)
    rec, idx = os.path.join(folder, "train.rec"), os.path.join(folder, "train.idx")
    names = sorted({n for n, _ in faces})
    label_of = {n: i for i, n in enumerate(names)}
    labels, jpegs = [], []
    n = len(faces)
    with RecordIOWriter(rec, idx) as w:
        first = 1 if with_header else 0
        if with_header:  # key 0: image keys are range(1, n+1); identities follow
            w.write(0, pack(IRHeader(2, [n + 1, n + 1 + len(names)], 0, 0), b""))
        for k, (name, img) in enumerate(faces):
            buf = simplejpeg.encode_jpeg(img, quality=quality, colorspace="RGB")
            labels.append(label_of[name])
            jpegs.append(buf)
            w.write(first + k, pack(IRHeader(0, float(label_of[name]), first + k, 0), buf))
        if with_header:
            for c, name in enumerate(names):
                keys = [1 + k for k, (nm, _) in enumerate(faces) if nm == name]
                w.write(n + 1 + c, pack(IRHeader(2, [keys[0], keys[-1] + 1], n + 1 + c, 0), b""))
    if property_file:
        with open(os.path.join(folder, "property"), "w") as fh:
            fh.write(f"{len(names)},112,112\n")
    return rec, idx, labels, jpegs


def write_lfw16(lfw_root: str, folder: str) -> str:
    """The 16-identity set (``LFW16_CLASSES`` people, all their images) in ``folder``."""
    low, high = LFW16_IMAGES
    faces = lfw_faces(lfw_root, LFW16_CLASSES, None, min_images=low, max_images=high)
    write_lfw_rec(folder, faces)
    return folder
