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


def bomb_jpeg(height=50000, width=50000):
    """A few-hundred-byte JPEG whose frame header (SOF0) declares height x width pixels: the
    scan data is a 16x16 image's, so only a decoder that trusts the header allocates."""
    buf = bytearray(flat_jpeg(16))
    sof = buf.index(b"\xff\xc0")  # marker, length (2), precision (1), height (2), width (2)
    buf[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(buf)


def bomb_png(height=30000, width=30000):
    """A PNG (one IDAT of a 1x1 image) whose IHDR declares height x width pixels."""
    import struct
    import zlib

    def chunk(kind, data):
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00\x00\x00\x00")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def bmp_header(height=30000, width=30000):
    """A 54-byte BMP header declaring height x width 24-bit pixels and no pixel data."""
    import struct

    return (
        b"BM"
        + struct.pack("<IHHI", 54, 0, 0, 54)
        + struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    )


def no_decoder(monkeypatch):
    """Make every image decoder fail loudly: a guard that reads headers only never calls them."""
    import cv2

    import data.decode as dec

    def called(*args, **kwargs):
        raise AssertionError("a decoder ran on a file that declares a huge size")

    monkeypatch.setattr(dec.simplejpeg, "decode_jpeg", called)
    monkeypatch.setattr(dec.cv2, "imdecode", called)
    monkeypatch.setattr(cv2, "imdecode", called)
    monkeypatch.setattr(dec, "_decode_pil", called)
