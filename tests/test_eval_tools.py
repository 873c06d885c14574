"""tools/eval_verification.py (ONNX, untrained baseline) and tools/plot_curves.py."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from data.verification_bin import load_bin
from tests.test_verification import tiny_net, write_tiny_bin
from tools import eval_verification, plot_curves
from trainer.embedders import embed_views
from trainer.verification import evaluate_views

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    w, h = Image.open(path).size
    assert w > 100 and h > 100


def export_onnx(net, path, batch=None):
    """Export with input name ``data``; dynamic batch unless ``batch`` is given."""
    x = torch.randn(batch or 2, 3, 112, 112)
    dyn = None if batch else {"data": {0: "n"}, "fc1": {0: "n"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated but 30x faster
        torch.onnx.export(
            net,
            (x,),
            path,
            input_names=["data"],
            output_names=["fc1"],
            dynamic_axes=dyn,
            dynamo=False,
        )


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
    with pytest.raises(SystemExit, match="2"):  # one stderr line (tests/test_hostile_inputs.py)
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
    series = plot_curves.read_scalars(str(run))
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
