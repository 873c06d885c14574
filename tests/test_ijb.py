"""IJB-B/C evaluation: meta parsing (data/ijb.py), scoring (trainer/ijb_metrics.py) and
tools/eval_ijb.py, on a synthetic release built from real LFW faces (tests/ijb_release.py)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from data.ijb import AlignedFaces, load_1n, load_meta, read_template_pairs
from evaluation.ijb_metrics import (
    identification,
    identify_gallery,
    pool_templates,
    score_pairs,
    tar_at_far,
)
from tests.ijb_release import build_release
from tests.synthetic_faces import best_shift

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def release(lfw_root, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("IJB_release") / "IJBC")
    return root, build_release(lfw_root, root)


@pytest.fixture(scope="module")
def step_dir(tmp_path_factory):
    """A saved tiny IResNet (step dir with meta.json), as the trainer writes one."""
    from tests.test_verification import TINY_IRESNET, tiny_iresnet

    step = tmp_path_factory.mktemp("run") / "step_1"
    step.mkdir()
    torch.save(tiny_iresnet().state_dict(), step / "backbone.pt")
    (step / "meta.json").write_text(json.dumps(TINY_IRESNET))
    return str(step)


def test_parse_release(release):
    root, truth = release
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


def test_aligned_faces_recover_the_pasted_crops(release):
    root, truth = release
    meta = load_meta(root, pairs=False)
    faces = AlignedFaces(root, meta.images, meta.landmarks)
    for i in (0, 1, 7, len(faces) - 1):
        face, row = faces[i]
        assert row == i and face.dtype == torch.uint8 and tuple(face.shape) == (112, 112, 3)
        dy, dx, err = best_shift(truth.crops[i], face.numpy())
        assert (dy, dx) == (0, 0), f"face {i} is shifted by ({dy}, {dx}) px"
        assert err < 6.0, f"face {i}: mean abs difference {err:.2f}"


def _pool_brute_force(feats, templates, medias, scores):
    """arcface_torch's image2template_feature, loop by loop."""
    out = {}
    for t in sorted(set(templates)):
        media_feats = []
        for m in sorted({m for tt, m in zip(templates, medias) if tt == t}):
            rows = [i for i in range(len(feats)) if templates[i] == t and medias[i] == m]
            media_feats.append(np.mean([feats[i] * scores[i] for i in rows], axis=0))
        total = np.sum(media_feats, axis=0)
        out[t] = total / np.linalg.norm(total)
    return out


def test_template_pooling_equals_brute_force(release):
    _, truth = release
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(len(truth.images), 8)) * rng.uniform(
        0.5, 3, size=(len(truth.images), 1)
    )
    templates, medias = np.array(truth.templates), np.array(truth.medias)
    ids, pooled = pool_templates(feats, templates, medias, np.array(truth.scores))
    ref = _pool_brute_force(feats, truth.templates, truth.medias, truth.scores)
    assert ids.tolist() == sorted(ref)
    np.testing.assert_allclose(pooled, np.stack([ref[t] for t in ids]), atol=1e-6)
    # Per-image normalization and no score weighting are real options, not no-ops.
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    ref_unit = _pool_brute_force(unit, truth.templates, truth.medias, [1.0] * len(feats))
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


def _corrupt(root, name, line_number, text):
    path = os.path.join(root, "meta", name)
    with open(path) as f:
        lines = f.read().splitlines()
    lines[line_number - 1] = text
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    "name, line, text, needle",
    [
        ("ijbc_face_tid_mid.txt", 5, "5.jpg 100", "ijbc_face_tid_mid.txt line 5: expected"),
        ("ijbc_face_tid_mid.txt", 2, "2.jpg x 1000", "ijbc_face_tid_mid.txt line 2: expected"),
        ("ijbc_name_5pts_score.txt", 3, "3.jpg 1 2 3", "ijbc_name_5pts_score.txt line 3: expected"),
        ("ijbc_name_5pts_score.txt", 4, "../4.jpg" + " 1" * 11, "line 4: image name '../4.jpg'"),
        ("ijbc_template_pair_label.txt", 7, "100 101 2", "ijbc_template_pair_label.txt line 7"),
        ("ijbc_template_pair_label.txt", 9, "100 abc 1", "ijbc_template_pair_label.txt line 9"),
        ("ijbc_1N_gallery_G1.csv", 1, "ID,SUBJECT", "ijbc_1N_gallery_G1.csv line 1: expected"),
        ("ijbc_1N_probe_mixed.csv", 3, "200,x,img", "ijbc_1N_probe_mixed.csv line 3: expected"),
        (
            "ijbc_face_tid_mid.txt",
            6,
            "99.jpg 100 1001",
            "ijbc_face_tid_mid.txt line 6 names '99.jpg'",
        ),
    ],
)
def test_malformed_meta_is_one_line_naming_file_and_line(
    release, tmp_path, capsys, name, line, text, needle
):
    import shutil

    from tools import eval_ijb

    src, _ = release
    root = str(tmp_path / "IJBC")
    shutil.copytree(os.path.join(src, "meta"), os.path.join(root, "meta"))
    _corrupt(root, name, line, text)
    features = tmp_path / "f.npy"
    np.save(features, np.ones((36, 4), np.float32))
    with pytest.raises(SystemExit) as info:
        eval_ijb.main(
            ["--release", root, "--image-features", str(features), "--out", str(tmp_path)]
        )
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("eval_ijb: error: "), err
    assert needle in err[0], err


def test_missing_meta_files(release, tmp_path):
    with pytest.raises(FileNotFoundError, match="no ijbc_face_tid_mid.txt"):
        load_meta(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nope.txt: no such file"):
        read_template_pairs(str(tmp_path / "nope.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.txt: no template pairs"):
        read_template_pairs(str(empty))


def _eval(args):
    from tools import eval_ijb

    return eval_ijb.main([*args, "--no-progress"])


@pytest.fixture(scope="module")
def one_process_run(release, step_dir, tmp_path_factory):
    """tools/eval_ijb.py on the synthetic release in one process: (results, output folder)."""
    out = tmp_path_factory.mktemp("ijb_eval")
    root, _ = release
    return _eval(["--model", step_dir, "--release", root, "--out", str(out), "--workers", "2"]), out


def test_eval_ijb_tool_end_to_end(release, step_dir, one_process_run, tmp_path):
    import cv2

    from data.align import align_face
    from evaluation.embedders import embed_images, load_embedder
    from tools.convert_to_onnx import export_onnx

    root, truth = release
    res, out = one_process_run
    assert res["options"] == {"flip": True, "detector_score": True, "normalize_images": False}
    assert set(res["tar_at_far"]) == {"nearest", "strict"}
    assert list(res["tar_at_far"]["strict"]) == [
        "1e-06",
        "1e-05",
        "1e-04",
        "1e-03",
        "1e-02",
        "1e-01",
    ]
    assert set(res["identification"]["galleries"]) == {"G1", "G2"}
    assert json.loads((out / "results.json").read_text())["model"] == step_dir
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Image features: decode + align + flip-summed embedding, computed here independently.
    feats = np.load(out / "image_features.npy")
    faces = []
    for name, lmk in zip(truth.images, load_meta(root, pairs=False).landmarks):  # as written
        bgr = cv2.imread(os.path.join(root, "loose_crop", name))
        faces.append(align_face(np.ascontiguousarray(bgr[:, :, ::-1]), lmk))
    embedder = load_embedder(step_dir, batch_size=16)  # conv kernels vary with batch: ~1e-5
    expected = embed_images(embedder, np.stack(faces), flip=True)
    np.testing.assert_allclose(feats, expected, atol=1e-4 * np.abs(expected).max())
    # Scores: arcface_torch's pooling written out by hand, then dot products.
    ref = _pool_brute_force(feats, truth.templates, truth.medias, truth.scores)
    np.testing.assert_allclose(
        np.load(out / "scores.npy"), [ref[a] @ ref[b] for a, b, _ in truth.pairs], atol=1e-5
    )
    saved = np.load(out / "template_features.npz")
    assert saved["ids"].tolist() == sorted(truth.subject_of)
    # Re-scoring from the saved features, an option off: no model, other scores, option named.
    again = _eval(
        ["--image-features", str(out / "image_features.npy"), "--release", root,
         "--out", str(tmp_path / "rescored"), "--no-detector-score"]
    )  # fmt: skip
    assert again["options"]["detector_score"] is False
    assert not np.allclose(
        np.load(tmp_path / "rescored" / "scores.npy"), np.load(out / "scores.npy")
    )
    # The ONNX export of the same weights gives the same features.
    onnx = tmp_path / "backbone.onnx"
    export_onnx(_net(step_dir), onnx)
    _eval(["--model", str(onnx), "--release", root, "--out", str(tmp_path / "onnx"), "--no-1n"])
    onnx_feats = np.load(tmp_path / "onnx" / "image_features.npy")
    np.testing.assert_allclose(onnx_feats, feats, atol=1e-4 * np.abs(feats).max())


def _net(step_dir):
    from models.weights import load_backbone

    return load_backbone(step_dir)


def _sharded_eval(rank, world_size, root, step_dir, out):
    from tools import eval_ijb

    res = eval_ijb.main(
        ["--model", step_dir, "--release", root, "--out", out, "--workers", "0", "--no-progress"]
    )
    return res if rank == 0 else "no results off rank 0"


def test_eval_ijb_sharded_over_two_processes(release, step_dir, one_process_run, tmp_path):
    from tests.distributed import run_distributed

    root, _ = release
    single, one = one_process_run
    outs = run_distributed(_sharded_eval, 2, args=(root, step_dir, str(tmp_path / "two")))
    assert outs[1] == "no results off rank 0"
    np.testing.assert_allclose(
        np.load(tmp_path / "two" / "image_features.npy"),
        np.load(one / "image_features.npy"),
        atol=1e-5,
    )
    for rule in ("nearest", "strict"):
        assert outs[0]["tar_at_far"][rule] == pytest.approx(single["tar_at_far"][rule])
    for kind in ("rank", "tpir"):
        got = outs[0]["identification"]["mean"][kind]
        assert got == pytest.approx(single["identification"]["mean"][kind])
