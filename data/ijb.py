"""IJB-B / IJB-C releases as insightface distributes them (``IJB_release/IJBC`` or ``IJBB``).

Layout (``P`` = ``ijbc`` or ``ijbb``), as read by arcface_torch's ``eval_ijbc.py``:

- ``loose_crop/<image>``: loosely cropped face images;
- ``meta/P_name_5pts_score.txt``: ``image x1 y1 x2 y2 x3 y3 x4 y4 x5 y5 score`` per line, the five
  landmarks (eyes, nose, mouth corners) in ``loose_crop`` pixels and the detector score;
- ``meta/P_face_tid_mid.txt``: ``image template_id media_id`` per line, the same images in the same
  order (an image belongs to one template; images of one media are frames of one video or one
  photo);
- ``meta/P_template_pair_label.txt``: ``template_id1 template_id2 label`` per line (1:1 protocol;
  15,658,489 pairs for IJB-C, 8,010,270 for IJB-B);
- 1:N: ``meta/ijbc_1N_gallery_G1.csv``, ``..._G2.csv``, ``meta/ijbc_1N_probe_mixed.csv`` (IJB-B:
  ``ijbb_1N_gallery_S1.csv``, ``..._S2.csv``, ``ijbb_1N_probe_mixed.csv``), one header line
  (``TEMPLATE_ID,SUBJECT_ID,FILENAME,...``) then one row per image.

Every parser raises ``FileNotFoundError`` naming a missing file and ``ValueError`` naming the file
and 1-based line of the first malformed line. ``AlignedFaces`` is the ``torch`` dataset that
decodes and aligns (``data.align``) the faces in DataLoader workers.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from data.align import align_face
from data.decode import decode_image

__all__ = [
    "IJBMeta",
    "IJBProtocol1N",
    "AlignedFaces",
    "release_prefix",
    "read_5pts",
    "read_face_tid_mid",
    "read_template_pairs",
    "read_1n_csv",
    "load_meta",
    "load_1n",
    "check_templates",
]

_GALLERIES = {"ijbc": ("G1", "G2"), "ijbb": ("S1", "S2")}


@dataclass(frozen=True)
class IJBMeta:
    """The images and 1:1 protocol of a release.

    Attributes:
        root: release folder (holds ``loose_crop/`` and ``meta/``).
        prefix: ``ijbc`` or ``ijbb``.
        images: (N,) image file names under ``loose_crop/``.
        landmarks: (N, 5, 2) float32 pixels.
        face_scores: (N,) float32 detector scores.
        templates, medias: (N,) int64 template and media id of each image.
        pairs: (P, 2) int64 template ids; ``labels``: (P,) bool, True = same subject. Empty when
            loaded with ``pairs=False``.
    """

    root: str
    prefix: str
    images: list[str]
    landmarks: NDArray[np.float32]
    face_scores: NDArray[np.float32]
    templates: NDArray[np.int64]
    medias: NDArray[np.int64]
    pairs: NDArray[np.int64]
    labels: NDArray[np.bool_]


@dataclass(frozen=True)
class IJBProtocol1N:
    """1:N (identification) protocol: two galleries and the mixed probe set.

    Attributes:
        galleries: gallery name (``G1``/``G2`` or ``S1``/``S2``) -> (template ids (T,) int64,
            subject ids (T,) int64), one row per template.
        probes: (template ids (Q,) int64, subject ids (Q,) int64).
    """

    galleries: dict[str, tuple[NDArray[np.int64], NDArray[np.int64]]]
    probes: tuple[NDArray[np.int64], NDArray[np.int64]]


def _meta(root: str, name: str) -> str:
    return os.path.join(root, "meta", name)


def release_prefix(root: str) -> str:
    """``ijbc`` or ``ijbb``: which release ``root`` holds (from its ``meta/*_face_tid_mid.txt``).

    Raises:
        FileNotFoundError: ``root/meta`` holds neither file.
    """
    for prefix in ("ijbc", "ijbb"):
        if os.path.isfile(_meta(root, f"{prefix}_face_tid_mid.txt")):
            return prefix
    raise FileNotFoundError(
        f"{os.path.join(root, 'meta')}: no ijbc_face_tid_mid.txt or ijbb_face_tid_mid.txt "
        "(expected an IJB release folder such as IJB_release/IJBC)"
    )


def _lines(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            return f.read().splitlines()
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not a UTF-8 text file ({e.reason})") from None


def _bad(path: str, number: int, expected: str, line: str) -> ValueError:
    return ValueError(f"{path} line {number}: expected '{expected}', got {line[:120]!r}")


_MAX_ID = 2**63 - 1  # ids are int64


def _id(text: str) -> int:
    """A template/media/subject id: a decimal integer in [0, 2^63) (ValueError otherwise, never
    numpy's OverflowError for 10^30)."""
    value = int(text)
    if not 0 <= value <= _MAX_ID:
        raise ValueError(f"id {text[:40]} outside [0, 2^63)")
    return value


def _check_name(path: str, number: int, name: str) -> str:
    # An image name must stay inside loose_crop/ (a crafted meta file cannot read elsewhere).
    if not name or name.startswith(("/", "\\")) or ".." in name.replace("\\", "/").split("/"):
        raise ValueError(f"{path} line {number}: image name {name!r} leaves loose_crop/")
    if "\0" in name:  # no file system allows it: open() would fail in a DataLoader worker
        raise ValueError(f"{path} line {number}: image name {name!r} holds a NUL byte")
    return name


def read_5pts(path: str) -> tuple[list[str], NDArray[np.float32], NDArray[np.float32]]:
    """Parse ``P_name_5pts_score.txt``.

    Returns:
        (image names (N,), landmarks (N, 5, 2) float32 pixels, detector scores (N,) float32).
    Raises:
        FileNotFoundError: no file. ValueError: a line without 12 fields, a non-finite number, an
            image name leaving ``loose_crop/`` or an empty file (names the file and line).
    """
    expected = "image x1 y1 ... x5 y5 score"
    names, values = [], []
    for number, line in enumerate(_lines(path), 1):
        fields = line.split()
        if len(fields) != 12:
            raise _bad(path, number, expected, line)
        try:
            row = [float(v) for v in fields[1:]]
        except ValueError:
            raise _bad(path, number, expected, line) from None
        if not np.isfinite(row).all():
            raise ValueError(f"{path} line {number}: non-finite landmark or score: {line[:120]!r}")
        names.append(_check_name(path, number, fields[0]))
        values.append(row)
    if not names:
        raise ValueError(f"{path}: no faces listed")
    arr = np.asarray(values, dtype=np.float32)
    return names, arr[:, :10].reshape(-1, 5, 2), arr[:, 10].copy()


def read_face_tid_mid(path: str) -> tuple[list[str], NDArray[np.int64], NDArray[np.int64]]:
    """Parse ``P_face_tid_mid.txt``.

    Returns:
        (image names (N,), template ids (N,) int64, media ids (N,) int64).
    Raises:
        FileNotFoundError: no file. ValueError: a line that is not ``image int int`` or an empty
            file (names the file and line).
    """
    expected = "image template_id media_id"
    names, ids = [], []
    for number, line in enumerate(_lines(path), 1):
        fields = line.split()
        if len(fields) != 3:
            raise _bad(path, number, expected, line)
        try:
            ids.append((_id(fields[1]), _id(fields[2])))
        except ValueError:
            raise _bad(path, number, expected, line) from None
        names.append(_check_name(path, number, fields[0]))
    if not names:
        raise ValueError(f"{path}: no faces listed")
    arr = np.asarray(ids, dtype=np.int64)
    return names, arr[:, 0].copy(), arr[:, 1].copy()


def read_template_pairs(path: str) -> tuple[NDArray[np.int64], NDArray[np.bool_]]:
    """Parse ``P_template_pair_label.txt`` (millions of lines: numpy's C parser, then a line scan
    only to name the first bad line when it fails).

    Returns:
        (template id pairs (P, 2) int64, labels (P,) bool).
    Raises:
        FileNotFoundError: no file. ValueError: a line that is not ``int int 0|1`` or an empty file
            (names the file and line).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # numpy warns on an empty file
            arr = np.loadtxt(path, dtype=np.int64, ndmin=2, comments=None)
        ok = arr.shape[0] > 0 and arr.shape[1] == 3 and bool(np.isin(arr[:, 2], (0, 1)).all())
        ok = ok and bool((arr[:, :2] >= 0).all())
    except (ValueError, OverflowError):  # numpy raises OverflowError for ids past int64
        ok = False
    if not ok:
        _raise_first_bad_pair(path)
    return arr[:, :2].copy(), arr[:, 2].astype(bool)


def _raise_first_bad_pair(path: str) -> None:
    expected = "template_id1 template_id2 label(0|1)"
    lines = _lines(path)
    if not lines:
        raise ValueError(f"{path}: no template pairs listed")
    for number, line in enumerate(lines, 1):
        fields = line.split()
        try:
            ints = [_id(v) for v in fields]
        except ValueError:
            raise _bad(path, number, expected, line) from None
        if len(ints) != 3 or ints[2] not in (0, 1):
            raise _bad(path, number, expected, line)
    raise ValueError(f"{path}: not a template pair list ({expected} per line)")


def read_1n_csv(path: str) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Parse a 1:N gallery or probe CSV: header ``TEMPLATE_ID,SUBJECT_ID,...``, one row per image.

    Returns:
        (template ids (T,) int64 in order of first appearance, subject id of each (T,) int64).
    Raises:
        FileNotFoundError: no file. ValueError: a wrong header, a row whose first two fields are
            not integers, a template listed under two subjects, or no rows (names file and line).
    """
    lines = _lines(path)
    header = lines[0].split(",") if lines else []
    if [h.strip().upper() for h in header[:2]] != ["TEMPLATE_ID", "SUBJECT_ID"]:
        raise _bad(path, 1, "TEMPLATE_ID,SUBJECT_ID,...", lines[0] if lines else "")
    subject_of: dict[int, int] = {}
    for number, line in enumerate(lines[1:], 2):
        fields = line.split(",")
        try:
            template, subject = _id(fields[0]), _id(fields[1])
        except (ValueError, IndexError):
            raise _bad(path, number, "TEMPLATE_ID,SUBJECT_ID,...", line) from None
        if subject_of.setdefault(template, subject) != subject:
            raise ValueError(
                f"{path} line {number}: template {template} listed under subjects "
                f"{subject_of[template]} and {subject}"
            )
    if not subject_of:
        raise ValueError(f"{path}: no templates listed")
    return (
        np.fromiter(subject_of.keys(), np.int64, len(subject_of)),
        np.fromiter(subject_of.values(), np.int64, len(subject_of)),
    )


def load_meta(root: str, pairs: bool = True) -> IJBMeta:
    """Read the face list, landmarks, templates and (with ``pairs``) the 1:1 pairs of a release.

    Raises:
        FileNotFoundError: ``root`` is not a release folder or a meta file is missing.
        ValueError: a malformed meta file, or the two face lists disagree (names both files and
            the first differing line).
    """
    prefix = release_prefix(root)
    tid_path = _meta(root, f"{prefix}_face_tid_mid.txt")
    pts_path = _meta(root, f"{prefix}_name_5pts_score.txt")
    names, landmarks, scores = read_5pts(pts_path)
    tid_names, templates, medias = read_face_tid_mid(tid_path)
    if len(tid_names) != len(names):
        raise ValueError(f"{tid_path} lists {len(tid_names)} faces but {pts_path} {len(names)}")
    if tid_names != names:
        i = next(i for i, (a, b) in enumerate(zip(tid_names, names)) if a != b)
        raise ValueError(
            f"{tid_path} line {i + 1} names {tid_names[i]!r} but {pts_path} line {i + 1} "
            f"{names[i]!r}: the two lists must name the same faces in the same order"
        )
    if pairs:
        pair_ids, labels = read_template_pairs(_meta(root, f"{prefix}_template_pair_label.txt"))
    else:
        pair_ids, labels = np.zeros((0, 2), np.int64), np.zeros(0, bool)
    return IJBMeta(root, prefix, names, landmarks, scores, templates, medias, pair_ids, labels)


def load_1n(root: str, prefix: str) -> IJBProtocol1N:
    """Read the 1:N galleries and mixed probes of a release (see the module docstring).

    Raises:
        FileNotFoundError: a missing CSV. ValueError: a malformed one (see ``read_1n_csv``).
    """
    galleries = {
        g: read_1n_csv(_meta(root, f"{prefix}_1N_gallery_{g}.csv")) for g in _GALLERIES[prefix]
    }
    return IJBProtocol1N(galleries, read_1n_csv(_meta(root, f"{prefix}_1N_probe_mixed.csv")))


def check_templates(meta: IJBMeta, protocol: IJBProtocol1N | None = None) -> None:
    """Every template the 1:1 pairs and (given) the 1:N galleries and probes name has images in
    ``face_tid_mid.txt``: checked before the hours of embedding, not after.

    Raises:
        ValueError: naming the protocol file, the 1-based pair or the template, and the face list.
    """
    have = np.unique(meta.templates)
    tid = _meta(meta.root, f"{meta.prefix}_face_tid_mid.txt")
    if meta.pairs.size:
        bad = np.flatnonzero(~np.isin(meta.pairs, have).all(axis=1))
        if bad.size:
            i = int(bad[0])
            absent = [int(t) for t in meta.pairs[i] if t not in set(have.tolist())]
            pairs = _meta(meta.root, f"{meta.prefix}_template_pair_label.txt")
            raise ValueError(
                f"{pairs} pair {i + 1}: template {absent[0]} has no images in {tid} "
                f"({bad.size} pairs name such templates)"
            )
    if protocol is None:
        return
    files = {name: f"{meta.prefix}_1N_gallery_{name}.csv" for name in protocol.galleries}
    lists = [(files[n], ids) for n, (ids, _) in protocol.galleries.items()]
    for name, ids in [*lists, (f"{meta.prefix}_1N_probe_mixed.csv", protocol.probes[0])]:
        missing = ids[~np.isin(ids, have)]
        if missing.size:
            raise ValueError(
                f"{_meta(meta.root, name)}: template {int(missing[0])} has no images in {tid} "
                f"({missing.size} templates without images)"
            )


class AlignedFaces(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    """Faces of a release, decoded and aligned to 112x112 (``data.align``), for a DataLoader.

    Args:
        root: release folder; images are read from ``root/loose_crop``.
        images: (N,) names under ``loose_crop/``; ``landmarks``: (N, 5, 2) float pixels.
        indices: which rows this dataset serves (a process's shard); default all.
    Items:
        ``(face (112, 112, 3) uint8 RGB tensor, row index int)``.
    Raises (on access):
        FileNotFoundError: a missing image. ValueError: an undecodable image or degenerate
            landmarks (names the image).
    """

    def __init__(
        self,
        root: str,
        images: list[str],
        landmarks: NDArray[np.floating[Any]],
        indices: NDArray[np.int64] | None = None,
    ) -> None:
        self.folder = os.path.join(root, "loose_crop")
        self.images, self.landmarks = images, landmarks
        self.indices = np.arange(len(images)) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        row = int(self.indices[i])
        path = os.path.join(self.folder, self.images[row])
        try:
            with open(path, "rb") as f:
                image = decode_image(f.read(), where=path)
            face = align_face(image, self.landmarks[row])
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such image") from None
        except ValueError as e:  # decode errors name the file already, align errors do not
            text = str(e)
            raise ValueError(text if text.startswith(path) else f"{path}: {text}") from None
        return torch.from_numpy(face), row
