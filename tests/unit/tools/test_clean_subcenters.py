"""tools/clean_subcenters.py (Sub-center ArcFace's second stage) on real LFW faces: dominant
sub-centers and the kept images against a reference written here from the paper's rule."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from data.datasets import RecordDataset
from data.recordio import RecordIOReader, unpack
from evaluation.embedders import build_untrained, embed_images, load_embedder
from heads import PartialFC, save_head
from tests.helpers.lfw_rec import lfw_faces, write_lfw_rec
from tools import clean_subcenters

PEOPLE, PER, D = 6, 3, 32


@pytest.fixture(scope="module")
def run(lfw_root, tmp_path_factory):
    """A sub-center run (K = 2) over 18 faces: the backbone is untrained, the centers are set so
    that odd classes' dominant sub-center is 1 and class 0's third face is nearest to sub-center
    1 (its own embedding) while two faces vote for sub-center 0."""
    root = tmp_path_factory.mktemp("clean")
    faces = lfw_faces(lfw_root, PEOPLE, PER)
    write_lfw_rec(str(root / "src"), faces)
    step = root / "run" / "checkpoints" / "step_7"
    step.mkdir(parents=True)
    (root / "run" / "checkpoints" / "latest").write_text("step_7")
    net = build_untrained("r18", D, 0, {"base_width": 8})
    torch.save(net.state_dict(), step / "backbone.pt")
    meta = {"network": "r18", "embedding_size": D, "model_kwargs": {"base_width": 8}}
    (step / "meta.json").write_text(json.dumps(meta))
    data = RecordDataset(str(root / "src" / "train.rec"))  # the JPEGs as the tool decodes them
    images = np.stack([data[i][0] for i in range(len(data))])
    emb = torch.nn.functional.normalize(
        torch.from_numpy(embed_images(load_embedder(str(step)), images, flip=False)), dim=1
    )
    labels = torch.arange(PEOPLE).repeat_interleave(PER)  # write_lfw_rec: sorted names
    g = torch.Generator().manual_seed(1)
    centers = torch.empty(PEOPLE, 2, D)
    for c in range(PEOPLE):
        mean = emb[labels == c].mean(0)
        far = emb[c * PER + 2] if c == 0 else torch.randn(D, generator=g)
        centers[c] = torch.stack([mean, far] if c % 2 == 0 else [far, mean])
    head = PartialFC(D, PEOPLE, 1.0, num_subcenters=2)
    with torch.no_grad():
        head.weight.copy_(centers.view(-1, D))
    save_head(str(step), head)
    return root, emb, labels, centers


def reference(emb, labels, centers, threshold):
    """Sub-center ArcFace, Sec. 3: nearest sub-center per image, majority per class, angle."""
    w = torch.nn.functional.normalize(centers, dim=2)[labels]  # (N, K, D)
    cos = (w @ emb.unsqueeze(2)).squeeze(2).double()
    nearest = cos.argmax(1)
    dominant = [int(torch.bincount(nearest[labels == c], minlength=2).argmax()) for c in range(6)]
    dom = torch.tensor(dominant)[labels]
    angle = torch.rad2deg(torch.acos(cos[torch.arange(len(labels)), dom].clamp(-1, 1)))
    return dominant, angle.numpy(), (nearest != dom).sum().item(), angle.numpy() <= threshold


def test_clean_keeps_the_images_near_the_dominant_sub_center(run, tmp_path, capsys):
    root, emb, labels, centers = run
    angle_all = reference(emb, labels, centers, 180)[1]
    thr = float(np.median(angle_all))
    dominant, angle, non_dominant, keep = reference(emb, labels, centers, thr)
    assert dominant == [0, 1, 0, 1, 0, 1] and non_dominant >= 1
    assert 0 < keep.sum() < len(keep)
    out = tmp_path / "out"
    argv = [str(root / "run"), "--rec", str(root / "src"), "--out", str(out),
            "--threshold-deg", str(thr), "--batch-size", "5", "--no-progress"]  # fmt: skip
    assert clean_subcenters.main(argv) == 0
    assert f"kept {keep.sum()} of 18 images" in capsys.readouterr().out
    old = RecordIOReader(root / "src" / "train.rec", root / "src" / "train.idx")
    new = RecordIOReader(out / "train.rec", out / "train.idx")
    kept = np.nonzero(keep)[0]
    for k, i in enumerate(kept):
        assert new.read(1 + k) == old.read(1 + int(i))  # byte-identical, original order
    assert unpack(new.read(0))[0].label.tolist() == [len(kept) + 1, len(kept) + 1 + PEOPLE]
    rows = [line.split("\t") for line in (out / "dropped.tsv").read_text().splitlines()]
    assert [int(r[0]) for r in rows] == [1 + int(i) for i in np.nonzero(~keep)[0]]
    assert [int(r[1]) for r in rows] == labels[~torch.from_numpy(keep)].tolist()
    np.testing.assert_allclose([float(r[2]) for r in rows], angle[~keep], atol=0.01)
    assert np.load(out / "dominant.npy").tolist() == dominant
    report = json.loads((out / "clean_report.json").read_text())
    assert (report["images"], report["kept"], report["dropped"]) == (18, len(kept), 18 - len(kept))
    assert report["non_dominant"] == non_dominant and report["num_subcenters"] == 2
    emptied = sum(not keep[labels.numpy() == c].any() for c in range(PEOPLE))
    assert report["classes_with_images"] == PEOPLE and report["classes_emptied"] == emptied
    assert (out / "angles.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "property").read_text() == (root / "src" / "property").read_text()


def test_clean_at_180_degrees_keeps_everything(run, tmp_path):
    root, *_ = run
    step = str(root / "run" / "checkpoints" / "step_7")
    summary = clean_subcenters.clean(step, str(root / "src"), str(tmp_path / "o"), 180, 4, 1, False)
    assert (summary.kept, summary.dropped) == (18, 0)
    old = RecordIOReader(root / "src" / "train.rec", root / "src" / "train.idx")
    new = RecordIOReader(tmp_path / "o" / "train.rec", tmp_path / "o" / "train.idx")
    assert [new.read(k) for k in range(1, 19)] == [old.read(k) for k in range(1, 19)]
    assert (tmp_path / "o" / "dropped.tsv").read_text() == ""


def test_clean_bad_inputs(run, tmp_path, capsys):
    root, *_ = run
    step = root / "run" / "checkpoints" / "step_7"
    base = ["--rec", str(root / "src"), "--out", str(tmp_path / "o"), "--no-progress"]
    assert clean_subcenters.main([str(step), *base, "--threshold-deg", "0"]) == 1
    assert "--threshold-deg must be in (0, 180]" in capsys.readouterr().err
    other = tmp_path / "other"  # same backbone, a head of 7 classes
    other.mkdir()
    for name in ("backbone.pt", "meta.json"):
        (other / name).write_bytes((step / name).read_bytes())
    save_head(str(other), PartialFC(D, PEOPLE + 1, 1.0, num_subcenters=2))
    assert clean_subcenters.main([str(other), *base]) == 1
    assert "6 classes, but the head of" in capsys.readouterr().err
    os.remove(other / "head" / f"shard_0_{PEOPLE + 1}.pt")
    assert clean_subcenters.main([str(other), *base]) == 1
    assert "no shard_<start>_<end>.pt in" in capsys.readouterr().err
    assert clean_subcenters.main([str(tmp_path / "none"), *base]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written before the inputs were checked
