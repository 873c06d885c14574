"""Hostile files given to the tools (issue 19): no code runs from a downloaded .bin, every bad
input of eval_verification, make_bin, folder2rec and inspect_rec is one clear line, what the
tools write gets the umask's permissions. docs/reliability.md maps each case to its test.
"""

import json
import os
import pickle
import re
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


def test_every_image_reader_refuses_a_decode_bomb_before_decoding(tmp_path, monkeypatch, capsys):
    """Issue 32 item 8: eval_ijb and convert_to_onnx --lfw-bin allocated 8.2 GB for a 331-byte
    JPEG declaring 50000x50000; embed, align_faces and folder2rec 4.3 GB for 30000x30000 (and
    folder2rec packed the truncated image). Each reads through `data.decode.decode_image`."""
    import numpy as np

    from data.ijb import AlignedFaces
    from data.verification_bin import write_bin
    from tests.helpers.hostile import bomb_jpeg, bomb_png, no_decoder
    from tools import align_faces, embed, folder2rec
    from tools import convert_to_onnx as conv

    no_decoder(monkeypatch)
    (tmp_path / "loose_crop").mkdir()
    (tmp_path / "loose_crop" / "b.jpg").write_bytes(bomb_jpeg())
    points = np.array([[38, 52], [74, 52], [56, 72], [42, 92], [70, 92]], np.float32)
    with pytest.raises(ValueError, match=r"b\.jpg: declares 50000x50000 pixels") as err:
        AlignedFaces(str(tmp_path), ["b.jpg"], points[None])[0]  # eval_ijb's reader
    assert str(err.value).count("b.jpg") == 1
    write_bin(tmp_path / "lfw.bin", [bomb_jpeg(), bomb_jpeg()], [True])
    with pytest.raises(ValueError, match=r"lfw\.bin image 0: declares a 50000-pixel side"):
        conv.load_faces(lfw_bin=tmp_path / "lfw.bin", n=1)
    (tmp_path / "p.png").write_bytes(bomb_png())
    with pytest.raises(ValueError, match="declares 30000x30000 pixels"):
        embed.read_face(str(tmp_path / "p.png"))
    job = (str(tmp_path / "p.png"), points, str(tmp_path / "out" / "p.jpg"), 90)
    assert "declares 30000x30000 pixels" in align_faces.align_job(job)
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "ok.jpg").write_bytes(flat_jpeg(112))
    (src / "a" / "p.png").write_bytes(bomb_png())
    monkeypatch.undo()  # ok.jpg is decoded for real; p.png must still never be
    monkeypatch.setattr("data.decode.cv2.imdecode", _refuse_huge_png)
    out = tmp_path / "rec"
    assert folder2rec.main([str(src), str(out), "--workers", "1", "--no-progress"]) == 0
    packed = [ln.split("\t")[2] for ln in (out / "train.lst").read_text().splitlines()]
    assert packed == ["a/ok.jpg"]
    assert "declares 30000x30000 pixels" in capsys.readouterr().out


def _refuse_huge_png(buf, flags):
    raise AssertionError("cv2.imdecode ran on the 30000x30000 PNG")


# --- issue 32 items 7 and 15: eval_ijb checks everything before the embedding pass -------------


def _fixed_64_onnx(path):
    """An ONNX model whose input is fixed at (1, 3, 64, 64)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(tiny_net(), (torch.randn(1, 3, 64, 64),), str(path),
                          input_names=["data"], output_names=["fc1"], dynamo=False)  # fmt: skip
    return str(path)


def _ijb_fails(capsys, argv, needle):
    from tools import eval_ijb

    with pytest.raises(SystemExit) as info:
        eval_ijb.main([*argv, "--no-progress"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("eval_ijb: error:"), err
    assert needle in err[0], err


def _edit(root, name, change):
    path = os.path.join(root, "meta", name)
    with open(path) as f:
        lines = f.read().splitlines()
    with open(path, "w") as f:
        f.write("\n".join(change(lines)) + "\n")


def test_eval_ijb_checks_protocol_output_and_model_before_embedding(
    ijb_release, tmp_path, monkeypatch, capsys
):
    """Issue 32 item 7: a missing or malformed 1:N CSV, a pair naming a template without images
    and a file as --out were found only after embedding every face (hours on a real release);
    item 15: a template id of 10^30 (OverflowError), an ONNX model with a fixed 64x64 input
    (onnxruntime traceback). Each is one line, exit 2, and no face is embedded."""
    import shutil

    import numpy as np

    from tools import eval_ijb

    def embedded(*args, **kwargs):
        raise AssertionError("embedding started before the inputs were checked")

    monkeypatch.setattr(eval_ijb, "embed_release", embedded)
    src, _ = ijb_release
    model = _fixed_64_onnx(tmp_path / "fixed64.onnx")
    good = str(tmp_path / "good.onnx")
    export_onnx(tiny_net(), good)
    cases = {
        "no_g2": (lambda r: os.remove(f"{r}/meta/ijbc_1N_gallery_G2.csv"), "G2.csv: no such file"),
        "bad_csv": (lambda r: _edit(r, "ijbc_1N_probe_mixed.csv", lambda ls: [*ls[:2], "x,1,a"]),
                    "ijbc_1N_probe_mixed.csv line 3: expected"),
        "pair": (lambda r: _edit(r, "ijbc_template_pair_label.txt", lambda ls: [*ls, "100 999 0"]),
                 "template 999 has no images in"),
        "probe": (lambda r: _edit(r, "ijbc_1N_probe_mixed.csv", lambda ls: [*ls, "998,1,a.jpg"]),
                  "ijbc_1N_probe_mixed.csv: template 998 has no images"),
        "huge_id": (lambda r: _edit(r, "ijbc_face_tid_mid.txt",
                                    lambda ls: [ls[0].rsplit(" ", 2)[0] + " 1" + "0" * 30 + " 1",
                                                *ls[1:]]),
                    "ijbc_face_tid_mid.txt line 1: expected"),
        "nul": (lambda r: _edit(r, "ijbc_name_5pts_score.txt", lambda ls: ["a\0" + ls[0], *ls[1:]]),
                "ijbc_name_5pts_score.txt line 1: image name 'a\\x001.jpg' holds a NUL byte"),
    }  # fmt: skip
    for name, (damage, needle) in cases.items():
        root = tmp_path / name
        shutil.copytree(src, root)
        damage(str(root))
        argv = ["--model", good, "--release", str(root), "--out", str(tmp_path / "o")]
        _ijb_fails(capsys, argv, needle)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for out, needle in ((a_file, "exists and is not a folder"), (a_file / "x", "cannot write")):
        _ijb_fails(capsys, ["--model", good, "--release", src, "--out", str(out)], needle)
    argv = ["--model", model, "--release", src, "--out", str(tmp_path / "o")]
    _ijb_fails(capsys, argv, "takes input [1, 3, 64, 64]")
    # an .npy header declaring 2^40 elements: refused from the header, nothing allocated
    lying = tmp_path / "lying.npy"
    with open(lying, "wb") as f:
        header = {"descr": "<f4", "fortran_order": False, "shape": (2**36, 16)}
        np.lib.format.write_array_header_1_0(f, header)
        f.write(bytes(64))
    argv = ["--image-features", str(lying), "--release", src, "--out", str(tmp_path / "o")]
    _ijb_fails(capsys, argv, "lying.npy: not a readable .npy array")


def test_eval_ijb_writes_features_before_scoring_and_names_a_workers_bad_file(
    ijb_release, tmp_path, monkeypatch, capsys
):
    """Item 7: a failure while scoring keeps image_features.npy (the embedding pass's output);
    item 15: an undecodable image under DataLoader workers named only the worker process."""
    import shutil

    import numpy as np

    from data.ijb import load_meta
    from tools import eval_ijb

    src, _ = ijb_release
    n = len(load_meta(src, pairs=False).images)
    feats = tmp_path / "feats.npy"
    np.save(feats, np.random.default_rng(0).standard_normal((n, 16)).astype(np.float32))

    def broken(*args, **kwargs):
        raise ValueError("scoring failed")

    with monkeypatch.context() as m:
        m.setattr(eval_ijb, "score_release", broken)
        argv = ["--image-features", str(feats), "--release", src, "--out", str(tmp_path / "o")]
        _ijb_fails(capsys, argv, "scoring failed")
    assert np.array_equal(np.load(tmp_path / "o" / "image_features.npy"), np.load(feats))
    root = tmp_path / "release"
    shutil.copytree(src, root)
    first = load_meta(str(root), pairs=False).images[0]
    (root / "loose_crop" / first).write_bytes(b"\xff\xd8 not a jpeg")
    model = str(tmp_path / "good.onnx")
    export_onnx(tiny_net(), model)
    argv = ["--model", model, "--release", str(root), "--out", str(tmp_path / "o2")]
    _ijb_fails(capsys, [*argv, "--workers", "1"], f"loose_crop/{first}: cannot decode image")


def test_embed_fixed_size_onnx_and_deep_results_json_are_one_line(tmp_path, capsys):
    """Issue 32 item 15: an ONNX model with a fixed 64x64 input (onnxruntime traceback) and a
    deeply nested --results JSON (RecursionError)."""
    from tools import embed

    faces = [tmp_path / "a.jpg", tmp_path / "b.jpg"]
    for i, face in enumerate(faces):
        face.write_bytes(flat_jpeg(112, 60 * i))
    model = _fixed_64_onnx(tmp_path / "fixed64.onnx")
    assert embed.main([model, "--compare", *map(str, faces), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "takes input [1, 3, 64, 64] but aligned faces" in err[0], err
    deep = tmp_path / "results.json"
    deep.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ValueError, match="results.json: not a verification results.json"):
        embed.threshold_from_results(str(deep), None)


def test_compare_runs_on_a_lying_event_file_and_an_arm_name_with_a_bar(tmp_path, capsys):
    """Issue 32 item 15: a 24-byte event file declaring a 2^40-byte record (MemoryError); an arm
    named `a|b` split its Markdown row into an extra column."""
    import struct

    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
    from torch.utils.tensorboard import SummaryWriter

    from tools import compare_runs

    lying = tmp_path / "bad_1" / "tensorboard"
    lying.mkdir(parents=True)
    header = struct.pack("<Q", 2**40)
    record = header + struct.pack("<I", masked_crc32c(header)) + bytes(12)
    (lying / "events.out.tfevents.1.host").write_bytes(record)
    assert len(record) == 24
    assert compare_runs.main([str(tmp_path / "bad_1"), "--target", "lfw"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "declares 1099511627776 bytes but the file holds 24" in err[0], err
    runs = []
    for arm in ("a|b", "c"):
        runs.append(str(tmp_path / f"{arm}_1"))
        with SummaryWriter(runs[-1]) as w:
            w.add_scalar("val/lfw/accuracy", 0.9, 1)
    assert compare_runs.main([*runs, "--target", "lfw", "--baseline", "a|b"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[2].startswith("| a\\|b | 90.00 |")
    cells = [len(re.split(r"(?<!\\)\|", row)) for row in rows]
    assert len(set(cells)) == 1, rows  # every row has as many cells as the header
