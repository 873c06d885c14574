"""data/rec_copy.py (tools/shuffle_rec.py) and folder2rec --shuffle on real LFW faces:
record-for-record copies."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest

from data import rec_copy
from data.datasets import RecordDataset
from data.image_index import build_image_index
from data.recordio import RecordIOReader, unpack
from tests.helpers.lfw_rec import lfw_faces, write_lfw_rec
from tools import folder2rec, inspect_rec, shuffle_rec


@pytest.fixture(scope="module")
def src(lfw_root, tmp_path_factory):
    """24 real LFW faces (8 people x 3), insightface layout, with train.lst and property."""
    folder = tmp_path_factory.mktemp("src")
    rec, idx, labels, _ = write_lfw_rec(str(folder), lfw_faces(lfw_root, 8, 3))
    with open(folder / "train.lst", "w") as f:
        f.writelines(
            f"{k + 1}\t{lab}.000000\tperson{lab}/img{k}.jpg\n" for k, lab in enumerate(labels)
        )
    return folder


def test_shuffle_copies_every_record_in_seeded_order(src, tmp_path, monkeypatch):
    monkeypatch.setattr(rec_copy, "WINDOW", 5)  # several read-ahead windows, a partial last
    out = tmp_path / "out"
    assert shuffle_rec.main([str(src), str(out), "--seed", "5", "--no-progress"]) == 0
    perm = np.random.default_rng(5).permutation(24)
    old = RecordIOReader(src / "train.rec", src / "train.idx")
    new = RecordIOReader(out / "train.rec", out / "train.idx")
    assert list(new.keys) == list(range(33))  # header, 24 images, 8 identity records
    for k in range(24):
        assert new.read(1 + k) == old.read(1 + int(perm[k]))  # byte-identical records
    head, _ = unpack(new.read(0))
    assert head.flag == 2 and head.label.tolist() == [25, 33]
    for key in range(25, 33):  # identity records stay, with an empty image range
        assert unpack(new.read(key))[0].label.tolist() == [25, 25]
    index = build_image_index(str(out / "train.rec"))
    assert index.keys == range(1, 25) and index.identity_keys == (25, 33)
    a, b = RecordDataset(str(src / "train.rec")), RecordDataset(str(out / "train.rec"))
    for k in (0, 7, 23):
        img, label = b[k]
        ref_img, ref_label = a[int(perm[k])]
        assert label == ref_label and np.array_equal(img, ref_img)
    lines = (out / "train.lst").read_text().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(k) for k in range(1, 25)]
    assert lines[0].split("\t")[2] == f"person{b[0][1]}/img{perm[0]}.jpg"
    assert (out / "property").read_text() == (src / "property").read_text()
    report = inspect_rec.inspect(str(out / "train.rec"), str(out / "train.idx"), 8)
    assert report["bad"] == [] and report["images"] == 24
    assert [b[k][1] for k in range(24)] != sorted(b[k][1] for k in range(24))


def test_shuffle_is_reproducible_and_seeded(src, tmp_path):
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        rec_copy.shuffle_rec(str(src / "train.rec"), str(tmp_path / name), seed, 2, False)
        runs[name] = (tmp_path / name / "train.rec").read_bytes()
    assert runs["a"] == runs["b"] and runs["a"] != runs["c"]


def test_shuffle_without_header(lfw_root, tmp_path):
    faces = lfw_faces(lfw_root, 2, 3)
    write_lfw_rec(str(tmp_path / "s"), faces, with_header=False, property_file=False)
    summary = rec_copy.shuffle_rec(str(tmp_path / "s"), str(tmp_path / "o"), 3, 1, False)
    assert summary.num_images == 6 and summary.identity_records == 0 and summary.copied == []
    old = RecordIOReader(tmp_path / "s" / "train.rec", tmp_path / "s" / "train.idx")
    new = RecordIOReader(tmp_path / "o" / "train.rec", tmp_path / "o" / "train.idx")
    perm = np.random.default_rng(3).permutation(6)
    assert list(new.keys) == list(range(6))
    assert [new.read(k) for k in range(6)] == [old.read(int(p)) for p in perm]


def test_shuffle_bad_inputs(src, tmp_path, capsys):
    assert shuffle_rec.main([str(tmp_path / "nope.rec"), str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"shuffle_rec: error: {tmp_path / 'nope.rec'}: file not found"
    assert shuffle_rec.main([str(src), str(src)]) == 1
    assert "must differ from the source" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")


def test_folder2rec_shuffle(lfw_root, tmp_path, capsys):
    src = tmp_path / "photos"
    for name, img in lfw_faces(lfw_root, 4, 3):
        (src / name).mkdir(parents=True, exist_ok=True)
        n = len(os.listdir(src / name))
        np.save(src / name / "x.npy", img)  # not an image: listed as skipped, never lost
        cv2.imwrite(str(src / name / f"{n}.jpg"), img[:, :, ::-1])
    out = tmp_path / "rec"
    argv = [str(src), str(out), "--insightface-header", "--shuffle", "--seed", "4", "--no-progress"]
    assert folder2rec.main(argv) == 0
    printed = capsys.readouterr().out
    assert "images: 12" in printed and "skipped files: 4" in printed
    assert sorted(os.listdir(out)) == ["property", "train.idx", "train.lst", "train.rec"]
    ds = RecordDataset(str(out / "train.rec"))
    labels = [ds[k][1] for k in range(12)]
    assert sorted(labels) == [c for c in range(4) for _ in range(3)] and labels != sorted(labels)
    assert inspect_rec.inspect(str(out / "train.rec"), str(out / "train.idx"), 4)["bad"] == []
    for line in (out / "train.lst").read_text().splitlines():  # lst follows the new order
        key, label, path = line.split("\t")
        assert ds[int(key) - 1][1] == int(float(label)) and path.endswith(".jpg")


def test_output_that_links_to_the_source_is_refused_and_the_source_kept(src, tmp_path, capsys):
    """`shuffle_rec SRC LINK` with LINK -> SRC passed the abspath check and rewrote the source."""
    link = tmp_path / "link"
    link.symlink_to(src)
    before = {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()}
    assert shuffle_rec.main([str(src), str(link), "--no-progress"]) != 0
    assert "must differ from the source folder" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()} == before
