"""Test helper: a small synthetic IJB-C release in the exact layout of the real one.

Real LFW face crops are pasted into larger "loose crop" images at known similarity transforms, so
the landmarks written to ``meta/ijbc_name_5pts_score.txt`` are exact. Six subjects; each has a
gallery template (one photo + one 3-frame "video" media: the same face at three poses) and a
probe template (two photos). G1 enrolls subjects 0-2, G2 subjects 3-5 (disjoint, as in IJB-C),
so every probe is mated in one gallery and non-mated in the other. 1:1 pairs: all template pairs.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field

import cv2
import numpy as np

from tests.helpers.synthetic_faces import lfw_crop, paste_face, similarity

NUM_SUBJECTS = 6
CANVAS_HW = (250, 270)  # holds a 1.5x face rotated by 30 degrees
CSV_HEADER = (
    "TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID,FRAME,FACE_X,FACE_Y,FACE_WIDTH,FACE_HEIGHT"
)


@dataclass
class Truth:
    """What the release holds, row by row in the order of the meta files."""

    images: list[str] = field(default_factory=list)
    crops: list[np.ndarray] = field(default_factory=list)  # (112, 112, 3) uint8 pasted face
    landmarks: list[np.ndarray] = field(default_factory=list)  # (5, 2)
    scores: list[float] = field(default_factory=list)
    templates: list[int] = field(default_factory=list)
    medias: list[int] = field(default_factory=list)
    subject_of: dict[int, int] = field(default_factory=dict)  # template -> subject
    pairs: list[tuple[int, int, int]] = field(default_factory=list)
    galleries: dict[str, list[int]] = field(default_factory=dict)  # name -> templates
    probes: list[int] = field(default_factory=list)


def lfw_people(lfw_root: str, count: int, min_images: int = 4) -> list[str]:
    """The first ``count`` people (sorted) with at least ``min_images`` LFW images."""
    folder = os.path.join(lfw_root, "lfw-deepfunneled")
    people = []
    for name in sorted(os.listdir(folder)):
        if len(os.listdir(os.path.join(folder, name))) >= min_images:
            people.append(name)
            if len(people) == count:
                break
    return people


def _write_jpeg(path: str, rgb: np.ndarray) -> None:
    ok, buf = cv2.imencode(
        ".jpg", np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 95]
    )
    assert ok
    with open(path, "wb") as f:
        f.write(buf.tobytes())


def build_release(lfw_root: str, root: str, seed: int = 0) -> Truth:
    """Write ``root/loose_crop`` and ``root/meta`` (IJB-C names) and return the truth."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "loose_crop"))
    os.makedirs(os.path.join(root, "meta"))
    truth = Truth()
    media = itertools.count(1000)

    def add(template: int, media_id: int, crop: np.ndarray) -> None:
        scale, angle = rng.uniform(1.0, 1.5), rng.uniform(-30, 30)
        paste = similarity(scale, angle, 0.0, 0.0)
        # Translate so the face centre lands near the canvas centre (never cut off).
        centre = np.array([CANVAS_HW[1] / 2, CANVAS_HW[0] / 2]) + rng.uniform(-5, 5, 2)
        paste[:, 2] = centre - paste[:, :2] @ np.array([55.5, 55.5])
        canvas, landmarks = paste_face(crop, paste, CANVAS_HW)
        name = f"{len(truth.images) + 1}.jpg"
        _write_jpeg(os.path.join(root, "loose_crop", name), canvas)
        truth.images.append(name)
        truth.crops.append(crop)
        truth.landmarks.append(landmarks)
        truth.scores.append(float(np.round(rng.uniform(0.5, 1.0), 4)))
        truth.templates.append(template)
        truth.medias.append(media_id)

    for s, person in enumerate(lfw_people(lfw_root, NUM_SUBJECTS)):
        crops = [lfw_crop(lfw_root, person, i) for i in (1, 2, 3, 4)]
        gallery, probe = 100 + s, 200 + s
        truth.subject_of.update({gallery: s, probe: s})
        add(gallery, next(media), crops[0])
        video = next(media)
        for _ in range(3):  # video-like repeats: one media, three frames
            add(gallery, video, crops[1])
        add(probe, next(media), crops[2])
        add(probe, next(media), crops[3])
    ids = sorted(truth.subject_of)
    truth.pairs = [
        (a, b, int(truth.subject_of[a] == truth.subject_of[b]))
        for a, b in itertools.combinations(ids, 2)
    ]
    truth.galleries = {"G1": [100, 101, 102], "G2": [103, 104, 105]}
    truth.probes = [200 + s for s in range(NUM_SUBJECTS)]
    _write_meta(root, truth)
    return truth


def _write_meta(root: str, truth: Truth) -> None:
    meta = os.path.join(root, "meta")
    with open(os.path.join(meta, "ijbc_name_5pts_score.txt"), "w") as f:
        for name, lmk, score in zip(truth.images, truth.landmarks, truth.scores):
            f.write(" ".join([name, *(f"{v:.4f}" for v in lmk.reshape(-1)), str(score)]) + "\n")
    with open(os.path.join(meta, "ijbc_face_tid_mid.txt"), "w") as f:
        for name, t, m in zip(truth.images, truth.templates, truth.medias):
            f.write(f"{name} {t} {m}\n")
    with open(os.path.join(meta, "ijbc_template_pair_label.txt"), "w") as f:
        f.writelines(f"{a} {b} {label}\n" for a, b, label in truth.pairs)
    sets = {
        **{f"gallery_{g}": ts for g, ts in truth.galleries.items()},
        "probe_mixed": truth.probes,
    }
    for set_name, templates in sets.items():
        rows = [CSV_HEADER]
        for t in templates:
            for name, row_t, m in zip(truth.images, truth.templates, truth.medias):
                if row_t == t:
                    rows.append(f"{t},{truth.subject_of[t]},img/{name},{m},,0,0,112,112")
        with open(os.path.join(meta, f"ijbc_1N_{set_name}.csv"), "w") as f:
            f.write("\n".join(rows) + "\n")


def pool_brute_force(feats, templates, medias, scores):
    """arcface_torch's image2template_feature, loop by loop: {template: unit pooled feature}."""
    out = {}
    for t in sorted(set(templates)):
        media_feats = []
        for m in sorted({m for tt, m in zip(templates, medias) if tt == t}):
            rows = [i for i in range(len(feats)) if templates[i] == t and medias[i] == m]
            media_feats.append(np.mean([feats[i] * scores[i] for i in rows], axis=0))
        total = np.sum(media_feats, axis=0)
        out[t] = total / np.linalg.norm(total)
    return out
