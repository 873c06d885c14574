"""IJB-B/C meta parsing and aligned faces (data/ijb.py) on a synthetic release built from real
LFW faces (tests/helpers/ijb_release.py, the `ijb_release` fixture of tests/unit/conftest.py).
Scoring: tests/unit/evaluation/test_ijb_metrics.py; the tool: tests/unit/tools/test_eval_ijb.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.ijb import AlignedFaces, load_1n, load_meta, read_template_pairs
from tests.helpers.synthetic_faces import best_shift

pytestmark = pytest.mark.usefixtures("one_thread")


def test_parse_release(ijb_release):
    root, truth = ijb_release
    meta = load_meta(root)
    assert meta.prefix == "ijbc" and meta.images == truth.images
    np.testing.assert_allclose(meta.landmarks, np.stack(truth.landmarks), atol=1e-4)
    np.testing.assert_allclose(meta.face_scores, truth.scores, atol=1e-6)
    assert meta.templates.tolist() == truth.templates and meta.medias.tolist() == truth.medias
    assert meta.pairs.tolist() == [[a, b] for a, b, _ in truth.pairs]
    assert meta.labels.tolist() == [bool(lab) for _, _, lab in truth.pairs]
    protocol = load_1n(root, "ijbc")
    for name, templates in truth.galleries.items():
        ids, subjects = protocol.galleries[name]
        assert ids.tolist() == templates
        assert subjects.tolist() == [truth.subject_of[t] for t in templates]
    assert protocol.probes[0].tolist() == truth.probes


def test_aligned_faces_recover_the_pasted_crops(ijb_release):
    root, truth = ijb_release
    meta = load_meta(root, pairs=False)
    faces = AlignedFaces(root, meta.images, meta.landmarks)
    for i in (0, 1, 7, len(faces) - 1):
        face, row = faces[i]
        assert row == i and face.dtype == torch.uint8 and tuple(face.shape) == (112, 112, 3)
        dy, dx, err = best_shift(truth.crops[i], face.numpy())
        assert (dy, dx) == (0, 0), f"face {i} is shifted by ({dy}, {dx}) px"
        assert err < 6.0, f"face {i}: mean abs difference {err:.2f}"


def test_missing_meta_files(ijb_release, tmp_path):
    with pytest.raises(FileNotFoundError, match="no ijbc_face_tid_mid.txt"):
        load_meta(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nope.txt: no such file"):
        read_template_pairs(str(tmp_path / "nope.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.txt: no template pairs"):
        read_template_pairs(str(empty))
