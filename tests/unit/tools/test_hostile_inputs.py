"""Hostile files given to the tools (issue 19): no code runs from a downloaded .bin, every bad
input of eval_verification, make_bin, folder2rec and inspect_rec is one clear line, what the
tools write gets the umask's permissions. docs/reliability.md maps each case to its test.
"""

import json
import os
import pickle
from pathlib import Path

import pytest

from tests.helpers.hostile import Payload, flat_jpeg, jpeg, make_rec
from tests.helpers.tiny_eval import export_onnx, tiny_net, write_tiny_bin

# --- 1. code from a downloaded .bin -----------------------------------------------------------


def test_convert_to_onnx_lfw_bin_runs_no_code(tmp_path):
    from tools import convert_to_onnx as conv

    marker = tmp_path / "pwned"
    hostile = tmp_path / "lfw.bin"
    with open(hostile, "wb") as f:
        pickle.dump(([Payload(marker), jpeg()], [True]), f)
    with pytest.raises(ValueError, match=r"lfw\.bin.*refusing to load global"):
        conv.load_faces(lfw_bin=hostile, n=1)
    assert not marker.exists()
    assert "import pickle" not in Path(conv.__file__).read_text()  # one .bin reader


# --- 12. file permissions of what the tools write --------------------------------------------


def test_onnx_export_gets_umask_permissions(tmp_path, umask_027):
    import torch

    import models
    from tools import convert_to_onnx as conv

    torch.manual_seed(0)
    step = tmp_path / "step_1"  # a step folder: meta.json carries the tiny r18's kwargs
    step.mkdir()
    tiny = models.create("r18", embedding_size=16, base_width=8).eval()
    torch.save(tiny.state_dict(), step / "backbone.pt")
    meta = {"network": "r18", "embedding_size": 16, "model_kwargs": {"base_width": 8}}
    (step / "meta.json").write_text(json.dumps(meta))
    out = tmp_path / "tiny.onnx"
    rc = conv.main([str(step), "--output", str(out), "--no-faces", "--runs", "1"])
    assert rc == 0
    assert out.stat().st_mode & 0o777 == umask_027


# --- 10. tools/eval_verification.py: every bad input is one line, exit 2 ---------------------


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("onnx") / "tiny.onnx")
    export_onnx(tiny_net(), path)  # input (n, 3, 112, 112)
    return path


def _eval_fails(capsys, argv, needle):
    from tools import eval_verification

    with pytest.raises(SystemExit) as info:
        eval_verification.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("eval_verification: error:"), err
    assert needle in err[0], err


def test_eval_verification_bad_inputs_are_one_line_exit2(tmp_path, tiny_onnx, capsys):
    good, few, small = (str(tmp_path / f"{n}.bin") for n in ("good", "few", "small"))
    write_tiny_bin(good, 12)
    write_tiny_bin(few, 3)
    write_tiny_bin(small, 12, size=96)
    model = ["--model", tiny_onnx, "--out", str(tmp_path / "eval")]
    for far in ("1.5", "0", "-1e-3"):
        _eval_fails(capsys, [*model, "--bin", good, f"--far-target={far}"], "--far-target")
    _eval_fails(capsys, [*model, "--bin", few], "few.bin holds 3 pairs, fewer than the 10 folds")
    _eval_fails(capsys, [*model, "--bin", small], "takes input [")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    _eval_fails(capsys, ["--model", str(junk), "--bin", good], "onnxruntime cannot load it")
    _eval_fails(capsys, ["--model", str(tmp_path / "none.onnx"), "--bin", good], "none.onnx")


# --- 7, 11, 12. the dataset tools --------------------------------------------------------------


def _pairs_args(tmp_path, text):
    (tmp_path / "pairs.txt").write_text(text)
    root = tmp_path / "images"
    (root / "Ann").mkdir(parents=True, exist_ok=True)
    for i in (1, 2):
        (root / "Ann" / f"Ann_{i:04d}.jpg").write_bytes(flat_jpeg(112, 50 * i))
    return [str(tmp_path / "pairs.txt"), str(root), str(tmp_path / "out.bin"), "--no-progress"]


@pytest.mark.parametrize("header", ["0\t0\n", "1\t0\n", "0\t5\n"])
def test_make_bin_refuses_zero_pairs_or_folds(tmp_path, header, capsys):
    from tools import make_bin

    assert make_bin.main(_pairs_args(tmp_path, header)) == 1
    assert "needs at least one fold with one pair" in capsys.readouterr().err
    assert not (tmp_path / "out.bin").exists()


def test_make_bin_reads_no_image_outside_the_root(tmp_path, capsys):
    from tools import make_bin

    (tmp_path / "secret_0001.jpg").write_bytes(flat_jpeg(112, 7))  # outside images/
    for name in (str(tmp_path / "secret"), "../secret", ".."):
        args = _pairs_args(tmp_path, f"1\t1\nAnn\t1\t2\n{name}\t1\tAnn\t1\n")
        assert make_bin.main(args) == 1, name
        err = capsys.readouterr().err
        assert "pairs.txt:3: name" in err and "not a folder name inside the image root" in err
        assert not (tmp_path / "out.bin").exists()
    assert make_bin.main(_pairs_args(tmp_path, "1\t1\nAnn\t1\t2\nAnn\t1\tAnn\t2\n")) == 0


def test_folder2rec_refuses_tab_and_newline_names(tmp_path, capsys):
    from tools import folder2rec

    src = tmp_path / "src"
    for person, files in {"a": ["ok.jpg", "x\ny.jpg", "t\tz.jpg"], "b\tc": ["1.jpg"]}.items():
        (src / person).mkdir(parents=True)
        for name in files:
            (src / person / name).write_bytes(flat_jpeg(112))
    (src / "d").mkdir()
    (src / "d" / "2.jpg").write_bytes(flat_jpeg(112))
    out = tmp_path / "out"
    assert folder2rec.main([str(src), str(out), "--workers", "1", "--no-progress"]) == 0
    lines = (out / "train.lst").read_text().splitlines()
    assert [line.split("\t")[2] for line in lines] == ["a/ok.jpg", "d/2.jpg"]
    assert all(len(line.split("\t")) == 3 for line in lines)
    printed = capsys.readouterr().out
    assert "skipped files: 3" in printed and printed.count("tab or line break") == 3


def test_inspect_rec_reports_empty_index_and_wrong_sizes(tmp_path, capsys):
    from tools import inspect_rec

    empty = make_rec(tmp_path / "empty")
    open(f"{empty}/train.idx", "w").close()
    assert inspect_rec.main([f"{empty}/train.rec"]) == 1
    assert "train.idx lists no records but" in capsys.readouterr().err
    mixed = make_rec(tmp_path / "mixed", sides={3: 100, 6: 128})
    assert inspect_rec.main([f"{mixed}/train.rec"]) == 1
    err = capsys.readouterr().err
    assert "3: image is 100x100, expected 112x112" in err
    assert "6: image is 128x128, expected 112x112" in err
    assert inspect_rec.main([f"{make_rec(tmp_path / 'good')}/train.rec"]) == 0
    assert "all records OK" in capsys.readouterr().out


def test_inspect_rec_bounds_a_lying_header(tmp_path, capsys):
    from data.recordio import IRHeader, frame_record, pack
    from tools import inspect_rec

    liar = make_rec(tmp_path / "liar", header=True)
    with open(f"{liar}/train.rec", "r+b") as f:  # same 40 bytes: 2**30 keys claimed
        f.write(frame_record(pack(IRHeader(0, [2**30, 2**30 + 4], 0, 0), b"")))
    assert inspect_rec.main([f"{liar}/train.rec"]) == 1
    assert "but the index lists 9 records" in capsys.readouterr().err


def test_inspect_rec_bounds_identity_ranges_and_non_finite_labels(tmp_path, capsys):
    """An identity record claiming [1, 3e9) took 2 minutes of CPU; NaN/inf ranges and labels gave
    tracebacks. Now each is a listed bad record (exit 1), found without walking the range."""
    from data.recordio import IRHeader, RecordIOWriter, pack, write_property
    from tools import inspect_rec

    def write(folder, identity_range, labels):
        os.makedirs(folder)
        n = len(labels)
        with RecordIOWriter(f"{folder}/train.rec", f"{folder}/train.idx") as w:
            w.write(0, pack(IRHeader(2, [n + 1, n + 2], 0, 0), b""))
            for i, label in enumerate(labels):
                w.write(1 + i, pack(IRHeader(0, label, 1 + i, 0), flat_jpeg(112)))
            w.write(n + 1, pack(IRHeader(2, identity_range, 0, 0), b""))
        write_property(folder, 1, 112, 112)
        return f"{folder}/train.rec"

    assert inspect_rec.main([write(tmp_path / "wide", [1, 3e9], [0.0, 0.0])]) == 1
    assert "identity record range [1.0, 3000000000.0]" in capsys.readouterr().err
    assert inspect_rec.main([write(tmp_path / "nan", [float("nan"), 2], [0.0, 0.0])]) == 1
    assert "identity record range [nan, 2.0]" in capsys.readouterr().err
    bad_labels = write(tmp_path / "labels", [1, 3], [float("nan"), float("inf")])
    assert inspect_rec.main([bad_labels]) == 1
    err = capsys.readouterr().err
    assert "label nan is not a finite number" in err and "label inf is not a finite" in err
