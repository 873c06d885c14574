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
