"""data/align.py: 5-point similarity alignment recovers a face pasted at a known pose."""

import numpy as np
import pytest

from data.align import ARCFACE_TEMPLATE, align_face, estimate_transform
from tests.helpers.synthetic_faces import best_shift, lfw_crop, paste_face, similarity

# (scale, angle in degrees, tx, ty) of the crop inside a 300x260 (H x W) canvas.
POSES = [(1.0, 0.0, 40.0, 60.0), (1.7, 25.0, 120.0, 30.0), (0.8, -40.0, 60.0, 150.0)]


@pytest.mark.parametrize("pose", POSES)
def test_alignment_recovers_pasted_lfw_crop(lfw_root, pose):
    crop = lfw_crop(lfw_root, "Aaron_Peirsol", 1)
    paste = similarity(*pose)
    canvas, landmarks = paste_face(crop, paste, (300, 260))
    # Geometry: alignment composed with the paste maps every crop pixel back within 1 px.
    align = estimate_transform(landmarks)
    composed = align[:, :2] @ paste[:, :2]
    corners = np.array([[0, 0], [111, 0], [0, 111], [111, 111]], np.float64)
    back = corners @ composed.T + (align[:, :2] @ paste[:, 2] + align[:, 2])
    assert np.abs(back - corners).max() < 1.0
    # Pixels: the aligned image is the crop (no shift, only resampling blur).
    aligned = align_face(canvas, landmarks)
    assert aligned.shape == (112, 112, 3) and aligned.dtype == np.uint8
    dy, dx, err = best_shift(crop, aligned)
    assert (dy, dx) == (0, 0), f"aligned face is shifted by ({dy}, {dx}) px"
    assert err < 3.0, f"mean abs difference {err:.2f} gray levels"


def test_template_is_the_arcface_112_template():
    assert ARCFACE_TEMPLATE[0].tolist() == pytest.approx([38.2946, 51.6963])
    assert ARCFACE_TEMPLATE[4].tolist() == pytest.approx([70.7299, 92.2041])
    # Landmarks already on the template need the identity.
    assert np.allclose(estimate_transform(ARCFACE_TEMPLATE), np.eye(3)[:2], atol=1e-9)


@pytest.mark.parametrize(
    "landmarks, message",
    [
        (np.zeros((4, 2)), "shape"),
        (np.full((5, 2), np.nan), "finite"),
        (np.array([[1.0, 1.0]] * 5), "collapsed"),
        (np.ones((5, 3)), "shape"),
    ],
)
def test_degenerate_landmarks_raise(landmarks, message):
    with pytest.raises(ValueError, match=message):
        align_face(np.zeros((50, 50, 3), np.uint8), landmarks)


def test_bad_image_raises():
    with pytest.raises(ValueError, match="uint8"):
        align_face(np.zeros((50, 50), np.uint8), ARCFACE_TEMPLATE)
