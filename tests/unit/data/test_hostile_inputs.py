"""Hostile data files (issue 19): verification .bins that ask for gigabytes or declare huge
images, .rec files with an empty index, a lying header or wrong image sizes, non-images in a
folder dataset; every case is refused with one clear line, nothing a file asks for is allocated
beyond its own size. docs/reliability.md maps each case to its test. The config and entry-point
cases: tests/unit/trainer/test_hostile_inputs.py; the tools': tests/unit/tools/.
"""

import pickle
import struct
import tracemalloc

import numpy as np
import pytest
import simplejpeg

from data.decode import decode_image
from data.verification_bin import load_bin, read_bin_raw, write_bin
from tests.helpers.hostile import (
    bmp_header,
    bomb_jpeg,
    bomb_png,
    flat_jpeg,
    jpeg,
    make_rec,
    no_decoder,
)

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


# --- 12. file permissions of what the data layer writes ---------------------------------------


def test_written_bin_gets_umask_permissions(tmp_path, umask_027):
    write_bin(tmp_path / "v.bin", [jpeg(), jpeg(seed=1)], [True])
    assert (tmp_path / "v.bin").stat().st_mode & 0o777 == umask_027


# --- 7, 10, 11, 12. data files: property, index, header, folders, sizes, .bins ----------------


def rec_config(folder, *more, classes=4):
    from trainer.config import load_config

    base = ["data.kind=rec", f"data.rec={folder}", f"data.num_classes={classes}"]
    return load_config(None, [*base, "eval.val_targets=[]", *more])


def _build_error(cfg):
    from trainer.config import ConfigError
    from trainer.data_setup import build_dataset

    with pytest.raises(ConfigError) as info:
        build_dataset(cfg)
    assert "\n" not in str(info.value)
    return str(info.value)


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


# --- .bin images that declare a huge size -------------------------------------------------------


def test_bin_image_declaring_a_huge_size_is_refused_before_decoding(tmp_path):
    big = simplejpeg.encode_jpeg(np.zeros((4200, 4200, 3), np.uint8), colorspace="RGB")
    assert len(big) < 2**20  # under 1 MiB on disk, 50 MiB decoded, per reference
    write_bin(tmp_path / "huge.bin", [big, big], [True])
    with pytest.raises(ValueError, match=r"huge\.bin image 0: declares a 4200-pixel side"):
        load_bin(tmp_path / "huge.bin")


@pytest.mark.parametrize("kind", ["jpeg", "png", "bmp"])
def test_decoder_refuses_a_header_declaring_a_huge_size_before_decoding(kind, monkeypatch):
    """The one decoder entry point reads the declared size first (issue 32 item 8: a 331-byte
    JPEG declaring 50000x50000 made eval_ijb allocate 8.2 GB): no decoder is called."""
    buf = {"jpeg": bomb_jpeg, "png": bomb_png, "bmp": bmp_header}[kind]()
    assert len(buf) < 1000
    no_decoder(monkeypatch)
    with pytest.raises(ValueError, match=r"^face\.img: .*(declares|exceeds limit)") as err:
        decode_image(buf, where="face.img")
    assert "refused before decoding" in str(err.value) and "\n" not in str(err.value)
