"""tools/align_faces.py: real LFW faces pasted at known poses come back aligned; every bad
input is a report entry or a one-line error."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest

from data.decode import decode_image
from tests.helpers.synthetic_faces import lfw_crop, paste_face, similarity
from tools import align_faces

# (person, image number, pose: scale, angle in degrees, tx, ty) pasted into 260x300 photos
FACES = [
    ("Aaron_Peirsol", 1, (1.0, 0.0, 40.0, 60.0)),
    ("Aaron_Peirsol", 2, (1.6, 20.0, 120.0, 20.0)),
    ("Abdullah_Gul", 1, (0.8, -35.0, 60.0, 150.0)),
]


@pytest.fixture(scope="module")
def photos(lfw_root, tmp_path_factory):
    """Photos (one folder per person), a TSV of their landmarks with bad lines, the crops."""
    root = tmp_path_factory.mktemp("photos")
    lines, crops = ["path\tx1\ty1\tx2\ty2\tx3\ty3\tx4\ty4\tx5\ty5"], {}
    for name, number, pose in FACES:
        crop = lfw_crop(lfw_root, name, number)
        canvas, landmarks = paste_face(crop, similarity(*pose), (300, 260))
        rel = f"{name}/{name}_{number:04d}.png"
        os.makedirs(root / name, exist_ok=True)
        assert cv2.imwrite(str(root / rel), canvas[:, :, ::-1])
        lines.append("\t".join([rel, *(f"{v:.3f}" for v in landmarks.ravel())]))
        crops[rel] = crop
    (root / "Abdullah_Gul" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (root / "Abdullah_Gul" / "no_landmarks.png").write_bytes(b"")  # listed: no line
    first = lines[1].split("\t")
    lines += [
        "\t".join(["Abdullah_Gul/broken.jpg", *first[1:]]),  # unreadable image
        "\t".join(["Nobody/missing.jpg", *first[1:]]),  # no such file
        "\t".join([first[0], *["10"] * 10]),  # all five points on one spot
        "Aaron_Peirsol/x.jpg 1 2 3",  # too few numbers
        "# a comment",
        "",
        # the same image again, comma-separated with a detector score (IJB meta format)
        ",".join([first[0], *first[1:], "0.99"]),
    ]
    (root / "landmarks.tsv").write_text("\n".join(lines) + "\n")
    return root, crops


def test_align_faces_recovers_crops_and_reports_every_bad_input(photos, tmp_path, capsys):
    root, crops = photos
    out = tmp_path / "aligned"
    argv = [str(root / "landmarks.tsv"), str(out), "--images", str(root), "--workers", "2"]
    assert align_faces.main([*argv, "--no-progress"]) == 0
    for rel, crop in crops.items():
        with open(out / (os.path.splitext(rel)[0] + ".jpg"), "rb") as f:
            aligned = decode_image(f.read())
        inner = (slice(6, 106), slice(6, 106))
        err = np.abs(aligned[inner].astype(float) - crop[inner].astype(float)).mean()
        assert aligned.shape == (112, 112, 3) and err < 4.0, (rel, err)
    # further lines of one image: _2 (degenerate, not written), _3 (the comma-separated line)
    person = out / "Aaron_Peirsol"
    assert (person / "Aaron_Peirsol_0001_3.jpg").is_file()
    assert not (person / "Aaron_Peirsol_0001_2.jpg").exists()
    report = (out / "align_report.tsv").read_text().splitlines()
    assert report[0] == "path\treason" and len(report) == 1 + 5
    reasons = dict(line.split("\t", 1) for line in report[1:])
    assert reasons[f"{root / 'landmarks.tsv'}:8"].startswith("expected 10 coordinates, got 3")
    assert reasons[str(root / "Abdullah_Gul" / "no_landmarks.png")] == "no landmarks line"
    assert reasons[str(root / "Nobody" / "missing.jpg")] == "image file not found"
    assert "collapsed" in reasons[str(root / "Aaron_Peirsol" / "Aaron_Peirsol_0001.png")]
    assert reasons[str(root / "Abdullah_Gul" / "broken.jpg")]
    printed = capsys.readouterr().out
    assert printed.startswith(f"aligned 4 faces into {out}") and "skipped 5" in printed


def test_missing_landmarks_file_is_one_line(tmp_path, capsys):
    assert align_faces.main([str(tmp_path / "none.tsv"), str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"align_faces: error: {tmp_path / 'none.tsv'}: landmarks file not found"]
    assert not (tmp_path / "o").exists()


def test_report_elsewhere(photos, tmp_path):
    root, _ = photos
    report = tmp_path / "report.tsv"
    argv = [str(root / "landmarks.tsv"), str(tmp_path / "a"), "--report", str(report)]
    assert align_faces.main([*argv, "--workers", "1", "--no-progress"]) == 0
    assert len(report.read_text().splitlines()) == 1 + 4  # no --images: no 'no landmarks' entry
    assert not (tmp_path / "a" / "align_report.tsv").exists()


def test_colliding_output_names_get_distinct_files(photos, tmp_path, capsys):
    """`a.png` twice and `a_2.png` used to map two faces onto `a_2.jpg` ("aligned 3 faces, skipped
    0", two files written): every face gets its own file."""
    import shutil

    root, crops = photos
    rel = next(iter(crops))
    line = next(x for x in (root / "landmarks.tsv").read_text().splitlines() if x.startswith(rel))
    coords = line.split("\t")[1:]
    stem, ext = os.path.splitext(rel)
    src = tmp_path / "src"  # the module's photos stay as they are
    (src / rel).parent.mkdir(parents=True)
    shutil.copyfile(root / rel, src / rel)
    shutil.copyfile(root / rel, src / f"{stem}_2{ext}")
    lines = [line, line, "\t".join([f"{stem}_2{ext}", *coords])]
    (src / "collide.tsv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "o"
    assert align_faces.main([str(src / "collide.tsv"), str(out), "--no-progress"]) == 0
    written = sorted(p.name for p in out.rglob("*.jpg"))
    base = os.path.basename(stem)
    assert written == [f"{base}.jpg", f"{base}_2.jpg", f"{base}_2_2.jpg"]
    assert capsys.readouterr().out.startswith(f"aligned 3 faces into {out}")


def test_out_dir_that_is_the_image_root_of_jpegs_is_refused(photos, tmp_path, capsys):
    """OUT_DIR/<path>.jpg of a JPEG source is the source itself (or, through a link to the
    root, the same file): refused before anything is written (#32 item 3)."""
    import shutil

    root, crops = photos
    rel = next(iter(crops))
    line = next(x for x in (root / "landmarks.tsv").read_text().splitlines() if x.startswith(rel))
    src = tmp_path / "src"
    (src / "p").mkdir(parents=True)
    shutil.copyfile(root / rel, src / "p" / "face.jpg")
    original = (src / "p" / "face.jpg").read_bytes()
    (src / "lm.tsv").write_text("\t".join(["p/face.jpg", *line.split("\t")[1:]]) + "\n")
    (tmp_path / "link").symlink_to(src)
    for out in (src, tmp_path / "link"):
        assert align_faces.main([str(src / "lm.tsv"), str(out), "--no-progress"]) == 1
        assert "would overwrite the source image" in capsys.readouterr().err
    assert (src / "p" / "face.jpg").read_bytes() == original
    assert sorted(p.name for p in src.iterdir()) == ["lm.tsv", "p"]  # no report written
