"""IJB-B/C scoring (evaluation/ijb_metrics.py): template pooling against arcface_torch's loops on
the synthetic release (tests/helpers/ijb_release.py), TAR@FAR and identification by hand."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.ijb_metrics import (
    identification,
    identify_gallery,
    pool_templates,
    score_pairs,
    tar_at_far,
)
from tests.helpers.ijb_release import pool_brute_force

pytestmark = pytest.mark.usefixtures("one_thread")


def test_template_pooling_equals_brute_force(ijb_release):
    _, truth = ijb_release
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(len(truth.images), 8)) * rng.uniform(
        0.5, 3, size=(len(truth.images), 1)
    )
    templates, medias = np.array(truth.templates), np.array(truth.medias)
    ids, pooled = pool_templates(feats, templates, medias, np.array(truth.scores))
    ref = pool_brute_force(feats, truth.templates, truth.medias, truth.scores)
    assert ids.tolist() == sorted(ref)
    np.testing.assert_allclose(pooled, np.stack([ref[t] for t in ids]), atol=1e-6)
    # Per-image normalization and no score weighting are real options, not no-ops.
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    ref_unit = pool_brute_force(unit, truth.templates, truth.medias, [1.0] * len(feats))
    _, pooled_unit = pool_templates(feats, templates, medias, None, normalize_images=True)
    np.testing.assert_allclose(pooled_unit, np.stack([ref_unit[t] for t in ids]), atol=1e-6)
    assert not np.allclose(pooled_unit, pooled, atol=1e-3)
    pairs = np.array([[a, b] for a, b, _ in truth.pairs])
    scores = score_pairs(ids, pooled, pairs, chunk=7)  # several chunks
    np.testing.assert_allclose(scores, [ref[a] @ ref[b] for a, b in pairs], atol=1e-6)
    with pytest.raises(ValueError, match="without images, e.g. 999"):
        score_pairs(ids, pooled, np.array([[100, 999]]))


def test_tar_at_far_both_rules_hand_computed():
    # 4 genuine, 10 impostor scores. sklearn's ROC (drop_intermediate) keeps the points
    # (fpr, tpr) = (0, 0), (0, .25), (.1, .25), (.1, 1), (1, 1).
    genuine = [0.9, 0.8, 0.7, 0.6]
    impostor = [0.85, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.0, -0.1, -0.2]
    labels = np.array([True] * 4 + [False] * 10)
    scores = np.array(genuine + impostor)
    got = tar_at_far(labels, scores, fars=(1e-6, 1e-2, 0.06, 0.1, 0.5))
    # nearest: the ROC point whose FPR is nearest the target (0.06 -> FPR 0.1, TPR 1);
    # strict: FPR <= target (0.06 -> only FPR 0, TPR 0.25).
    assert got["nearest"] == {
        "1e-06": 0.25,
        "1e-02": 0.25,
        "6e-02": 1.0,
        "1e-01": 1.0,
        "5e-01": 1.0,
    }
    assert got["strict"] == {
        "1e-06": 0.25,
        "1e-02": 0.25,
        "6e-02": 0.25,
        "1e-01": 1.0,
        "5e-01": 1.0,
    }
    with pytest.raises(ValueError, match="genuine"):
        tar_at_far(np.ones(3, bool), np.zeros(3))


def test_identification_hand_computed():
    gallery = np.eye(3)  # scores are the probe vectors' components
    gallery_subjects = np.array([10, 20, 30])
    mated = [
        ([0.9, 0.2, 0.1], 10),
        ([0.5, 0.4, 0.1], 20),
        ([0.1, 0.2, 0.7], 30),
        ([0.3, 0.35, 0.6], 10),
    ]
    # ranks: 1, 2, 1, 3; mated scores .9 .4 .7 .3
    nonmated_best = [0.8, 0.6, 0.5, 0.2, 0.1, 0.1, 0.05, 0.0, 0.0, 0.0]
    probes = np.array([v for v, _ in mated] + [[s, 0.0, 0.0] for s in nonmated_best])
    subjects = np.array([s for _, s in mated] + list(range(40, 50)))
    got = identify_gallery(
        probes, subjects, gallery, gallery_subjects, ranks=(1, 2, 5), fpirs=(0.01, 0.1, 0.3)
    )
    assert got["rank"] == {"1": 0.5, "2": 0.75, "5": 1.0}
    assert (got["num_mated"], got["num_nonmated"]) == (4, 10)
    # FPIR .01: k=0, threshold .8 -> only .9 passes; .1: k=1, t=.6 -> .9, .7; .3: k=3, t=.2 -> same
    assert got["tpir"] == {"1e-02": 0.25, "1e-01": 0.5, "3e-01": 0.5}
    # Two galleries: the mean of each one's metrics.
    ids = np.array([1, 2, 3, 11, 12] + list(range(100, 114)))
    feats = np.concatenate([gallery, np.eye(3)[:2], probes])
    both = identification(
        ids,
        feats,
        {"G1": (ids[:3], gallery_subjects), "G2": (ids[3:5], np.array([40, 41]))},
        (ids[5:], subjects),
    )
    # G1: as above. G2 enrolls subjects 40, 41 (probes [.8,0,0] rank 1 and [.6,0,0] rank 2);
    # its 12 non-mated best scores: .9 .5 .5 .35 .2 .2 .1 .1 .05 0 0 0 -> t(.01) = .9, t(.1) = .5.
    g1, g2 = both["galleries"]["G1"], both["galleries"]["G2"]
    assert g1["rank"] == {"1": 0.5, "5": 1.0, "10": 1.0}
    assert g1["tpir"] == {"1e-02": 0.25, "1e-01": 0.5}
    assert g2["rank"] == {"1": 0.5, "5": 1.0, "10": 1.0}
    assert g2["tpir"] == {"1e-02": 0.0, "1e-01": 0.5}
    assert both["mean"] == {
        "rank": {"1": 0.5, "5": 1.0, "10": 1.0},
        "tpir": {"1e-02": 0.125, "1e-01": 0.5},
    }
    with pytest.raises(ValueError, match="several templates"):
        identify_gallery(probes, subjects, gallery, np.array([10, 10, 30]))
