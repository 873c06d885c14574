"""5-point face alignment to the ArcFace 112x112 template (insightface's ``norm_crop``).

A face is mapped onto the template by the similarity transform (rotation, uniform scale,
translation) that fits its five landmarks (left eye, right eye, nose tip, left and right mouth
corners, in image pixels) to the template in the least-squares sense: Umeyama, "Least-squares
estimation of transformation parameters between two point patterns", TPAMI 1991, as
``skimage.transform.SimilarityTransform`` computes it. arcface_torch's IJB evaluation
(``eval_ijbc.py``) and insightface's ``face_align.norm_crop`` do the same, then warp with
``cv2.warpAffine`` (bilinear, black border); so do we, so the aligned crops match theirs.

Used by IJB evaluation (``data/ijb.py``), face alignment of image folders and dataset building.
"""

from __future__ import annotations

import cv2
import numpy as np
from numpy.typing import NDArray
from skimage.transform import SimilarityTransform

__all__ = ["ARCFACE_TEMPLATE", "ALIGNED_SIZE", "estimate_transform", "align_face"]

ALIGNED_SIZE = 112
# ArcFace 5-point template for 112x112 crops, (x, y) pixels: the 96x112 template of
# SphereFace/insightface (30.2946, 51.6963) ... with x + 8 to centre it in a square crop.
ARCFACE_TEMPLATE: NDArray[np.float64] = np.array(
    [
        [30.2946 + 8.0, 51.6963],  # left eye
        [65.5318 + 8.0, 51.5014],  # right eye
        [48.0252 + 8.0, 71.7366],  # nose tip
        [33.5493 + 8.0, 92.3655],  # left mouth corner
        [62.7299 + 8.0, 92.2041],  # right mouth corner
    ],
    dtype=np.float64,
)
# Landmarks spread (RMS distance to their centroid) below this many pixels count as collapsed.
_MIN_SPREAD_PX = 1e-3


def estimate_transform(landmarks: NDArray[np.floating]) -> NDArray[np.float64]:
    """2x3 affine matrix of the similarity transform taking ``landmarks`` onto the template.

    Args:
        landmarks: (5, 2) float, (x, y) in source-image pixels, in template order (left eye,
            right eye, nose, left mouth corner, right mouth corner).
    Returns:
        (2, 3) float64 ``M`` with ``[x', y'] = M @ [x, y, 1]`` in 112x112 crop pixels; the input
        of ``cv2.warpAffine``.
    Raises:
        ValueError: wrong shape, non-finite values, or points collapsed onto (nearly) one point
            so no rotation/scale is defined.
    """
    pts = np.asarray(landmarks, dtype=np.float64)
    if pts.shape != (5, 2):
        raise ValueError(f"landmarks must have shape (5, 2), got {pts.shape}")
    if not np.isfinite(pts).all():
        raise ValueError(f"landmarks must be finite, got {pts.tolist()}")
    spread = float(np.sqrt(((pts - pts.mean(axis=0)) ** 2).sum(axis=1).mean()))
    if spread < _MIN_SPREAD_PX:
        raise ValueError(
            f"landmarks are collapsed onto one point (spread {spread:.2g} px): {pts.tolist()}"
        )
    tform = SimilarityTransform.from_estimate(pts, ARCFACE_TEMPLATE)
    if not tform:  # skimage returns a falsy FailedEstimation instead of raising
        raise ValueError(f"no similarity transform fits landmarks {pts.tolist()}: {tform}")
    matrix = np.asarray(tform.params[:2, :], dtype=np.float64)
    if not np.isfinite(matrix).all():
        raise ValueError(f"similarity transform of landmarks {pts.tolist()} is not finite")
    return matrix


def align_face(
    image: NDArray[np.uint8], landmarks: NDArray[np.floating], size: int = ALIGNED_SIZE
) -> NDArray[np.uint8]:
    """Warp ``image`` so its five landmarks land on the ArcFace template.

    Args:
        image: (H, W, 3) uint8 (any channel order; it is kept).
        landmarks: (5, 2) float (x, y) pixels of ``image``, see ``estimate_transform``.
        size: output side; only 112 matches the template (kept as an argument for clarity).
    Returns:
        (size, size, 3) uint8 aligned crop; pixels outside ``image`` are black (0).
    Raises:
        ValueError: ``image`` is not (H, W, 3) uint8, ``size`` is not 112, or the landmarks are
            degenerate (see ``estimate_transform``).
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"image must be (H, W, 3) uint8, got shape {image.shape} dtype {image.dtype}"
        )
    if size != ALIGNED_SIZE:
        raise ValueError(f"the ArcFace template is for {ALIGNED_SIZE}x{ALIGNED_SIZE}, got {size}")
    matrix = estimate_transform(landmarks)
    out = cv2.warpAffine(image, matrix, (size, size), borderValue=0.0)
    return np.asarray(out, dtype=np.uint8)
