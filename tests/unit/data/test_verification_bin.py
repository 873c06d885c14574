"""data/verification_bin.py: insightface .bin round trips, Python-2 pickles, clear errors."""

import io
import os
import pickle
import pickletools
import struct

import cv2
import numpy as np
import pytest
import simplejpeg

from data.verification_bin import load_bin, read_bin_raw, write_bin


def png(img_rgb):
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(img_rgb[:, :, ::-1]))
    assert ok
    return buf.tobytes()


def random_images(n, h=12, w=10, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def py2_pickle(bins, issame):
    """The bytes Python 2's cPickle (protocol 2) writes for (bins, issame): str -> BINSTRING."""
    out = [b"\x80\x02", b"]", b"("]
    for b in bins:
        out.append(b"T" + struct.pack("<i", len(b)) + b)
    out += [b"e", b"]", b"("]
    out += [b"\x88" if s else b"\x89" for s in issame]
    out += [b"e", b"\x86", b"."]
    data = b"".join(out)
    pickletools.dis(data, out=io.StringIO())  # raises if the opcodes are malformed
    return data


def test_round_trip_png_is_exact(tmp_path):
    imgs = random_images(6)
    path = tmp_path / "set.bin"
    write_bin(path, [png(im) for im in imgs], [True, False, True])
    images, issame = load_bin(path)
    assert images.dtype == np.uint8 and images.shape == (6, 12, 10, 3)
    np.testing.assert_array_equal(images, imgs)
    assert issame.dtype == bool and issame.tolist() == [True, False, True]
    assert os.listdir(tmp_path) == ["set.bin"]  # no temporary file left behind
    assert os.stat(path).st_mode & 0o777 == 0o644


def test_jpeg_decodes_to_rgb(tmp_path):
    red = np.zeros((16, 16, 3), np.uint8)
    red[..., 0] = 220
    jpeg = simplejpeg.encode_jpeg(red, quality=95, colorspace="RGB")
    write_bin(tmp_path / "j.bin", [jpeg, jpeg], [True])
    images, _ = load_bin(tmp_path / "j.bin")
    assert abs(int(images[0, ..., 0].mean()) - 220) < 4 and images[0, ..., 2].mean() < 4


def test_python2_pickle_and_insightface_layout(tmp_path):
    imgs = random_images(4, seed=1)
    bins = [png(im) for im in imgs]
    path = tmp_path / "py2.bin"
    path.write_bytes(py2_pickle(bins, [False, True]))
    with pytest.raises(UnicodeDecodeError):  # what a plain Python 3 load does with these files
        pickle.loads(path.read_bytes())
    images, issame = load_bin(path)
    np.testing.assert_array_equal(images, imgs)
    assert issame.tolist() == [False, True]


def test_numpy_items_are_accepted(tmp_path):
    imgs = random_images(2, seed=2)
    items = [np.frombuffer(png(im), dtype=np.uint8) for im in imgs]
    with open(tmp_path / "np.bin", "wb") as f:
        pickle.dump((items, np.array([True])), f)
    images, issame = load_bin(tmp_path / "np.bin")
    np.testing.assert_array_equal(images, imgs)
    assert issame.tolist() == [True]


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        load_bin(tmp_path / "nope.bin")


def test_bad_pickle_and_code_injection(tmp_path):
    (tmp_path / "junk.bin").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="junk.bin: not a verification .bin pickle"):
        load_bin(tmp_path / "junk.bin")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(tmp_path / "evil.bin", "wb") as f:
        pickle.dump(([Evil(), b""], [True]), f)
    with pytest.raises(ValueError, match="refusing to load global"):
        read_bin_raw(tmp_path / "evil.bin")
    with open(tmp_path / "dict.bin", "wb") as f:
        pickle.dump({"bins": []}, f)
    with pytest.raises(ValueError, match=r"dict.bin: expected a pickled \(bins, issame_list\)"):
        load_bin(tmp_path / "dict.bin")


def test_count_mismatch(tmp_path):
    bins = [png(im) for im in random_images(3)]
    with open(tmp_path / "odd.bin", "wb") as f:
        pickle.dump((bins, [True]), f)
    with pytest.raises(ValueError, match="odd.bin: 3 images for 1 pairs"):
        load_bin(tmp_path / "odd.bin")
    with pytest.raises(ValueError, match="3 images for 2 pairs"):
        write_bin(tmp_path / "w.bin", bins, [True, False])
    assert not os.path.exists(tmp_path / "w.bin")


def test_undecodable_and_mixed_sizes_name_the_image(tmp_path):
    good = png(random_images(1)[0])
    write_bin(tmp_path / "bad.bin", [good, b"\xff\xd8garbage"], [True])
    with pytest.raises(ValueError, match="bad.bin image 1"):
        load_bin(tmp_path / "bad.bin")
    other = png(random_images(1, h=20, w=20)[0])
    write_bin(tmp_path / "mixed.bin", [good, other], [True])
    with pytest.raises(ValueError, match="mixed.bin: image 1 is 20x20, image 0 is 10x12"):
        load_bin(tmp_path / "mixed.bin")
    with pytest.raises(ValueError, match="image 0 is a str"):
        write_bin(tmp_path / "s.bin", ["text", good], [True])


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "keep.bin"
    write_bin(path, [png(im) for im in random_images(2)], [True])
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pickle, "dump", boom)
    with pytest.raises(OSError, match="disk full"):
        write_bin(path, [png(im) for im in random_images(2, seed=5)], [False])
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["keep.bin"]
