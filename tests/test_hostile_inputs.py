"""Hostile files and careless runs (issue 19): every case is refused with one clear line, no
code runs from a downloaded file, nothing a file asks for is allocated beyond its own size.
docs/reliability.md maps each case to its test here. No launches: the trainer's checks are
called in this process.
"""

import json
import os
import pickle
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import simplejpeg

from data.verification_bin import load_bin, read_bin_raw, write_bin


def jpeg(side=112, seed=0):
    """A random RGB JPEG of side x side pixels."""
    img = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return simplejpeg.encode_jpeg(img, quality=90, colorspace="RGB")


@pytest.fixture
def umask_027():
    """Runs the test with umask 027, so default permissions differ from mkstemp's 0600 and from
    a hard-coded 0644."""
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


# --- 1. code from a downloaded .bin -----------------------------------------------------------


class _Payload:
    """Unpickling calls os.mkdir(marker): proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_convert_to_onnx_lfw_bin_runs_no_code(tmp_path):
    from tools import convert_to_onnx as conv

    marker = tmp_path / "pwned"
    hostile = tmp_path / "lfw.bin"
    with open(hostile, "wb") as f:
        pickle.dump(([_Payload(marker), jpeg()], [True]), f)
    with pytest.raises(ValueError, match=r"lfw\.bin.*refusing to load global"):
        conv.load_faces(lfw_bin=hostile, n=1)
    assert not marker.exists()
    assert "import pickle" not in Path(conv.__file__).read_text()  # one .bin reader


# --- 3. a few bytes of .bin that ask for gigabytes --------------------------------------------


def _bombs():
    """Pickles under 100 bytes that ask for about 1 GiB (today's reader allocates it)."""
    gib = b"\x8a\x05\x00\x00\x00\x40\x00"  # LONG1: 2**30
    return {
        "bytearray": b"\x80\x02c__builtin__\nbytearray\n" + gib + b"\x85R.",
        # memo index 2**26: the C unpickler sizes its memo table by it (2**27 pointers)
        "memo": b"\x80\x02Nr" + struct.pack("<i", 2**26) + b".",
        # BINBYTES8 of 2**30 bytes: allocated before it is read
        "bytes8": b"\x80\x04\x8e" + struct.pack("<Q", 2**30) + b"abc.",
        # numpy _reconstruct(ndarray, (2**30,), 'b'): an empty 1 GiB array
        "ndarray": b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
        + gib
        + b"\x85C\x01b\x87R.",
    }


@pytest.mark.parametrize("name", list(_bombs()))
def test_bin_allocation_bombs_are_refused_without_allocating(tmp_path, name):
    path = tmp_path / f"{name}.bin"
    path.write_bytes(_bombs()[name])
    assert path.stat().st_size < 100
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=rf"{name}\.bin: not a verification \.bin pickle"):
            read_bin_raw(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**24, f"{peak / 2**20:.0f} MiB allocated for a {name} bomb"


def test_bin_reader_still_reads_numpy_and_bytearray_items(tmp_path):
    items = [bytearray(jpeg(seed=1)), np.frombuffer(jpeg(seed=2), np.uint8)]
    for protocol in (2, 4):
        path = tmp_path / f"p{protocol}.bin"
        with open(path, "wb") as f:
            pickle.dump((items, np.array([True])), f, protocol=protocol)
        images, issame = load_bin(path)
        assert images.shape == (2, 112, 112, 3) and issame.tolist() == [True]


# --- 12. file permissions of what the tools write --------------------------------------------


def test_written_bin_gets_umask_permissions(tmp_path, umask_027):
    write_bin(tmp_path / "v.bin", [jpeg(), jpeg(seed=1)], [True])
    assert (tmp_path / "v.bin").stat().st_mode & 0o777 == umask_027


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


# --- 4, 9, 10. configs: alias bombs, bad values, unparsable overrides -------------------------

SYNTHETIC = "data: {kind: synthetic, num_image: 64, num_classes: 8}\n"


@pytest.fixture
def cfg_file(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(SYNTHETIC + f"output: {tmp_path / 'run'}\n")  # never the default work_dirs/run
    return str(path)


def _config_error(path, overrides=()):
    from trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


def _laughs(levels):
    """Nested anchors: level k repeats level k-1 nine times (9**levels strings in all)."""
    out = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for prev, name in zip("abcdefgh", "bcdefghi"[: levels - 1]):
        out.append(f"{name}: &{name} [{','.join([f'*{prev}'] * 9)}]")
    return out


def test_yaml_alias_bomb_is_refused(tmp_path, cfg_file):
    bomb = "model:\n  kwargs:\n    " + "\n    ".join(_laughs(9)) + "\n" + SYNTHETIC
    assert len(bomb) < 500
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb)
    msg = _config_error(str(path))
    assert msg.startswith(f"{path}: YAML anchors/aliases expand to more than"), msg
    override = "model.kwargs={" + ", ".join(_laughs(7)) + "}"
    assert "aliases expand" in _config_error(cfg_file, [override])


@pytest.mark.parametrize(
    "override, field",
    [
        ("optim.lr=.nan", "optim.lr"),
        ("optim.lr=.inf", "optim.lr"),
        ("schedule.power=0", "schedule.power"),
        ("schedule.power=-2", "schedule.power"),
        ("head.scale=0", "head.scale"),
        ("head.scale=-64", "head.scale"),
        ("optim.clip_grad=-1", "optim.clip_grad"),
        ("head.margin_list=[0.0,0.5,0.0]", "m1"),
        ("head.margin_list=[1.0,-0.5,0.0]", "m2"),
        ("head.margin_list=[1.0,4.0,0.0]", "m2"),
        ("head.margin_list=[1.0,0.0,-0.4]", "m3"),
        ("head.margin_list=[1.0,0.0,1.5]", "m3"),
        ("head.margin_list=[1.0,.nan,0.0]", "head.margin_list"),
        ("schedule.max_steps=-5", "schedule.max_steps"),
        ("optim.momentum=-0.9", "optim.momentum"),
        ("optim.weight_decay=-5e-4", "optim.weight_decay"),
        ("model.network=r51", "model.network"),
        ("model.kwargs={bogus: 1}", "model.kwargs.bogus"),
        ("model.kwargs={embed_dim: 64}", "model.kwargs.embed_dim"),  # a ViT keyword on r50
    ],
)
def test_bad_values_fail_at_load(cfg_file, override, field):
    assert field in _config_error(cfg_file, [override])


def test_bad_value_exits_2_with_one_line_before_any_process_group(cfg_file, tmp_path, capsys):
    import torch.distributed as dist

    from trainer.train import main

    small = [f"output={tmp_path / 'out'}", "model.network=mbf", "schedule.max_steps=1"]
    assert main([cfg_file, "optim.lr=.nan", *small]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "optim.lr" in err[0] and "finite" in err[0], err
    assert not dist.is_initialized()


def test_unparsable_override_and_mixed_key_types(cfg_file, tmp_path):
    msg = _config_error(cfg_file, ["optim.lr=[0.1"])
    assert msg.startswith("command line: 'optim.lr=[0.1': invalid YAML"), msg
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text(SYNTHETIC + "optim: {1: 2, lr: 0.1}\n")
    msg = _config_error(str(mixed))
    assert "mixed.yaml" in msg and "key 1 in 'optim'" in msg, msg


# --- 7, 10, 11, 12. data files: property, index, header, folders, sizes, .bins ----------------


def flat_jpeg(side, value=128):
    """A uniform side x side JPEG (a few hundred bytes)."""
    return simplejpeg.encode_jpeg(
        np.full((side, side, 3), value, np.uint8), quality=90, colorspace="RGB"
    )


def make_rec(folder, n=8, classes=4, side=112, sides=None, header=False):
    """`folder/train.rec|idx` + `property`: n images, label i % classes; `sides` maps an image
    index to another side; `header` writes insightface's key-0 header (images at keys 1..n)."""
    from data.recordio import IRHeader, RecordIOWriter, pack, write_property

    os.makedirs(folder, exist_ok=True)
    first = 1 if header else 0
    with RecordIOWriter(f"{folder}/train.rec", f"{folder}/train.idx") as w:
        if header:
            w.write(0, pack(IRHeader(0, [n + 1, n + 1 + classes], 0, 0), b""))
        for i in range(n):
            img = flat_jpeg((sides or {}).get(i, side), 10 * i)
            w.write(first + i, pack(IRHeader(0, float(i % classes), first + i, 0), img))
    write_property(folder, classes, side, side)
    return str(folder)


def rec_config(folder, *more, classes=4):
    from trainer.config import load_config

    base = ["data.kind=rec", f"data.rec={folder}", f"data.num_classes={classes}"]
    return load_config(None, [*base, "eval.val_targets=[]", *more])


def _one_line_exit2(capsys, argv, needle):
    from trainer.train import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("arcscale: config error:"), err
    assert needle in err[0], err
    return err[0]


def _build_error(cfg):
    from trainer.config import ConfigError
    from trainer.data_setup import build_dataset

    with pytest.raises(ConfigError) as info:
        build_dataset(cfg)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_garbage_property_file_is_one_line(tmp_path, cfg_file, capsys):
    data = make_rec(tmp_path / "rec")
    (tmp_path / "rec" / "property").write_bytes(b"\x00\xffgarbage")
    argv = [cfg_file, "data.kind=rec", f"data.rec={data}", "data.num_classes=4"]
    _one_line_exit2(capsys, argv, "property: expected 'num_classes,height,width'")


def test_empty_index_and_lying_header_are_one_line(tmp_path):
    data = make_rec(tmp_path / "empty")
    open(f"{data}/train.idx", "w").close()
    assert "the index lists no records" in _build_error(rec_config(data))
    liar = make_rec(tmp_path / "liar", header=True)
    from data.recordio import IRHeader, frame_record, pack

    with open(f"{liar}/train.rec", "r+b") as f:  # same 40 bytes: images 1..999 claimed
        f.write(frame_record(pack(IRHeader(0, [1000, 1004], 0, 0), b"")))
    assert "header declares image keys 1..999" in _build_error(rec_config(liar))


def test_non_image_file_in_folder_dataset_is_one_line(tmp_path):
    from trainer.config import load_config

    root = tmp_path / "faces"
    for person in ("a", "b"):
        (root / person).mkdir(parents=True)
        (root / person / "1.jpg").write_bytes(flat_jpeg(112))
    (root / "b" / "notes.txt").write_text("not a face")
    cfg = load_config(None, ["data.kind=folder", f"data.rec={root}", "data.num_classes=2"])
    assert "notes.txt: not an image file" in _build_error(cfg)


def test_wrong_image_size_fails_at_startup_naming_the_record(tmp_path):
    from trainer.config import load_config

    small = make_rec(tmp_path / "small", side=100)
    msg = _build_error(rec_config(small))
    assert "train.rec key 0: image is 100x100, expected 112x112" in msg, msg
    root = tmp_path / "faces"
    (root / "a").mkdir(parents=True)
    (root / "a" / "1.jpg").write_bytes(flat_jpeg(64))
    cfg = load_config(None, ["data.kind=folder", f"data.rec={root}", "data.num_classes=1"])
    assert "1.jpg: image is 64x64, expected 112x112" in _build_error(cfg)


def test_skip_corrupt_skips_a_wrong_size_image_mid_epoch(tmp_path):
    from data.datasets import CorruptRecordError, RecordDataset
    from data.loader import build_cpu_loader

    data = make_rec(tmp_path / "rec", n=8, sides={5: 96})
    ds = RecordDataset(f"{data}/train.rec", image_size=112)
    with pytest.raises(CorruptRecordError, match="key 5: image is 96x96, expected 112x112"):
        ds[5]
    loader = build_cpu_loader(ds, 4, 0, 1, 0, num_workers=0, shuffle=False, skip_corrupt=True)
    loader.set_epoch(0)
    assert [len(labels) for _, labels in loader] == [4, 4]
    assert len(loader.corrupt) == 1 and "key 5" in loader.corrupt[0]


def test_eval_bin_with_fewer_pairs_than_folds_fails_at_startup(tmp_path, cfg_file, capsys):
    small = tmp_path / "tiny.bin"
    write_bin(small, [flat_jpeg(112)] * 6, [True, False, True])
    argv = [cfg_file, f"eval.val_targets=[{small}]"]
    _one_line_exit2(capsys, argv, "tiny.bin holds 3 pairs, the 10-fold evaluation needs")


def test_two_eval_targets_with_one_name_are_refused(tmp_path, cfg_file, capsys):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        write_bin(tmp_path / sub / "lfw.bin", [flat_jpeg(112)] * 20, [True, False] * 5)
    targets = f"eval.val_targets=[{tmp_path}/a/lfw.bin,{tmp_path}/b/lfw.bin]"
    _one_line_exit2(capsys, [cfg_file, targets], "have the same name 'lfw'")


# --- 10. tools/eval_verification.py: every bad input is one line, exit 2 ---------------------


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    from tests.test_eval_tools import export_onnx
    from tests.test_verification import tiny_net

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
    from tests.test_verification import write_tiny_bin

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


def test_bin_image_declaring_a_huge_size_is_refused_before_decoding(tmp_path):
    big = simplejpeg.encode_jpeg(np.zeros((4200, 4200, 3), np.uint8), colorspace="RGB")
    assert len(big) < 2**20  # under 1 MiB on disk, 50 MiB decoded, per reference
    write_bin(tmp_path / "huge.bin", [big, big], [True])
    with pytest.raises(ValueError, match=r"huge\.bin: image 0 declares a 4200-pixel side"):
        load_bin(tmp_path / "huge.bin")
