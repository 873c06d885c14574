"""Builders for the hostile-input tests (issue 19, docs/reliability.md): small JPEGs, a tiny
`.rec` with chosen image sizes and header, and a pickled payload that proves code ran."""

from __future__ import annotations

import os

import numpy as np
import simplejpeg


class Payload:
    """Unpickling calls os.mkdir(marker): proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def jpeg(side=112, seed=0):
    """A random RGB JPEG of side x side pixels."""
    img = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return simplejpeg.encode_jpeg(img, quality=90, colorspace="RGB")


def flat_jpeg(side, value=128):
    """A uniform side x side JPEG (a few hundred bytes)."""
    return simplejpeg.encode_jpeg(
        np.full((side, side, 3), value, np.uint8), quality=90, colorspace="RGB"
    )


def make_rec(folder, n=8, classes=4, side=112, sides=None, header=False):
    """`folder/train.rec|idx` + `property`: n images, label i % classes; `sides` maps an image
    index to another side; `header` writes insightface's key-0 header (images at keys 1..n)."""
    from data.recordio import IRHeader, RecordIOWriter, pack, write_property

    os.makedirs(folder, exist_ok=True)
    first = 1 if header else 0
    with RecordIOWriter(f"{folder}/train.rec", f"{folder}/train.idx") as w:
        if header:
            w.write(0, pack(IRHeader(0, [n + 1, n + 1 + classes], 0, 0), b""))
        for i in range(n):
            img = flat_jpeg((sides or {}).get(i, side), 10 * i)
            w.write(first + i, pack(IRHeader(0, float(i % classes), first + i, 0), img))
    write_property(folder, classes, side, side)
    return str(folder)
