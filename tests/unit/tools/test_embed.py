"""tools/embed.py: a folder or list of real LFW faces -> embeddings + index; --compare with the
threshold of a results.json; bad inputs are report entries or one-line errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import simplejpeg
import torch

import models
from evaluation.embedders import embed_images, load_embedder
from tests.helpers.synthetic_faces import lfw_crop
from tools import embed

pytestmark = pytest.mark.usefixtures("one_thread")

PEOPLE = [("Aaron_Peirsol", 1), ("Aaron_Peirsol", 2), ("Abdullah_Gul", 1)]


@pytest.fixture(scope="module")
def setup(lfw_root, tmp_path_factory):
    """An untrained mbf saved as an arcface_torch-style backbone.pth and three aligned faces."""
    root = tmp_path_factory.mktemp("embed")
    torch.manual_seed(0)
    net = models.create("mbf", embedding_size=64)
    torch.save(net.state_dict(), root / "backbone.pth")
    faces = root / "faces"
    for name, number in PEOPLE:
        (faces / name).mkdir(parents=True, exist_ok=True)
        jpeg = simplejpeg.encode_jpeg(lfw_crop(lfw_root, name, number), 95, colorspace="RGB")
        (faces / name / f"{number}.jpg").write_bytes(jpeg)
    return root


MODEL = ["--network", "mbf", "--embedding-size", "64", "--no-progress"]


def test_folder_embeddings_index_and_skipped(setup, tmp_path, capsys):
    faces = setup / "faces"
    (faces / "Abdullah_Gul" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    big = simplejpeg.encode_jpeg(np.zeros((120, 100, 3), np.uint8), 90, colorspace="RGB")
    (faces / "Abdullah_Gul" / "big.jpg").write_bytes(big)
    try:
        out = tmp_path / "emb"
        args = [str(setup / "backbone.pth"), str(faces), "--out", str(out), *MODEL]
        assert embed.main(args) == 0
    finally:
        (faces / "Abdullah_Gul" / "broken.jpg").unlink()
        (faces / "Abdullah_Gul" / "big.jpg").unlink()
    emb = np.load(out / "embeddings.npy")
    index = (out / "index.tsv").read_text().splitlines()
    rows = [line.split("\t")[1] for line in index[1:]]
    assert rows == [str(faces / n / f"{k}.jpg") for n, k in sorted(PEOPLE)]
    assert emb.shape == (3, 64) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    embedder = load_embedder(str(setup / "backbone.pth"), "mbf", embedding_size=64)
    images = np.stack([embed.read_face(p) for p in rows])
    ref = embed_images(embedder, images, flip=True)  # flip-summed, then normalized
    assert np.allclose(emb, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-5)
    skipped = dict(line.split("\t", 1) for line in (out / "skipped.tsv").read_text().splitlines())
    assert "not an aligned 112x112 face" in skipped[str(faces / "Abdullah_Gul" / "big.jpg")]
    assert "cannot decode" in skipped[str(faces / "Abdullah_Gul" / "broken.jpg")]
    assert "embedded 3 faces" in capsys.readouterr().out and len(skipped) == 3  # + header

    listed = tmp_path / "list.txt"  # a list file, relative paths, one missing
    listed.write_text(f"{faces}/Aaron_Peirsol/2.jpg\nnope.jpg\n")
    out2 = tmp_path / "emb2"
    args = [str(setup / "backbone.pth"), str(listed), "--list", "--out", str(out2), "--raw"]
    assert embed.main([*args, "--no-flip", *MODEL]) == 0
    raw = np.load(out2 / "embeddings.npy")
    single = embed_images(embedder, images[1:2], flip=False)
    assert np.allclose(raw, single, atol=1e-5)
    assert f"{tmp_path / 'nope.jpg'}\timage file not found" in (out2 / "skipped.tsv").read_text()


def test_compare_with_results_threshold(setup, tmp_path, capsys):
    a = setup / "faces" / "Aaron_Peirsol" / "1.jpg"
    b = setup / "faces" / "Abdullah_Gul" / "1.jpg"
    model = str(setup / "backbone.pth")
    assert embed.main([model, "--compare", str(a), str(b), *MODEL]) == 0
    first = capsys.readouterr().out
    cosine = float(first.split()[2])
    assert "no threshold" in first and -1 <= cosine < 0.9999
    results = tmp_path / "results.json"
    # squared-distance threshold t <-> cosine 1 - t/2: put the cut just above and below
    for t, verdict in ((2 - 2 * cosine + 0.02, "same"), (2 - 2 * cosine - 0.02, "different")):
        results.write_text(json.dumps({"targets": {"lfw": {"best_threshold": t}}}))
        assert (
            embed.main([model, "--compare", str(a), str(b), "--results", str(results), *MODEL]) == 0
        )
        line = capsys.readouterr().out
        assert f"-> {verdict} person (threshold {1 - t / 2:.4f}" in line, line
    assert embed.main([model, "--compare", str(a), str(a), "--threshold", "0.99", *MODEL]) == 0
    assert "cosine similarity 1.0000 -> same" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["missing.pt", "--compare", "a.jpg", "b.jpg"], "no such model file or folder: missing.pt"),
        (["{loop}", "--compare", "a.jpg", "b.jpg"], "Too many levels of symbolic links"),
        (["{model}", "--compare", "{faces}/x.jpg", "{faces}/x.jpg"], "x.jpg: image file not found"),
        (["{model}", "{faces}/none", "--out", "o"], "image folder not found"),
        (["{model}", "--compare", "a", "b", "--results", "{faces}"], "results file not found"),
    ],
)
def test_bad_inputs_are_one_line(setup, argv, message, capsys):
    loop = setup / "loop.pt"  # a link to itself: named as a link loop, not "does not exist"
    if not os.path.lexists(loop):
        os.symlink(loop, loop)
    fill = {"model": setup / "backbone.pth", "faces": setup / "faces", "loop": loop}
    assert embed.main([a.format(**fill) for a in argv] + MODEL) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("embed: error:") and message in err[0], err


def test_results_file_errors(tmp_path):
    bad = tmp_path / "r.json"
    bad.write_text(json.dumps({"targets": {"a": {"best_threshold": 1}, "b": {}}}))
    with pytest.raises(ValueError, match="choose one with --target"):
        embed.threshold_from_results(str(bad), None)
    with pytest.raises(ValueError, match="no numeric best_threshold"):
        embed.threshold_from_results(str(bad), "b")
    assert embed.threshold_from_results(str(bad), "a")[0] == 0.5
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a verification results.json"):
        embed.threshold_from_results(str(bad), None)
