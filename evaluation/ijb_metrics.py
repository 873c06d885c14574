"""IJB-B / IJB-C scoring: template pooling, 1:1 verification (TAR@FAR) and 1:N identification.

1:1 follows arcface_torch's ``eval_ijbc.py`` (Deng et al., ArcFace, CVPR 2019; insightface):

- image features (flip-summed by the caller) are *not* normalized per image, are multiplied by
  the face detector score, averaged over the images of one media (video frames), summed over the
  media of a template and L2-normalized (``pool_templates``);
- a pair's score is the dot product of its two template features (``score_pairs``, in chunks
  of 8192 pairs: IJB-C has 15.7M, IJB-B 8.0M);
- TAR at FAR targets 1e-6 ... 1e-1 is read by two rules (``tar_at_far``): ``nearest`` (the rule of
  arcface_torch's published tables: the TPR of the ``sklearn.metrics.roc_curve`` point whose FPR is
  nearest the target) and ``strict`` (the highest TPR of any threshold with FPR <= target).

1:N follows the IJB-C open-set protocol (Maze et al., "IARPA Janus Benchmark-C", ICB 2018): per
gallery (G1, G2; IJB-B S1, S2) the mixed probes whose subject is enrolled are *mated*, the others
*non-mated*; rank-k is the fraction of mated probes whose gallery template ranks within the top k;
TPIR at FPIR f is the fraction of mated probes found at rank 1 with a score above the threshold
that at most a fraction f of non-mated probes exceed with their best score. Both galleries'
values are averaged (``identification``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sklearn.metrics import roc_curve

__all__ = [
    "FAR_TARGETS",
    "RULES",
    "pool_templates",
    "score_pairs",
    "tar_at_far",
    "identify_gallery",
    "identification",
]

FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
RULES = ("nearest", "strict")
CHUNK_PAIRS = 8192  # 2 x 8192 x 512 float32 rows = 32 MB a chunk: 3x faster here than 100k


def pool_templates(
    features: NDArray[np.floating[Any]],
    templates: NDArray[np.int64],
    medias: NDArray[np.int64],
    face_scores: NDArray[np.floating[Any]] | None = None,
    normalize_images: bool = False,
) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    """Template features: detector-score weighting, media averaging, template sum, L2 norm.

    Args:
        features: (N, D) float image features (flip-summed or not, as the caller chose).
        templates, medias: (N,) int template and media id of each image.
        face_scores: (N,) detector scores to multiply each image by (None: no weighting).
        normalize_images: L2-normalize each image feature first (arcface_torch default: no).
    Returns:
        (template ids (T,) int64 sorted ascending, features (T, D) float32 L2-normalized).
    Raises:
        ValueError: mismatched lengths or non-finite features.
    """
    feats = np.asarray(features, dtype=np.float64)
    n = feats.shape[0]
    if feats.ndim != 2 or templates.shape != (n,) or medias.shape != (n,):
        raise ValueError(
            f"features (N, D), templates (N,), medias (N,) expected, got {feats.shape}, "
            f"{templates.shape}, {medias.shape}"
        )
    if not np.isfinite(feats).all():
        raise ValueError("image features contain NaN or Inf")
    if normalize_images:
        feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    if face_scores is not None:
        if face_scores.shape != (n,):
            raise ValueError(f"face_scores must have shape ({n},), got {face_scores.shape}")
        feats = feats * np.asarray(face_scores, dtype=np.float64)[:, None]
    ids, template_of = np.unique(templates, return_inverse=True)
    # Media of one template: mean of its images; template: sum of its media.
    _, media_of, media_count = np.unique(
        np.stack([template_of, medias]), axis=1, return_inverse=True, return_counts=True
    )
    media_of = media_of.reshape(-1)
    media_sum = np.zeros((media_count.shape[0], feats.shape[1]))
    np.add.at(media_sum, media_of, feats)
    media_template = np.zeros(media_count.shape[0], np.int64)
    media_template[media_of] = template_of
    pooled = np.zeros((ids.shape[0], feats.shape[1]))
    np.add.at(pooled, media_template, media_sum / media_count[:, None])
    pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
    return ids.astype(np.int64), pooled.astype(np.float32)


def _rows_of(ids: NDArray[np.int64], wanted: NDArray[np.int64], what: str) -> NDArray[np.int64]:
    rows = np.searchsorted(ids, wanted)
    rows = np.minimum(rows, ids.shape[0] - 1)
    missing = ids[rows] != wanted
    if missing.any():
        example = int(wanted[missing][0])
        raise ValueError(f"{what}: {int(missing.sum())} templates without images, e.g. {example}")
    out: NDArray[np.int64] = rows.astype(np.int64)
    return out


def score_pairs(
    template_ids: NDArray[np.int64],
    template_feats: NDArray[np.float32],
    pairs: NDArray[np.int64],
    chunk: int = CHUNK_PAIRS,
) -> NDArray[np.float32]:
    """Cosine score of each template pair: dot product of the (normalized) template features.

    Args:
        template_ids: (T,) int64 sorted ascending (``pool_templates``'s); template_feats (T, D).
        pairs: (P, 2) int64 template ids.
        chunk: pairs scored at once (bounds the memory of the gathered rows).
    Returns:
        (P,) float32 scores in [-1, 1].
    Raises:
        ValueError: a pair names a template without images.
    """
    out = np.empty(pairs.shape[0], np.float32)
    for start in range(0, pairs.shape[0], chunk):
        part = pairs[start : start + chunk]
        a = template_feats[_rows_of(template_ids, part[:, 0], "template pairs")]
        b = template_feats[_rows_of(template_ids, part[:, 1], "template pairs")]
        out[start : start + part.shape[0]] = np.einsum("ij,ij->i", a, b)
    return out


def tar_at_far(
    labels: NDArray[np.bool_],
    scores: NDArray[np.floating[Any]],
    fars: Sequence[float] = FAR_TARGETS,
) -> dict[str, dict[str, float]]:
    """TAR at each FAR target, by both rules (see the module docstring).

    ``nearest`` reproduces arcface_torch's table code exactly: ``roc_curve`` with its default
    ``drop_intermediate=True``, points taken in decreasing-FPR order, the first point of minimal
    ``|fpr - far|`` wins (so between two equally near points the higher FPR, and among points of
    one FPR the highest TPR). ``strict``: ``roc_curve(drop_intermediate=False)``, the highest TPR
    with FPR <= far (0 when no threshold reaches it).

    Args:
        labels: (P,) bool, True = genuine pair. scores: (P,) float, higher = more alike.
        fars: FAR targets in (0, 1).
    Returns:
        ``{"nearest": {"1e-04": tar, ...}, "strict": {...}}`` with TAR in [0, 1].
    Raises:
        ValueError: labels with one class only.
    """
    labels = np.asarray(labels, dtype=bool)
    if labels.all() or not labels.any():
        raise ValueError("pair labels need both genuine (1) and impostor (0) pairs")
    fpr, tpr, _ = roc_curve(labels, scores)
    fpr_desc, tpr_desc = fpr[::-1], tpr[::-1]
    fpr_all, tpr_all, _ = roc_curve(labels, scores, drop_intermediate=False)
    out: dict[str, dict[str, float]] = {rule: {} for rule in RULES}
    for far in fars:
        key = far_key(far)
        out["nearest"][key] = float(tpr_desc[int(np.argmin(np.abs(fpr_desc - far)))])
        within = fpr_all <= far
        out["strict"][key] = float(tpr_all[within].max()) if within.any() else 0.0
    return out


def far_key(far: float) -> str:
    """``1e-4`` -> ``"1e-04"``: the key of a FAR target in results."""
    return f"{far:.0e}"


def identify_gallery(
    probe_feats: NDArray[np.float32],
    probe_subjects: NDArray[np.int64],
    gallery_feats: NDArray[np.float32],
    gallery_subjects: NDArray[np.int64],
    ranks: Sequence[int] = (1, 5, 10),
    fpirs: Sequence[float] = (0.01, 0.1),
) -> dict[str, Any]:
    """Open-set identification of probe templates against one gallery (one template per subject).

    A probe's rank is 1 + the number of gallery templates scoring strictly higher than its mated
    one. With ``k = floor(fpir * num_nonmated)`` the threshold ``t`` is the ``(k+1)``-th largest
    best score of the non-mated probes (so at most ``k`` of them exceed it; ``-inf`` when ``k`` is
    all of them), and TPIR is the fraction of mated probes at rank 1 with a score above ``t``.

    Args:
        probe_feats: (Q, D) L2-normalized; probe_subjects (Q,). gallery_feats: (G, D)
            L2-normalized; gallery_subjects: (G,) distinct.
    Returns:
        dict ``rank`` {"1": ...}, ``tpir`` {"1e-02": ...} (None without non-mated probes),
        ``num_mated``, ``num_nonmated``.
    Raises:
        ValueError: a subject enrolled twice in the gallery, or no mated probe.
    """
    uniq, counts = np.unique(gallery_subjects, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"gallery subject {int(uniq[counts > 1][0])} has several templates")
    sim = probe_feats.astype(np.float64) @ gallery_feats.astype(np.float64).T  # (Q, G)
    order = np.argsort(gallery_subjects)
    pos = np.searchsorted(gallery_subjects[order], probe_subjects)
    pos = np.minimum(pos, gallery_subjects.shape[0] - 1)
    mated = gallery_subjects[order][pos] == probe_subjects
    if not mated.any():
        raise ValueError("no probe subject is enrolled in the gallery")
    mated_col = order[pos[mated]]
    mated_score = sim[mated][np.arange(mated_col.shape[0]), mated_col]
    rank = 1 + (sim[mated] > mated_score[:, None]).sum(axis=1)
    nonmated_best = sim[~mated].max(axis=1) if (~mated).any() else np.zeros(0)
    result: dict[str, Any] = {
        "rank": {str(k): float((rank <= k).mean()) for k in ranks},
        "tpir": {},
        "num_mated": int(mated.sum()),
        "num_nonmated": int((~mated).sum()),
    }
    desc = np.sort(nonmated_best)[::-1]
    for fpir in fpirs:
        if desc.shape[0] == 0:
            result["tpir"][far_key(fpir)] = None
            continue
        k = int(np.floor(fpir * desc.shape[0]))
        t = desc[k] if k < desc.shape[0] else -np.inf
        result["tpir"][far_key(fpir)] = float(((rank == 1) & (mated_score > t)).mean())
    return result


def identification(
    template_ids: NDArray[np.int64],
    template_feats: NDArray[np.float32],
    galleries: dict[str, tuple[NDArray[np.int64], NDArray[np.int64]]],
    probes: tuple[NDArray[np.int64], NDArray[np.int64]],
    ranks: Sequence[int] = (1, 5, 10),
    fpirs: Sequence[float] = (0.01, 0.1),
) -> dict[str, Any]:
    """1:N metrics per gallery and their mean over the galleries (``identify_gallery``).

    Args:
        template_ids, template_feats: ``pool_templates``'s output.
        galleries: name -> (template ids, subject ids); probes: (template ids, subject ids).
    Returns:
        ``{"galleries": {name: metrics}, "mean": {"rank": ..., "tpir": ...}}``.
    Raises:
        ValueError: a gallery or probe template without images (see ``identify_gallery``).
    """
    p_ids, p_subjects = probes
    p_feats = template_feats[_rows_of(template_ids, p_ids, "1:N probes")]
    per: dict[str, dict[str, Any]] = {}
    for name, (g_ids, g_subjects) in galleries.items():
        g_feats = template_feats[_rows_of(template_ids, g_ids, f"1:N gallery {name}")]
        per[name] = identify_gallery(p_feats, p_subjects, g_feats, g_subjects, ranks, fpirs)
    mean: dict[str, dict[str, float | None]] = {"rank": {}, "tpir": {}}
    for kind in ("rank", "tpir"):
        for key in next(iter(per.values()))[kind]:
            values = [m[kind][key] for m in per.values()]
            mean[kind][key] = None if None in values else float(np.mean(values))
    return {"galleries": per, "mean": mean}
