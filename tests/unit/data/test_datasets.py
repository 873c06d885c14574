"""Decoding, normalization and the three datasets (RecordIO, image folder, synthetic)."""

from __future__ import annotations

import io
import os
import shutil

import cv2
import numpy as np
import pytest
import simplejpeg
import torch
from PIL import Image

from data.datasets import ImageFolderDataset, RecordDataset, SyntheticDataset
from data.decode import decode_image, normalize
from data.recordio import IRHeader, RecordIOWriter, pack
from tests.helpers.lfw_rec import lfw_faces, write_lfw_rec


@pytest.fixture(scope="module")
def faces(lfw_root):
    return lfw_faces(lfw_root, num_people=6, per_person=3)


@pytest.fixture(scope="module")
def lfw_rec(faces, tmp_path_factory):
    return write_lfw_rec(str(tmp_path_factory.mktemp("rec")), faces)


# ---------------------------------------------------------------- decode / normalize


def test_decode_jpeg_png_gray(faces):
    img = faces[0][1]
    jpeg = simplejpeg.encode_jpeg(img, quality=98, colorspace="RGB")
    out = decode_image(jpeg)
    assert out.shape == (112, 112, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - img).mean() < 3.0  # JPEG loss at quality 98
    ok, png = cv2.imencode(".png", img[:, :, ::-1])  # OpenCV writes BGR
    assert ok and np.array_equal(decode_image(png.tobytes()), img)  # lossless, RGB order kept
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    ok, gpng = cv2.imencode(".png", gray)
    g = decode_image(gpng.tobytes())
    assert g.shape == (112, 112, 3) and all(np.array_equal(g[..., c], gray) for c in range(3))


def test_decode_errors_name_the_source(faces):
    with pytest.raises(ValueError, match="train.rec key 17"):
        decode_image(b"this is not an image at all", where="train.rec key 17")
    with pytest.raises(ValueError, match="somewhere: empty"):
        decode_image(b"", where="somewhere")
    jpeg = simplejpeg.encode_jpeg(faces[0][1], quality=90, colorspace="RGB")
    with pytest.raises(ValueError, match="cut.jpg"):
        decode_image(jpeg[:40], where="cut.jpg")  # truncated inside the headers


def test_normalize_range_layout_and_backends():
    rng = np.random.default_rng(1)
    hwc = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    hwc[0, 0] = [0, 255, 128]
    ref = (hwc.astype(np.float64) / 255.0 - 0.5) / 0.5
    out = normalize(hwc)
    assert out.dtype == np.float32 and out.shape == (3, 4, 5)
    np.testing.assert_allclose(out, ref.transpose(2, 0, 1), atol=1e-6)
    assert out[0, 0, 0] == -1.0 and out[1, 0, 0] == 1.0
    batch = np.stack([hwc, hwc[::-1]])
    t = normalize(torch.from_numpy(batch))
    assert t.dtype == torch.float32 and t.shape == (2, 3, 4, 5)
    assert t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    np.testing.assert_allclose(t.numpy(), normalize(batch), atol=1e-6)
    np.testing.assert_allclose(t[1].numpy(), ref[::-1].transpose(2, 0, 1), atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        normalize(hwc.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        normalize(hwc[:, :, :2])


# ---------------------------------------------------------------- RecordDataset


def test_record_dataset_insightface_layout(lfw_rec, faces):
    rec, idx, labels, jpegs = lfw_rec
    ds = RecordDataset(rec)  # idx next to the rec, num_classes from 'property'
    assert len(ds) == len(faces) and ds.num_classes == len({n for n, _ in faces})
    assert list(ds.keys) == list(range(1, len(faces) + 1))
    for i in (0, 7, len(ds) - 1):
        img, label = ds[i]
        assert isinstance(label, int) and label == labels[i]
        assert img.dtype == np.uint8 and img.shape == (112, 112, 3)
        # same bytes through an independent decoder (PIL/libjpeg) and the original pixels
        ref = np.asarray(Image.open(io.BytesIO(jpegs[i])).convert("RGB"))
        assert np.abs(img.astype(int) - ref).max() <= 2
        assert np.abs(img.astype(int) - faces[i][1]).mean() < 4.0
    assert [ds.read_label(i) for i in range(len(ds))] == labels
    t = RecordDataset(rec, idx, transform=normalize)[3][0]
    assert t.dtype == np.float32 and t.shape == (3, 112, 112) and t.min() >= -1 and t.max() <= 1


def test_record_dataset_without_header(faces, tmp_path):
    rec, idx, labels, _ = write_lfw_rec(
        str(tmp_path), faces[:5], with_header=False, property_file=False
    )
    with pytest.raises(ValueError, match="num_classes unknown"):
        RecordDataset(rec, idx)
    ds = RecordDataset(rec, idx, num_classes=10)
    assert list(ds.keys) == [0, 1, 2, 3, 4] and [ds[i][1] for i in range(5)] == labels


def test_record_dataset_num_classes_from_header(faces, tmp_path):
    rec, idx, _, _ = write_lfw_rec(str(tmp_path), faces[:6], property_file=False)
    assert RecordDataset(rec, idx).num_classes == len({n for n, _ in faces[:6]})


def test_record_dataset_bad_label_and_image_name_key(faces, tmp_path):
    rec = str(tmp_path / "bad.rec")
    good = simplejpeg.encode_jpeg(faces[0][1], quality=90, colorspace="RGB")
    with RecordIOWriter(rec, str(tmp_path / "bad.idx")) as w:
        w.write(0, pack(IRHeader(0, 1.0, 0, 0), good))
        w.write(1, pack(IRHeader(0, 5.0, 1, 0), good))  # label 5 >= num_classes 3
        w.write(2, pack(IRHeader(0, 2.0, 2, 0), b"\xff\xd8garbage-not-a-jpeg"))
        w.write(3, pack(IRHeader(0, 0.5, 3, 0), good))  # not an integer
        w.write(4, pack(IRHeader(0, [2.0, 7.0], 4, 0), good))  # array label: first element
    ds = RecordDataset(rec, num_classes=3)
    assert ds[0][1] == 1 and ds[4][1] == 2
    with pytest.raises(ValueError, match=r"bad\.rec key 1: label 5 outside \[0, 3\)"):
        ds[1]
    with pytest.raises(ValueError, match=r"bad\.rec key 2: cannot decode"):
        ds[2]
    with pytest.raises(ValueError, match=r"bad\.rec key 3: label 0.5 is not an integer"):
        ds[3]
    with pytest.raises(IndexError):
        ds[5]


# ---------------------------------------------------------------- ImageFolderDataset


def test_image_folder_dataset(lfw_root, tmp_path):
    base = os.path.join(lfw_root, "lfw-deepfunneled")
    people = ["Aaron_Peirsol", "Abdullah_Gul", "Aaron_Eckhart"]
    for p in people:
        for f in sorted(os.listdir(os.path.join(base, p)))[:2]:
            os.makedirs(tmp_path / p, exist_ok=True)
            shutil.copy(os.path.join(base, p, f), tmp_path / p / f)
    ds = ImageFolderDataset(str(tmp_path))
    assert ds.num_classes == 3 and ds.classes == sorted(people)
    counts = {c: len(os.listdir(tmp_path / c)) for c in sorted(people)}
    assert len(ds) == sum(counts.values())
    expect = [i for i, c in enumerate(sorted(people)) for _ in range(counts[c])]
    assert [ds[i][1] for i in range(len(ds))] == expect
    img = ds[0][0]
    with Image.open(ds.samples[0][0]) as im:
        ref = np.asarray(im.convert("RGB"))
    assert img.shape == ref.shape == (250, 250, 3) and np.abs(img.astype(int) - ref).max() <= 2
    (tmp_path / sorted(people)[0] / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="notes.txt: not an image"):
        ImageFolderDataset(str(tmp_path))
    os.remove(tmp_path / sorted(people)[0] / "notes.txt")
    os.makedirs(tmp_path / "Zed_Empty")
    with pytest.raises(ValueError, match="Zed_Empty: identity folder is empty"):
        ImageFolderDataset(str(tmp_path))


# ---------------------------------------------------------------- SyntheticDataset


def test_synthetic_dataset_deterministic():
    a, b = SyntheticDataset(50, 7, seed=3), SyntheticDataset(50, 7, seed=3)
    c = SyntheticDataset(50, 7, image_size=64, seed=4)
    assert len(a) == 50 and a.num_classes == 7
    for i in (0, 13, 49):
        img, label = a[i]
        assert img.dtype == np.uint8 and img.shape == (112, 112, 3) and label == i % 7
        assert np.array_equal(img, a[i][0]) and np.array_equal(img, b[i][0])
    assert not np.array_equal(a[0][0], a[1][0])
    assert c[0][0].shape == (64, 64, 3) and not np.array_equal(c[0][0], a[0][0][:64, :64])
    with pytest.raises(IndexError):
        a[50]
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticDataset(10, 0)


# ---------------------------------------------------------------- numpy image index


def _reference_images(rec, idx):
    """Image (key, offset, label) by the old dict parse + header rule, independent of data/."""
    from data.recordio import RecordIOReader, record_label, unpack

    with open(idx) as fh:
        table = dict(tuple(int(v) for v in line.split()) for line in fh if line.strip())
    reader = RecordIOReader(rec)
    header, _ = unpack(reader.read_at(table[0])[0])
    keys = range(1, int(header.label[0])) if header.flag > 0 else sorted(table)
    labels = [record_label(unpack(reader.read_at(table[k])[0])[0]) for k in keys]
    return list(keys), [table[k] for k in keys], labels


def test_numpy_image_index_matches_dict_index(lfw_rec):
    rec, idx, labels, _ = lfw_rec
    ds = RecordDataset(rec, idx)
    keys, offsets, ref_labels = _reference_images(rec, idx)
    assert ref_labels == labels
    assert list(ds.keys) == keys and ds.offsets.tolist() == offsets
    assert [ds.read_label(i) for i in range(len(ds))] == labels
    assert ds.offsets.dtype == np.int64 and isinstance(ds.keys, range)
    assert ds.index.nbytes / len(ds) <= 24  # was ~158 B/entry in dicts/lists/sets


def test_shared_image_index_built_once_and_memory_mapped(lfw_rec, tmp_path, monkeypatch):
    import data.image_index as image_index

    rec, idx, labels, _ = lfw_rec
    cache, calls, builds = str(tmp_path / "cache"), [], []
    build = image_index.build_image_index
    monkeypatch.setattr(image_index, "build_image_index", lambda *a: builds.append(a) or build(*a))
    with pytest.raises(RuntimeError, match="missing after the barrier"):
        image_index.shared_image_index(rec, idx, cache, local_rank=1)  # rank 0 did not build
    first = image_index.shared_image_index(rec, idx, cache, 0, lambda: calls.append(0))
    other = image_index.shared_image_index(rec, idx, cache, 1, lambda: calls.append(1))
    again = image_index.shared_image_index(rec, idx, cache, 0, lambda: calls.append(0))
    assert len(builds) == 1 and calls == [0, 1, 0]  # cached after the first build
    for index in (first, other, again):
        assert isinstance(index.offsets, np.memmap) and index.keys == range(1, len(labels) + 1)
        assert index.offsets.tolist() == _reference_images(rec, idx)[1]
    ds = RecordDataset(rec, idx, index=other)
    assert [ds.read_label(i) for i in range(len(ds))] == labels and ds.num_classes == 6
    # spawn-started workers get the cache path, not a copy of the offsets
    import pickle

    clone = pickle.loads(pickle.dumps(ds))
    assert isinstance(clone.index.offsets, np.memmap) and clone.index.cache == other.cache
    assert clone.read_label(5) == labels[5] and len(pickle.dumps(ds)) < 2000
