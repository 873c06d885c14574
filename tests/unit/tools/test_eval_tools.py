"""tools/eval_verification.py (ONNX, untrained baseline), tools/plot_curves.py,
tools/compare_runs.py and tools/make_bin.py's list, CFP-FP and AgeDB-30 protocols."""

from __future__ import annotations

import json

import numpy as np
import pytest
import simplejpeg
from PIL import Image
from scipy.io import loadmat, savemat
from sklearn.model_selection import KFold
from torch.utils.tensorboard import SummaryWriter

from data.verification_bin import load_bin, read_bin_raw
from evaluation.embedders import embed_views
from evaluation.runs import read_scalars
from evaluation.verification import evaluate_views
from tests.helpers.ijb_release import lfw_people
from tests.helpers.synthetic_faces import lfw_crop
from tests.helpers.tiny_eval import export_onnx, tiny_net, write_tiny_bin
from tools import compare_runs, eval_verification, plot_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    w, h = Image.open(path).size
    assert w > 100 and h > 100


@pytest.fixture(scope="module")
def two_bins(tmp_path_factory):
    d = tmp_path_factory.mktemp("bins")
    paths = [str(d / "alpha.bin"), str(d / "beta.bin")]
    write_tiny_bin(paths[0], 12, seed=10)
    write_tiny_bin(paths[1], 11, seed=11)
    return paths


@pytest.mark.parametrize("fixed_batch", [None, 4])
def test_eval_onnx_matches_pytorch(tmp_path, two_bins, fixed_batch, capsys):
    net = tiny_net(3)
    onnx_path = str(tmp_path / "backbone.onnx")
    export_onnx(net, onnx_path, batch=fixed_batch)
    out = tmp_path / "out"
    summary = eval_verification.main(
        [
            "--model",
            onnx_path,
            "--bin",
            two_bins[0],
            "--bin",
            two_bins[1],
            "--out",
            str(out),
            "--nfolds",
            "3",
            "--batch-size",
            "5",
        ]
    )
    printed = capsys.readouterr().out
    assert "[alpha]Accuracy-Flip: " in printed and "[beta]TAR@FAR=1e-3: " in printed
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["targets"]) == {"alpha", "beta"}
    assert_png(out / "roc.png")
    for path, name in zip(two_bins, ["alpha", "beta"]):
        images, issame = load_bin(path)
        ref = evaluate_views(*embed_views(net, images, 8), issame, nrof_folds=3)
        got = saved["targets"][name]
        assert got == summary[name]
        assert got["accuracy_mean"] == pytest.approx(ref["accuracy_mean"])
        assert got["xnorm"] == pytest.approx(ref["xnorm"], rel=1e-4)
        assert got["auc"] == pytest.approx(ref["auc"], abs=1e-3)
        assert got["num_pairs"] == len(issame)


def test_eval_untrained_network(tmp_path, two_bins):
    out = tmp_path / "untrained"
    args = [
        "--untrained",
        "--network",
        "mbf",
        "--bin",
        two_bins[0],
        "--out",
        str(out),
        "--batch-size",
        "24",
        "--embedding-size",
        "64",
        "--nfolds",
        "3",
        "--seed",
        "5",
    ]
    got = eval_verification.main(args)["alpha"]
    # Same seed, same registry network: the tool scored exactly this random init.
    net = eval_verification.build_untrained("mbf", 64, seed=5).eval()
    images, issame = load_bin(two_bins[0])
    ref = evaluate_views(*embed_views(net, images, 24), issame, nrof_folds=3)
    assert got["accuracy_mean"] == pytest.approx(ref["accuracy_mean"])
    assert got["xnorm"] == pytest.approx(ref["xnorm"], rel=1e-5) and got["xnorm"] > 0
    assert_png(out / "roc.png")
    assert json.loads((out / "results.json").read_text())["model"].startswith("untrained mbf")


def test_eval_cli_errors(tmp_path, two_bins):
    with pytest.raises(SystemExit):
        eval_verification.main(["--bin", two_bins[0]])  # neither --model nor --untrained
    with pytest.raises(SystemExit):
        eval_verification.main(["--untrained", "--bin", two_bins[0]])  # no --network
    with pytest.raises(SystemExit):
        eval_verification.main(["--model", "m.onnx", "--bin", two_bins[0], "--bin", two_bins[0]])
    # one stderr line (tests/unit/tools/test_hostile_inputs.py)
    with pytest.raises(SystemExit, match="2"):
        eval_verification.main(["--model", str(tmp_path / "missing.onnx"), "--bin", two_bins[0]])


def write_events(log_dir, steps, offset=0.0):
    with SummaryWriter(log_dir) as w:
        for s in steps:
            w.add_scalar("train/loss", 10.0 - 0.1 * s + offset, s)
            w.add_scalar("train/lr", 0.1 * 0.9**s, s)
            w.add_scalar("train/samples_per_sec", 100.0 + s, s)
            if s % 5 == 0:
                w.add_scalar("val/lfw/accuracy", 0.5 + 0.01 * s, s)


def test_plot_curves(tmp_path):
    run = tmp_path / "run"
    write_events(str(run / "tensorboard"), range(0, 20))
    write_events(str(run / "tensorboard_resumed"), range(15, 30), offset=1.0)  # a resume
    series = read_scalars(str(run))
    steps, values = series["train/loss"]
    assert steps == list(range(30))  # merged, sorted, repeated steps once
    assert values[16] == pytest.approx(10.0 - 1.6 + 1.0)  # the resumed run wins
    assert series["val/lfw/accuracy"][0] == [0, 5, 10, 15, 20, 25]

    tags = plot_curves.main([str(run)])
    assert tags[:3] == ["train/loss", "train/lr", "train/samples_per_sec"]
    assert "val/lfw/accuracy" in tags
    assert_png(run / "curves.png")
    out = tmp_path / "sub" / "two.png"
    assert plot_curves.main(
        [str(run), "--out", str(out), "--tags", "val/lfw/accuracy,train/lr"]
    ) == ["val/lfw/accuracy", "train/lr"]
    assert_png(out)
    with pytest.raises(KeyError, match="train/nope"):
        plot_curves.main([str(run), "--tags", "train/nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="tfevents"):
        plot_curves.main([str(tmp_path / "empty")])


def test_compare_runs_table(tmp_path, capsys):
    accs = {"base": [0.80, 0.82, 0.84], "alt": [0.85, 0.86], "one": [0.9]}
    for arm, values in accs.items():
        for seed, acc in enumerate(values, 1):
            with SummaryWriter(str(tmp_path / f"{arm}_{seed}" / "tensorboard")) as w:
                w.add_scalar("val/lfw/accuracy", 0.5, 10)
                w.add_scalar("val/lfw/accuracy", acc, 20)  # the final one counts
    runs = sorted(str(p) for p in tmp_path.iterdir())
    assert compare_runs.main([*runs, "--target", "lfw", "--baseline", "base"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0] == "| arm | seed 1 | seed 2 | seed 3 | mean +- std | vs base |"
    assert rows[2] == "| alt | 85.00 | 86.00 | - | 85.50 +- 0.71 (n=2) | +3.50 |"
    assert rows[3] == "| base | 80.00 | 82.00 | 84.00 | 82.00 +- 2.00 (n=3) | +0.00 |"
    assert rows[4] == "| one | 90.00 | - | - | 90.00 +- - (n=1) | +8.00 |"
    assert compare_runs.main([*runs, "--target", "cfp_fp"]) == 1
    assert "has no scalar 'val/cfp_fp/accuracy'" in capsys.readouterr().err
    (tmp_path / "noseed").mkdir()
    assert compare_runs.main([str(tmp_path / "noseed")]) == 1
    assert "not named <arm>_<seed>" in capsys.readouterr().err


def _flat_images(folder, names):
    """One flat-colour 64x64 JPEG per name (gray level = 20 * index), under ``folder``."""
    from PIL import Image as PILImage

    for k, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        PILImage.new("RGB", (64, 64), (20 * k,) * 3).save(path, quality=95)


def test_make_bin_generic_list_and_cfp_fp(tmp_path, capsys):
    from tools import make_bin

    names = ["a/1.jpg", "a/2.jpg", "b/1.jpg", "c/1.jpg"]
    _flat_images(tmp_path / "img", names)
    (tmp_path / "pairs.txt").write_text("# any pairs\na/1.jpg a/2.jpg 1\n\na/1.jpg b/1.jpg 0\n")
    out = tmp_path / "list.bin"
    argv = ["--format", "list", str(tmp_path / "pairs.txt"), str(tmp_path / "img"), str(out)]
    assert make_bin.main([*argv, "--size", "16", "--no-progress", "--workers", "1"]) == 0
    images, issame = load_bin(out)
    assert images.shape == (4, 16, 16, 3) and issame.tolist() == [True, False]
    assert [round(float(im.mean()) / 20) for im in images] == [0, 1, 0, 2]
    (tmp_path / "pairs.txt").write_text("a/1.jpg a/2.jpg 1\na/1.jpg b/1.jpg 2\n")
    assert make_bin.main([*argv, "--no-progress"]) == 1
    assert "pairs.txt:2: expected 'path1 path2 label(0|1)'" in capsys.readouterr().err
    # CFP-FP protocol folder: 10 splits of (same, diff) index pairs into the F and P lists.
    proto = tmp_path / "Protocol"
    proto.mkdir()
    (proto / "Pair_list_F.txt").write_text("1 ../img/a/1.jpg\n2 ../img/b/1.jpg\n")
    (proto / "Pair_list_P.txt").write_text("1 ../img/a/2.jpg\n2 ../img/c/1.jpg\n")
    for split in range(1, 11):
        folder = proto / "Split" / "FP" / f"{split:02d}"
        folder.mkdir(parents=True)
        (folder / "same.txt").write_text("1,1\n")
        (folder / "diff.txt").write_text("2,2\n")
    out = tmp_path / "cfp_fp.bin"
    argv = ["--format", "cfp-fp", str(proto), str(proto), str(out), "--size", "16"]
    assert make_bin.main([*argv, "--no-progress", "--workers", "1"]) == 0
    images, issame = load_bin(out)
    assert issame.tolist() == [True, False] * 10
    assert [round(float(im.mean()) / 20) for im in images[:4]] == [0, 1, 2, 3]
    (proto / "Split" / "FP" / "07" / "diff.txt").write_text("2,9\n")
    assert make_bin.main([*argv, "--no-progress"]) == 1
    assert "07/diff.txt:1: expected 'frontal,profile'" in capsys.readouterr().err


# AgeDB-30 protocol .mat as the release nests it (insightface src/data/agedb2pack2.py indexes it
# so): splits = 10x1 cell of 1x1 structs (2xN cell of 1x1 structs (name, age), 1xN labels +-1).
# The release's field names are not documented; make_bin reads the fields by position.
AGEDB_IMAGE = np.dtype([("name", object), ("age", object)])
AGEDB_SPLIT = np.dtype([("pairs", object), ("labels", object)])


def write_agedb_mat(path, splits, struct_array=False, **extra):
    """``splits``: per split, a list of (name1, age1, name2, age2, label 1 | -1); with
    ``struct_array`` the splits are one 10x1 struct array instead of a cell of 1x1 structs;
    ``extra`` variables are written beside them, compressed."""
    cells = np.empty((len(splits), 1), dtype=AGEDB_SPLIT if struct_array else object)
    for k, pairs in enumerate(splits):
        grid = np.empty((2, len(pairs)), dtype=object)
        for j, (name1, age1, name2, age2, _) in enumerate(pairs):
            grid[0, j] = np.array([[(name1, float(age1))]], dtype=AGEDB_IMAGE)
            grid[1, j] = np.array([[(name2, float(age2))]], dtype=AGEDB_IMAGE)
        labels = np.array([[p[4] for p in pairs]], dtype=float)
        record = (grid, labels)
        cells[k, 0] = record if struct_array else np.array([[record]], dtype=AGEDB_SPLIT)
    savemat(path, {"splits": cells, **extra}, do_compression=bool(extra))


def agedb_splits(names):
    """10 splits of 2 same + 2 different pairs (30-year gaps), the order flipped in odd splits;
    ``names[(person, 1 | 2)]`` is a person's image at 25 / 55 years."""
    splits = []
    for k in range(10):
        a, b = k % 3, (k + 1) % 3
        pairs = [
            (names[a, 1], 25, names[a, 2], 55, 1),
            (names[a, 2], 55, names[b, 1], 25, -1),
            (names[b, 1], 25, names[b, 2], 55, 1),
            (names[b, 2], 55, names[a, 1], 25, -1),
        ]
        splits.append(pairs[::-1] if k % 2 else pairs)
    return splits


def test_make_bin_agedb_30(lfw_root, tmp_path, capsys):
    from tools import make_bin

    # A release folder: 03_Protocol_Images/<no>_<Name>_<age>_<gender>.jpg, here real LFW face
    # crops (112x112 JPEGs: the .bin holds their bytes as they are) + the protocol .mat.
    release = tmp_path / "AgeDB"
    images = release / "03_Protocol_Images"
    images.mkdir(parents=True)
    names = {}
    for p, person in enumerate(lfw_people(lfw_root, 3, min_images=2)):
        for i, age in ((1, 25), (2, 55)):
            names[p, i] = f"{2 * p + i - 1}_{person.replace('_', '')}_{age}_m"
            rgb = np.ascontiguousarray(lfw_crop(lfw_root, person, i))
            (images / f"{names[p, i]}.jpg").write_bytes(simplejpeg.encode_jpeg(rgb, quality=90))
    splits = agedb_splits(names)
    mat = release / make_bin.AGEDB_30_MAT
    write_agedb_mat(mat, splits)
    # the fixture nests as the public readers of the real file index it (docs/eval.md)
    record = loadmat(mat)["splits"][3][0][0][0]
    assert record[0][1][2][0][0][0][0] == splits[3][2][2]  # split 4, pair 3: 2nd image
    assert record[1][0][2] == splits[3][2][4]  # split 4, pair 3: label

    out = tmp_path / "agedb_30.bin"
    argv = ["--format", "agedb-30", str(release), str(images), str(out), "--no-progress"]
    assert make_bin.main([*argv, "--workers", "1"]) == 0
    assert "40 pairs (20 same, 20 different) from AgeDB-30, 10 splits of 4 pairs" in (
        capsys.readouterr().out
    )
    jpegs, issame = read_bin_raw(out)
    order = [name for split in splits for pair in split for name in (pair[0], pair[2])]
    assert jpegs == [(images / f"{name}.jpg").read_bytes() for name in order]
    assert issame.tolist() == [pair[4] == 1 for split in splits for pair in split]
    # the evaluation's 10 contiguous folds (evaluation.verification.kfold_accuracy) are the splits
    folds = [test for _, test in KFold(n_splits=10, shuffle=False).split(issame)]
    for k, test in enumerate(folds):
        assert test.tolist() == list(range(4 * k, 4 * k + 4))
        assert issame[test].tolist() == [pair[4] == 1 for pair in splits[k]]
    # SOURCE may name the .mat itself
    out.unlink()
    assert make_bin.main(["--format", "agedb-30", str(mat), str(images), str(out)]) == 0
    assert read_bin_raw(out)[0] == jpegs


def _agedb_case(splits, case):
    """Break a good protocol in one place; returns the expected error text after the file."""
    if case == "label":
        name1, age1, name2, age2, _ = splits[6][1]
        splits[6][1] = (name1, age1, name2, age2, 0)
        return ": split 7 pair 2: label must be 1 (same) or -1 (different), got 0"
    if case == "name":
        splits[1][0] = ("../escape", 25, *splits[1][0][2:])
        return ": split 2 pair 1: name '../escape' is not a folder name inside the image root"
    if case == "splits":
        del splits[9]
        return ": expected 10 splits, found 9"
    del splits[2][3]  # case == "unequal"
    return ": splits hold [4, 4, 3, 4, 4, 4, 4, 4, 4, 4] pairs"


@pytest.mark.parametrize("case", ["missing", "not-mat", "label", "name", "splits", "unequal"])
def test_make_bin_agedb_30_errors(tmp_path, capsys, case):
    from tools import make_bin

    release = tmp_path / "AgeDB"
    release.mkdir()
    mat = release / make_bin.AGEDB_30_MAT
    splits = agedb_splits(
        {(p, i): f"{2 * p + i}_P{p}_{25 + 30 * (i - 1)}_f" for p in range(3) for i in (1, 2)}
    )
    if case == "missing":
        want = ": AgeDB-30 protocol file not found"
    elif case == "not-mat":
        mat.write_text("1 0_A_25_f 1_A_55_f\n")
        want = ": not a MATLAB v5 .mat file"
    else:
        want = _agedb_case(splits, case)
        write_agedb_mat(mat, splits)
    argv = ["--format", "agedb-30", str(release), str(release), str(tmp_path / "x.bin")]
    assert make_bin.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"make_bin: error: {mat}{want}") and err.count("\n") == 1
    assert not (tmp_path / "x.bin").exists()


def test_make_bin_agedb_30_struct_array_and_inflation_bomb(tmp_path):
    """Issue 32 items 9 and 15: splits saved as a struct array gave numpy's "setting an array
    element with a sequence" without the file; a 0.5 MB .mat that inflates past 1 GB peaked at
    1.55 GB. A struct array reads as the release's cell array does; the inflated size is counted
    from the compressed stream (1 MiB at a time) and bounded before scipy loads anything."""
    from tools import make_bin

    splits = agedb_splits(
        {(p, i): f"{2 * p + i}_P{p}_{25 + 30 * (i - 1)}_f" for p in range(3) for i in (1, 2)}
    )
    cell, struct = tmp_path / "cell.mat", tmp_path / "struct.mat"
    write_agedb_mat(cell, splits)
    write_agedb_mat(struct, splits, struct_array=True)
    root = str(tmp_path)
    assert make_bin.read_agedb_30(str(struct), root) == make_bin.read_agedb_30(str(cell), root)
    bomb = tmp_path / "bomb.mat"
    write_agedb_mat(bomb, splits, junk=np.zeros(make_bin.AGEDB_MAX_BYTES // 8 + 1024))
    assert bomb.stat().st_size < 2**20
    with pytest.raises(ValueError, match=r"bomb\.mat: its variables inflate to more than"):
        make_bin.read_agedb_30(str(bomb), root)
