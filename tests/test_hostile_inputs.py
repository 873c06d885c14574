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
