"""tools/folder2rec.py, make_bin.py, prepare_lfw.py, inspect_rec.py on tiny folders and real LFW."""

import os

import cv2
import numpy as np
import pytest

from data import face_jpeg, lfw, pack_rec
from data.decode import decode_image
from data.recordio import RecordIOReader, read_property, record_label, unpack
from data.verification_bin import load_bin
from tools import folder2rec, inspect_rec, make_bin, prepare_lfw

# identity -> (RGB colour, image count, format); "solo" has one image, for --min-images
PEOPLE = {"alice": ((200, 30, 30), 3, ".png"), "bob": ((30, 200, 30), 2, ".jpg")}
PEOPLE["solo"] = ((30, 30, 200), 1, ".jpg")


def write_image(path, rgb, size=(40, 30), box=None):
    """A flat image of colour ``rgb`` (w x h); ``box`` (L, T, R, B) painted white."""
    img = np.empty((size[1], size[0], 3), np.uint8)
    img[:] = rgb
    if box is not None:
        img[box[1] : box[3], box[0] : box[2]] = 255
    ok, buf = cv2.imencode(os.path.splitext(path)[1], np.ascontiguousarray(img[:, :, ::-1]))
    assert ok
    with open(path, "wb") as f:
        f.write(buf.tobytes())


@pytest.fixture
def folder(tmp_path):
    src = tmp_path / "src"
    for name, (rgb, count, ext) in PEOPLE.items():
        (src / name).mkdir(parents=True)
        for i in range(count):
            write_image(str(src / name / f"{name}_{i + 1:04d}{ext}"), rgb)
    (src / "bob" / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    (src / "bob" / "notes.txt").write_text("not an image")
    return src


def read_rec(out):
    reader = RecordIOReader(out / "train.rec", out / "train.idx")
    return reader, {k: unpack(reader.read(k)) for k in reader.keys}


def test_folder2rec_insightface_layout(folder, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [str(folder), str(out), "--size", "16", "--workers", "1", "--insightface-header"]
    assert folder2rec.main([*argv, "--no-progress"]) == 0
    summary = capsys.readouterr().out
    assert "broken.jpg" in summary and "notes.txt: not an image file" in summary
    assert "skipped files: 2" in summary
    assert read_property(out) == (3, 16, 16)
    reader, recs = read_rec(out)
    header = recs[0][0]
    num_images = 3 + 2 + 1
    assert header.flag == 2 and header.label.tolist() == [num_images + 1, num_images + 4]
    colours = list(PEOPLE.values())
    for key in range(1, num_images + 1):
        h, payload = recs[key]
        img = decode_image(payload)
        assert img.shape == (16, 16, 3)
        np.testing.assert_allclose(img.mean((0, 1)), colours[record_label(h)][0], atol=6)
    for c in range(3):
        h, payload = recs[num_images + 1 + c]
        start, end = (int(v) for v in h.label)
        assert end - start == colours[c][1] and payload == b""
        assert {record_label(recs[k][0]) for k in range(start, end)} == {c}
    lst = (out / "train.lst").read_text().splitlines()
    assert lst[0] == "1\t0.000000\talice/alice_0001.png" and len(lst) == num_images
    assert sorted(os.listdir(out)) == ["property", "train.idx", "train.lst", "train.rec"]
    assert inspect_rec.main([str(out / "train.rec")]) == 0


def test_folder2rec_min_images_crop_and_workers(folder, tmp_path):
    out1, out2 = tmp_path / "w1", tmp_path / "w2"
    samples, names, skipped = pack_rec.scan_folder(str(folder), min_images=2)
    assert names == ["alice", "bob"] and len(samples) == 3 + 3  # bob's broken.jpg is listed
    assert any("solo_0001.jpg" in p and "--min-images" in r for p, r in skipped)
    kwargs = {"crop": (5, 5, 25, 25), "size": 8, "num_classes": 2, "progress": False}
    s1 = pack_rec.convert(samples, out1, workers=1, **kwargs)
    pack_rec.convert(samples, out2, workers=2, **kwargs)
    assert (s1.num_images, s1.num_classes, len(s1.skipped)) == (5, 2, 1)
    assert (out1 / "train.rec").read_bytes() == (out2 / "train.rec").read_bytes()
    assert (out1 / "train.idx").read_text().splitlines()[0] == "0\t0"  # no header: keys from 0
    _, recs = read_rec(out1)
    assert decode_image(recs[0][1]).shape == (8, 8, 3)


def test_crop_box_selects_the_region(tmp_path):
    path = str(tmp_path / "x.png")
    write_image(path, (0, 0, 0), size=(50, 40), box=(10, 5, 30, 25))
    jpeg, copied = face_jpeg.encode_face(path, crop=(10, 5, 30, 25), size=16)
    assert not copied and decode_image(jpeg).min() > 240  # only the white box survives
    with pytest.raises(ValueError, match=r"crop box \(0, 0, 60, 10\) is outside the 50x40 image"):
        face_jpeg.encode_face(path, crop=(0, 0, 60, 10), size=16)
    small = str(tmp_path / "s.jpg")
    write_image(small, (9, 99, 199), size=(16, 16))
    jpeg, copied = face_jpeg.encode_face(small, size=16)
    with open(small, "rb") as f:
        assert copied and jpeg == f.read()  # right size already: no second lossy encode


def test_folder2rec_abort_leaves_no_partial_rec(folder, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.rec").write_bytes(b"old")
    calls = []

    def failing_pack(header, payload):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_pack(header, payload)

    real_pack = pack_rec.pack
    monkeypatch.setattr(pack_rec, "pack", failing_pack)
    samples, _, _ = pack_rec.scan_folder(str(folder))
    with pytest.raises(KeyboardInterrupt):
        pack_rec.convert(samples, out, size=16, progress=False)
    assert os.listdir(out) == ["train.rec"] and (out / "train.rec").read_bytes() == b"old"


def test_folder2rec_errors(tmp_path, capsys):
    assert folder2rec.main([str(tmp_path / "missing"), str(tmp_path / "o"), "--no-progress"]) == 1
    assert "missing: source folder not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        folder2rec.main([str(tmp_path), str(tmp_path / "o"), "--crop", "5", "5", "1", "9"])


def test_inspect_rec_reports_bad_keys(folder, tmp_path, capsys):
    out = tmp_path / "out"
    samples, _, _ = pack_rec.scan_folder(str(folder))
    pack_rec.convert(samples, out, size=16, progress=False, insightface_header=True)
    reader = RecordIOReader(out / "train.rec", out / "train.idx")
    offset = reader.offset_of(2)
    data = bytearray((out / "train.rec").read_bytes())
    data[offset + 8 + 24 : offset + 8 + 40] = b"\x00" * 16  # destroy the JPEG's first bytes
    (out / "train.rec").write_bytes(bytes(data))
    assert inspect_rec.main([str(out / "train.rec")]) == 1
    err = capsys.readouterr().err
    assert "bad keys: [2]" in err
    assert inspect_rec.main([str(out / "train.rec"), "--num-classes", "1"]) == 1
    assert "label 1 outside [0, 1)" in capsys.readouterr().err
    os.remove(out / "train.idx")  # sequential scan: bad record named by offset
    assert inspect_rec.main([str(out / "train.rec")]) == 1
    assert f"offset {offset}" in capsys.readouterr().err


def write_mini_lfw(root):
    """A fake LFW of flat 250x250 images: 2 folds x (1 matched + 1 mismatched pair)."""
    counts = {"Ann": 2, "Ben": 1, "Cid": 3, "Dee": 2, "Eve": 1, "Fay": 2, "Gus": 2}
    rng = np.random.default_rng(0)
    for name, n in counts.items():
        (root / "lfw-deepfunneled" / name).mkdir(parents=True)
        for i in range(1, n + 1):
            rgb = tuple(int(v) for v in rng.integers(0, 256, 3))
            path = str(root / "lfw-deepfunneled" / name / f"{name}_{i:04d}.jpg")
            write_image(path, rgb, size=(250, 250))
    (root / "pairs.txt").write_text("2\t1\nAnn\t1\t2\nAnn\t1\tBen\t1\nCid\t1\t3\nCid\t2\tEve\t1\n")
    return counts


def test_make_bin_pairs_and_folds(tmp_path):
    write_mini_lfw(tmp_path)
    out = tmp_path / "f2.bin"
    argv = [str(tmp_path / "pairs.txt"), str(tmp_path / "lfw-deepfunneled"), str(out)]
    assert make_bin.main([*argv, "--size", "16", "--folds", "2", "--no-progress"]) == 0
    images, issame = load_bin(out)
    assert images.shape == (4, 16, 16, 3) and issame.tolist() == [True, False]
    src = tmp_path / "lfw-deepfunneled"
    for k, (name, i) in enumerate([("Cid", 1), ("Cid", 3), ("Cid", 2), ("Eve", 1)]):
        want = decode_image((src / name / f"{name}_{i:04d}.jpg").read_bytes()).mean((0, 1))
        np.testing.assert_allclose(images[k].mean((0, 1)), want, atol=6)
    assert make_bin.main([*argv, "--folds", "3", "--no-progress"]) == 1
    (tmp_path / "pairs.txt").write_text(
        "2\t1\nAnn\t1\t2\nAnn\t1\tBen\t1\nCid\t1\t9\nCid\t2\tEve\t1\n"
    )
    assert make_bin.main([*argv, "--no-progress"]) == 1  # Cid_0009.jpg does not exist
    (tmp_path / "pairs.txt").write_text("1\t1\nAnn\t1\t2\nAnn\t1\tBen\n")
    with pytest.raises(ValueError, match=r"pairs.txt:3: expected a mismatched"):
        lfw.parse_pairs(str(tmp_path / "pairs.txt"))


def test_prepare_lfw_split_and_idempotence(tmp_path, capsys):
    write_mini_lfw(tmp_path)
    out = tmp_path / "demo"
    argv = ["--lfw", str(tmp_path), "--out", str(out), "--eval-folds", "1", "--no-progress"]
    assert prepare_lfw.main([*argv, "--workers", "1"]) == 0
    # fold 1 holds Ann and Ben; training = people with >= 2 images not in fold 1
    assert read_property(out)[0] == 4  # Cid, Dee, Fay, Gus
    reader, recs = read_rec(out)
    assert recs[0][0].label.tolist() == [10, 14]  # 9 images at keys 1..9, 4 identity records
    images, issame = load_bin(out / "lfw_heldout.bin")
    assert images.shape == (4, 112, 112, 3) and issame.tolist() == [True, False]
    assert "4 identities, 9 images" in capsys.readouterr().out
    mtime = os.stat(out / "train.rec").st_mtime_ns
    assert prepare_lfw.main(argv) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert os.stat(out / "train.rec").st_mtime_ns == mtime
    assert prepare_lfw.main([*argv, "--force", "--workers", "1"]) == 0
    assert os.stat(out / "train.rec").st_mtime_ns != mtime
    assert prepare_lfw.main(["--lfw", str(tmp_path / "none"), "--out", str(out)]) == 1
    assert "LFW not found" in capsys.readouterr().err


def test_real_lfw_split(lfw_root):
    samples, names, pairs = lfw.split_lfw(lfw_root, [1])
    held_out = {p[0] for p in pairs} | {p[2] for p in pairs}
    assert len(pairs) == 600 and sum(p[4] for p in pairs) == 300
    assert not held_out & set(names)
    image_root = os.path.join(lfw_root, "lfw-deepfunneled")
    held_out_2plus = [n for n in held_out if len(os.listdir(os.path.join(image_root, n))) >= 2]
    assert len(names) + len(held_out_2plus) == 1680  # people with >= 2 images (data README)
    per_label = np.bincount([label for _, label in samples])
    assert per_label.min() >= 2 and len(per_label) == len(names)


def test_real_lfw_small_bin(lfw_root, tmp_path):
    folds = lfw.parse_pairs(os.path.join(lfw_root, "pairs.txt"))
    assert len(folds) == 10 and all(len(f) == 600 for f in folds)
    pairs = folds[0][295:305]  # 5 matched + 5 mismatched
    image_root = os.path.join(lfw_root, "lfw-deepfunneled")
    n = lfw.build_bin(pairs, image_root, tmp_path / "x.bin", crop=lfw.LFW_CROP)
    images, issame = load_bin(tmp_path / "x.bin")
    assert n == 10 and images.shape == (20, 112, 112, 3)
    assert issame.tolist() == [True] * 5 + [False] * 5


def test_finetune_split_refuses_overlapping_folds(tmp_path):
    """The fine-tuning split must stay identity-disjoint from the held-out folds."""
    from tools.prepare_lfw import build_finetune_split

    with pytest.raises(ValueError, match="overlap"):
        build_finetune_split("unused", str(tmp_path), [1, 2, 3], [3, 4], {})
