"""Map-style face datasets: insightface RecordIO, an image folder, and a synthetic source.

Every dataset yields ``(image, label)`` with ``image`` a uint8 (H, W, 3) RGB array (or whatever
``transform`` maps it to) and ``label`` a Python int in ``[0, num_classes)``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import simplejpeg
from numpy.typing import NDArray

from data.decode import decode_image
from data.image_index import ImageIndex, build_image_index, image_index_of
from data.recordio import Keys, Label, RecordIOError, RecordIOReader, read_property, unpack

__all__ = [
    "IMAGE_EXTENSIONS",
    "CorruptRecordError",
    "ImageFolderDataset",
    "RecordDataset",
    "SyntheticDataset",
    "check_image_size",
    "image_keys_of",
    "scan_image_sizes",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

Transform = Callable[[np.ndarray], Any]


class CorruptRecordError(ValueError):
    """A record or image file that cannot be read or decoded (bad magic, truncated, bad JPEG).

    The message names the file, the key and the byte offset. The CPU loader skips exactly these
    with ``data.skip_corrupt``; label errors are plain ``ValueError`` and always stop a run.
    """


def _label_to_int(label: Label, where: str) -> int:
    """Header label (float, or float32 array whose first element is the class) -> int."""
    flat = np.asarray(label, dtype=np.float64).reshape(-1)
    if flat.size == 0:
        raise ValueError(f"{where}: empty label array")
    value = float(flat[0])
    if not np.isfinite(value) or value != int(value):
        raise ValueError(f"{where}: label {value!r} is not an integer class id")
    return int(value)


def image_keys_of(reader: RecordIOReader, name: str) -> Keys:
    """Keys of the image records of an insightface-style RecordIO file.

    insightface writes a header at key 0 with ``flag > 0`` and ``label = [first_identity_key,
    end_identity_key]``: images are keys ``range(1, int(label[0]))`` and the records after them
    describe identities (empty payloads). Without such a header every key in the index is an
    image. Reference: insightface arcface_torch ``dataset.py`` (``MXFaceDataset``).

    Args:
        reader: an open reader. name: the file named in errors.

    Returns:
        the keys in index order: a ``range`` (insightface layout, or consecutive keys) or an
        int64 array.

    Raises:
        ValueError: the header names image keys missing from the index, or none at all.
    """
    return image_index_of(reader, name).keys


def _num_classes_of(index: ImageIndex, rec_path: str) -> int:
    """num_classes from the ``property`` file, else from the header's identity-record range."""
    folder = os.path.dirname(os.path.abspath(rec_path))
    if os.path.isfile(os.path.join(folder, "property")):
        return int(read_property(folder)[0])
    if index.identity_keys is not None and index.identity_keys[1] > index.identity_keys[0]:
        return index.identity_keys[1] - index.identity_keys[0]
    raise ValueError(
        f"{rec_path}: num_classes unknown: pass num_classes= or write a 'property' file "
        f"('num_classes,112,112') next to the .rec"
    )


class RecordDataset:
    """Images and labels of an insightface/MXNet ``.rec`` + ``.idx`` pair.

    Args:
        rec_path: path to ``train.rec``.
        idx_path: path to the index; default: ``rec_path`` with ``.idx``.
        num_classes: number of identities; default: from ``property`` next to the rec, else from
            the identity-record range in the header record.
        transform: applied to the uint8 (H, W, 3) RGB image.
        index: a prebuilt ``ImageIndex`` (e.g. ``data.image_index.shared_image_index``, shared
            by the ranks of a node); default: parse ``idx_path``.
        image_size: side every decoded image must have (another size is a
            ``CorruptRecordError``, which ``data.skip_corrupt`` skips); None: any size.

    Item ``i`` is ``(transform(image), label)``; ``label`` is a Python int. ``keys`` (a range or
    int64 array) and ``offsets`` (int64) are the image records' keys and byte offsets.

    Raises:
        ValueError: unknown num_classes; from ``__getitem__``: a label outside
            ``[0, num_classes)``, naming the file and the key.
        CorruptRecordError: from ``__getitem__``: a malformed record (bad magic, truncated) or
            an undecodable image, naming the file, key and offset.
        RecordIOError: from the reader, for a malformed index.
        IndexError: index out of range.
    """

    def __init__(
        self,
        rec_path: str,
        idx_path: str | None = None,
        num_classes: int | None = None,
        transform: Transform | None = None,
        index: ImageIndex | None = None,
        image_size: int | None = None,
    ) -> None:
        self.rec_path = str(rec_path)
        self.idx_path = str(idx_path) if idx_path else os.path.splitext(self.rec_path)[0] + ".idx"
        self.index = index if index is not None else build_image_index(self.rec_path, self.idx_path)
        self.reader = RecordIOReader(self.rec_path)  # reads by offset: no second index
        self.num_classes = (
            int(num_classes) if num_classes is not None else _num_classes_of(self.index, rec_path)
        )
        if self.num_classes <= 0:
            raise ValueError(f"{rec_path}: num_classes must be positive, got {self.num_classes}")
        self.transform = transform
        self.image_size = image_size

    @property
    def keys(self) -> Keys:
        """Image record keys in file order (properties: a pickle carries only ``index``)."""
        return self.index.keys

    @property
    def offsets(self) -> NDArray[np.int64]:
        """int64 byte offsets of the image records."""
        return self.index.offsets

    def __len__(self) -> int:
        return len(self.keys)

    def read_label(self, index: int) -> int:
        """Label of item ``index`` (reads the record, skips the image decode)."""
        header, _ = unpack(self._read(index))
        return self._check_label(header.label, int(self.keys[index]))

    def _read(self, index: int) -> bytes:
        try:
            return self.reader.read_at(int(self.offsets[index]))[0]
        except RecordIOError as e:
            raise RecordIOError(f"{e} (key {int(self.keys[index])})") from None

    def scan_labels(self, max_keys: int = 10_000) -> int:
        """Checks the labels of up to ``max_keys`` records spread evenly over the file.

        Catches a wrong ``num_classes`` at start-up instead of hours into a run; a record past
        the sample still fails at first sight in ``__getitem__``. Unreadable records are left to
        the loader (``data.skip_corrupt``). Returns the number of labels checked.

        Raises:
            ValueError: a label outside ``[0, num_classes)``, naming the file and key.
        """
        n = len(self.keys)
        picks = np.unique(np.linspace(0, n - 1, num=min(n, max_keys)).astype(np.int64))
        checked = 0
        for i in picks.tolist():
            try:
                header, _ = unpack(self._read(i))
            except RecordIOError:
                continue
            self._check_label(header.label, int(self.keys[i]))
            checked += 1
        return checked

    def _check_label(self, raw: Label, key: int) -> int:
        where = f"{self.rec_path} key {key}"
        label = _label_to_int(raw, where)
        if not 0 <= label < self.num_classes:
            raise ValueError(f"{where}: label {label} outside [0, {self.num_classes})")
        return label

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if not -len(self.keys) <= index < len(self.keys):
            raise IndexError(f"{self.rec_path}: index {index} out of range ({len(self.keys)})")
        key, offset = int(self.keys[index]), int(self.offsets[index])
        try:
            header, payload = unpack(self._read(index))  # reader errors name file and key
        except RecordIOError as e:
            raise CorruptRecordError(f"{e} [offset {offset}]") from None
        label = self._check_label(header.label, key)
        try:
            image = decode_image(payload, where=f"{self.rec_path} key {key}")
            check_image_size(image.shape[:2], self.image_size, f"{self.rec_path} key {key}")
        except ValueError as e:
            raise CorruptRecordError(f"{e} [offset {offset}]") from None
        if self.transform is not None:
            image = self.transform(image)
        return image, label


class ImageFolderDataset:
    """``root/<identity>/<image>``: one sub-folder per identity, labels by sorted folder name.

    Args:
        root: dataset folder.
        transform: applied to the uint8 (H, W, 3) RGB image.
        image_size: as for ``RecordDataset``.

    Item ``i`` is ``(transform(image), label)``; files are sorted within each identity.

    Raises:
        FileNotFoundError: ``root`` missing.
        ValueError: no identity folders, an empty identity folder, a file directly under
            ``root``, or a file whose extension is not in ``IMAGE_EXTENSIONS`` (nothing is skipped);
            from ``__getitem__``: an undecodable image, naming the file.
    """

    def __init__(
        self, root: str, transform: Transform | None = None, image_size: int | None = None
    ) -> None:
        self.root = str(root)
        self.image_size = image_size
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"{self.root}: image folder not found")
        entries = sorted(os.listdir(self.root))
        stray = [e for e in entries if not os.path.isdir(os.path.join(self.root, e))]
        if stray:
            raise ValueError(
                f"{self.root}: expected only identity folders, found file {stray[0]!r}"
            )
        if not entries:
            raise ValueError(f"{self.root}: no identity folders")
        self.classes = entries
        self.samples: list[tuple[str, int]] = []
        for label, name in enumerate(entries):
            folder = os.path.join(self.root, name)
            files = sorted(os.listdir(folder))
            if not files:
                raise ValueError(f"{folder}: identity folder is empty")
            for f in files:
                path = os.path.join(folder, f)
                if not f.lower().endswith(IMAGE_EXTENSIONS) or not os.path.isfile(path):
                    raise ValueError(
                        f"{path}: not an image file (allowed: {', '.join(IMAGE_EXTENSIONS)})"
                    )
                self.samples.append((path, label))
        self.num_classes = len(entries)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        with open(path, "rb") as fh:
            try:
                image = decode_image(fh.read(), where=path)
                check_image_size(image.shape[:2], self.image_size, path)
            except ValueError as e:
                raise CorruptRecordError(str(e)) from None
        if self.transform is not None:
            image = self.transform(image)
        return image, label


def check_image_size(hw: tuple[int, int], size: int | None, where: str) -> None:
    """Raises ValueError naming ``where`` when ``hw`` (height, width) is not ``size`` x ``size``
    (models take 112x112 crops; resizing would silently train on distorted faces)."""
    if size is not None and tuple(hw) != (size, size):
        raise ValueError(f"{where}: image is {hw[1]}x{hw[0]}, expected {size}x{size}")


def _encoded_size(buf: bytes, where: str) -> tuple[int, int]:
    """(height, width) of an encoded image; a JPEG's header is enough, anything else decodes."""
    if simplejpeg.is_jpeg(buf):
        try:
            height, width = simplejpeg.decode_jpeg_header(buf)[:2]
            return int(height), int(width)
        except ValueError:
            pass
    height, width = decode_image(buf, where=where).shape[:2]
    return height, width


def scan_image_sizes(
    dataset: RecordDataset | ImageFolderDataset, size: int, max_items: int = 1000
) -> int:
    """Checks the size of up to ``max_items`` images spread evenly over a ``RecordDataset`` or
    ``ImageFolderDataset`` (JPEG headers only), so a dataset of the wrong size fails at start-up
    like a wrong label (``RecordDataset.scan_labels``). Unreadable images are left to the loader.

    Returns:
        the number of images checked.
    Raises:
        ValueError: an image that is not ``size`` x ``size``, naming the file (and key).
    """
    n = len(dataset)
    picks = np.unique(np.linspace(0, n - 1, num=min(n, max_items)).astype(np.int64))
    checked = 0
    for i in picks.tolist():
        try:
            if isinstance(dataset, RecordDataset):
                where = f"{dataset.rec_path} key {int(dataset.keys[i])}"
                buf = unpack(dataset._read(i))[1]
            else:
                where = dataset.samples[i][0]
                with open(where, "rb") as fh:
                    buf = fh.read()
            hw = _encoded_size(buf, where)
        except (OSError, ValueError):  # unreadable: data.skip_corrupt decides
            continue
        check_image_size(hw, size, where)
        checked += 1
    return checked


class SyntheticDataset:
    """Random uint8 images with cyclic labels, so any run can start without a dataset.

    Item ``i`` is a fixed (H, W, 3) uint8 image drawn from ``np.random.default_rng([seed, i])``
    (the same in every process and on every call) and label ``i % num_classes``.

    Args:
        num_samples: dataset length (> 0).
        num_classes: number of identities (> 0).
        image_size: H = W in pixels.
        seed: changes every image.
        transform: applied to the uint8 image.

    Raises:
        ValueError: non-positive sizes. IndexError: index out of range.
    """

    def __init__(
        self,
        num_samples: int,
        num_classes: int,
        image_size: int = 112,
        seed: int = 0,
        transform: Transform | None = None,
    ) -> None:
        for name, v in (("num_samples", num_samples), ("num_classes", num_classes)):
            if int(v) <= 0:
                raise ValueError(f"SyntheticDataset: {name} must be positive, got {v}")
        if int(image_size) <= 0:
            raise ValueError(f"SyntheticDataset: image_size must be positive, got {image_size}")
        self.num_samples = int(num_samples)
        self.num_classes = int(num_classes)
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.transform = transform

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"SyntheticDataset: index {index} out of range ({self.num_samples})")
        rng = np.random.default_rng([self.seed, index])
        s = self.image_size
        image = rng.integers(0, 256, size=(s, s, 3), dtype=np.uint8)
        if self.transform is not None:
            image = self.transform(image)
        return image, index % self.num_classes
