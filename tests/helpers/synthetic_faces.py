"""Test helper: real LFW face crops pasted into larger images by a known similarity transform.

The ArcFace template mapped through that transform gives the exact 5 landmarks of the pasted
face, so alignment (``data.align``) must recover the 112x112 crop; the IJB tests build their
synthetic release from these images.
"""

from __future__ import annotations

import os

import cv2
import numpy as np

from data.align import ALIGNED_SIZE, ARCFACE_TEMPLATE
from data.decode import decode_image
from data.lfw import LFW_CROP


def lfw_crop(lfw_root: str, name: str, number: int = 1) -> np.ndarray:
    """(112, 112, 3) uint8 RGB: the face box of an LFW deep-funneled image, resized."""
    path = os.path.join(lfw_root, "lfw-deepfunneled", name, f"{name}_{number:04d}.jpg")
    with open(path, "rb") as f:
        img = decode_image(f.read())
    left, top, right, bottom = LFW_CROP
    face = img[top:bottom, left:right]
    return cv2.resize(face, (ALIGNED_SIZE, ALIGNED_SIZE), interpolation=cv2.INTER_AREA)


def similarity(scale: float, angle_deg: float, tx: float, ty: float) -> np.ndarray:
    """(2, 3) float64 matrix of x' = scale * R(angle) x + t."""
    a = np.deg2rad(angle_deg)
    c, s = scale * np.cos(a), scale * np.sin(a)
    return np.array([[c, -s, tx], [s, c, ty]], dtype=np.float64)


def paste_face(
    crop: np.ndarray, matrix: np.ndarray, canvas_hw: tuple[int, int], background: int = 90
) -> tuple[np.ndarray, np.ndarray]:
    """Warp ``crop`` into a ``canvas_hw`` image by ``matrix`` (crop -> canvas pixels).

    Returns:
        (canvas (H, W, 3) uint8, landmarks (5, 2) float64: the template mapped by ``matrix``).
    """
    h, w = canvas_hw
    canvas = np.full((h, w, 3), background, np.uint8)
    warped = cv2.warpAffine(crop, matrix, (w, h), flags=cv2.INTER_CUBIC)
    mask = cv2.warpAffine(np.ones(crop.shape[:2], np.uint8), matrix, (w, h)) > 0
    canvas[mask] = warped[mask]
    landmarks = ARCFACE_TEMPLATE @ matrix[:, :2].T + matrix[:, 2]
    return canvas, landmarks


def best_shift(a: np.ndarray, b: np.ndarray, border: int = 6) -> tuple[int, int, float]:
    """Integer (dy, dx) in [-2, 2]^2 minimizing the mean |a - shifted b| over the interior of two
    (112, 112, 3) images, and that mean (gray levels): (0, 0) = aligned within a pixel."""
    best = (0, 0, np.inf)
    inner = slice(border, ALIGNED_SIZE - border)
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            shifted = np.roll(b.astype(np.float64), (dy, dx), axis=(0, 1))
            err = float(np.abs(a[inner, inner].astype(np.float64) - shifted[inner, inner]).mean())
            if err < best[2]:
                best = (dy, dx, err)
    return best
