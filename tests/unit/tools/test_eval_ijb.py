"""tools/eval_ijb.py on the synthetic IJB-C release (tests/helpers/ijb_release.py): end to end
against features and scores computed here, sharded over two processes, malformed meta files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from data.ijb import load_meta
from tests.helpers.distributed import run_distributed
from tests.helpers.ijb_release import pool_brute_force
from tests.helpers.tiny_eval import TINY_IRESNET, tiny_iresnet

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def step_dir(tmp_path_factory):
    """A saved tiny IResNet (step dir with meta.json), as the trainer writes one."""
    step = tmp_path_factory.mktemp("run") / "step_1"
    step.mkdir()
    torch.save(tiny_iresnet().state_dict(), step / "backbone.pt")
    (step / "meta.json").write_text(json.dumps(TINY_IRESNET))
    return str(step)


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
    ijb_release, tmp_path, capsys, name, line, text, needle
):
    import shutil

    from tools import eval_ijb

    src, _ = ijb_release
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


def _eval(args):
    from tools import eval_ijb

    return eval_ijb.main([*args, "--no-progress"])


@pytest.fixture(scope="module")
def one_process_run(ijb_release, step_dir, tmp_path_factory):
    """tools/eval_ijb.py on the synthetic release in one process: (results, output folder)."""
    out = tmp_path_factory.mktemp("ijb_eval")
    root, _ = ijb_release
    return _eval(["--model", step_dir, "--release", root, "--out", str(out), "--workers", "2"]), out


def test_eval_ijb_tool_end_to_end(ijb_release, step_dir, one_process_run, tmp_path):
    import cv2

    from data.align import align_face
    from evaluation.embedders import embed_images, load_embedder
    from tools.convert_to_onnx import export_onnx

    root, truth = ijb_release
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
    ref = pool_brute_force(feats, truth.templates, truth.medias, truth.scores)
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


def test_eval_ijb_sharded_over_two_processes(ijb_release, step_dir, one_process_run, tmp_path):
    root, _ = ijb_release
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
