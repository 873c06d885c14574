"""Face-verification metrics on image pairs (LFW, CFP-FP, AgeDB-30 style ``.bin`` sets).

Follows the protocol of insightface's ``recognition/arcface_torch/eval/verification.py`` (itself
after FaceNet's LFW evaluation, Schroff et al., CVPR 2015), written here with scikit-learn:

- embeddings come in pair order: rows ``2i`` and ``2i+1`` form pair ``i``;
- they are L2-normalized and compared by the *squared* Euclidean distance (range ``[0, 4]``), as
  insightface does; a pair is predicted "same" when ``dist < threshold``;
- accuracy is 10-fold: per fold, the threshold on the grid ``np.arange(0, 4, 0.01)`` that maximizes
  accuracy on the 9 training folds (first maximum) is applied to the held-out fold;
- the flip test sums the embeddings of an image and of its horizontal mirror before normalizing;
- XNorm is the mean L2 norm of the raw (un-normalized, un-summed) embeddings.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from sklearn.metrics import auc, roc_curve
from sklearn.model_selection import KFold

# insightface's accuracy threshold grid, in squared-distance units.
THRESHOLDS = np.arange(0.0, 4.0, 0.01)
# Folds of the accuracy cross-validation: LFW View 2's 10 (insightface's default everywhere).
NROF_FOLDS = 10


def _check_pairs(embeddings: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    emb = np.asarray(embeddings)
    same = np.asarray(issame)
    if emb.ndim != 2 or emb.shape[0] % 2:
        raise ValueError(f"embeddings must have shape (2P, D), got {emb.shape}")
    if same.ndim != 1 or same.shape[0] != emb.shape[0] // 2:
        raise ValueError(f"issame must have shape (P,) = ({emb.shape[0] // 2},), got {same.shape}")
    if not np.isfinite(emb).all():
        raise ValueError("embeddings contain NaN or Inf")
    if same.dtype != np.bool_:
        if not np.isin(same, (0, 1)).all():
            raise ValueError("issame must be boolean (or 0/1)")
        same = same.astype(bool)
    if same.all() or not same.any():
        raise ValueError("issame needs both matched and mismatched pairs")
    return emb.astype(np.float64), same


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of ``x`` (N, D) scaled to unit L2 norm; zero rows stay zero (norm floored at eps)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    out: np.ndarray = x / np.maximum(norms, eps)
    return out


def pair_distances(embeddings: np.ndarray) -> np.ndarray:
    """Squared L2 distance (P,) float64 between rows 2i and 2i+1 of L2-normalized ``embeddings``."""
    emb = l2_normalize(np.asarray(embeddings, dtype=np.float64))
    diff = emb[0::2] - emb[1::2]
    out: np.ndarray = np.sum(diff * diff, axis=1)
    return out


def kfold_accuracy(
    dist: np.ndarray,
    issame: np.ndarray,
    nrof_folds: int = NROF_FOLDS,
    thresholds: np.ndarray = THRESHOLDS,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-fold test accuracy and chosen threshold with the threshold tuned on the other folds.

    Args:
        dist: (P,) float pair distances (smaller = more alike).
        issame: (P,) bool ground truth.
        nrof_folds: number of contiguous, unshuffled folds (sklearn ``KFold``), as insightface.
        thresholds: (T,) candidate thresholds; ties keep the smallest.
    Returns:
        ``(accuracy (F,), threshold (F,))`` float64 arrays.
    Raises:
        ValueError: fewer pairs than folds.
    Warns:
        UserWarning: a test fold holds one class only. Folds are contiguous, so pairs sorted by
            class (LFW ``pairs.txt`` order: 300 matched then 300 mismatched per protocol fold)
            need ``nrof_folds`` = number of protocol folds (10 for full LFW) to stay balanced.
    """
    if nrof_folds < 2 or dist.shape[0] < nrof_folds:
        raise ValueError(f"need 2 <= nrof_folds <= num_pairs, got {nrof_folds} and {dist.shape[0]}")
    # correct[t, p]: does threshold t classify pair p right.
    correct = (dist[None, :] < thresholds[:, None]) == issame[None, :]
    accs, chosen, one_class = [], [], []
    for k, (train, test) in enumerate(KFold(n_splits=nrof_folds, shuffle=False).split(dist)):
        if issame[test].all() or not issame[test].any():
            one_class.append(k)
        best = int(np.argmax(correct[:, train].mean(axis=1)))
        chosen.append(thresholds[best])
        accs.append(correct[best, test].mean())
    if one_class:
        warnings.warn(
            f"verification: test folds {one_class} of {nrof_folds} hold one class only, so the "
            "accuracy is biased; pairs look sorted by class: set nrof_folds to the number of "
            "protocol folds (10 for LFW).",
            stacklevel=3,
        )
    return np.asarray(accs), np.asarray(chosen)


def tar_at_far(fpr: np.ndarray, tpr: np.ndarray, far_target: float) -> float:
    """True-accept rate at a false-accept rate, read off a ROC curve from ``roc_curve``.

    The ROC (kept with ``drop_intermediate=False``) is interpolated linearly and read at
    ``far_target``. Without tied scores its segments are horizontal or vertical, so this is the
    highest TPR of any threshold with ``FPR <= far_target``, i.e. a direct count; a segment made
    by tied positive/negative scores is diagonal, and the value is that of random tie-breaking.
    When ``far_target < 1 / num_negatives`` no threshold has a false accept inside the target, and
    the result is the TAR with zero false accepts (``evaluate`` reports ``far_resolution`` =
    1 / num_negatives so callers can tell); no extrapolation is made.

    Args:
        fpr, tpr: (K,) nondecreasing arrays starting at FPR 0, as ``sklearn.metrics.roc_curve``.
        far_target: target FAR in [0, 1].
    Returns:
        TAR as a float in [0, 1].
    """
    i = int(np.searchsorted(fpr, far_target, side="right")) - 1
    if i < 0:
        raise ValueError(f"ROC starts at FPR {fpr[0]} > far_target {far_target}")
    if i + 1 < len(fpr) and fpr[i] < far_target:
        w = (far_target - fpr[i]) / (fpr[i + 1] - fpr[i])
        return float(tpr[i] + w * (tpr[i + 1] - tpr[i]))
    return float(tpr[i])


def evaluate(
    embeddings: np.ndarray,
    issame: np.ndarray,
    nrof_folds: int = NROF_FOLDS,
    far_target: float = 1e-3,
    xnorm: float | None = None,
) -> dict[str, Any]:
    """Verification metrics of a pair set (insightface protocol, see the module docstring).

    Args:
        embeddings: (2P, D) float embeddings in pair order (raw or normalized; normalized here).
        issame: (P,) bool, True where pair i shows one person.
        nrof_folds: folds of the accuracy cross-validation (10 on LFW).
        far_target: FAR at which ``tar_at_far`` is read (1e-3).
        xnorm: mean raw embedding norm if known (``embed_views`` gives the per-view embeddings);
            default: mean L2 norm of the rows of ``embeddings``.
    Returns:
        dict with ``accuracy_mean``, ``accuracy_std`` (over folds, population std as insightface),
        ``best_threshold`` (mean chosen threshold, squared-distance units), ``tar_at_far``
        (on all pairs, see ``tar_at_far``), ``far_target``, ``far_resolution``
        (1 / num_negatives: the smallest nonzero FAR the set can measure), ``auc``, ``xnorm``,
        ``num_pairs`` and ``roc`` = ``{"fpr": (K,), "tpr": (K,)}`` float64 arrays.
    Raises:
        ValueError: on shape mismatches, NaN/Inf embeddings, or a set with one class only.
    """
    emb, same = _check_pairs(embeddings, issame)
    dist = pair_distances(emb)
    accs, chosen = kfold_accuracy(dist, same, nrof_folds)
    # roc_curve wants "higher = more alike", so score with the negated distance.
    fpr, tpr, _ = roc_curve(same, -dist, drop_intermediate=False)
    if xnorm is None:
        xnorm = float(np.linalg.norm(emb, axis=1).mean())
    return {
        "accuracy_mean": float(accs.mean()),
        "accuracy_std": float(accs.std()),
        "best_threshold": float(chosen.mean()),
        "tar_at_far": tar_at_far(fpr, tpr, far_target),
        "far_target": float(far_target),
        "far_resolution": 1.0 / float((~same).sum()),
        "auc": float(auc(fpr, tpr)),
        "xnorm": float(xnorm),
        "num_pairs": int(same.shape[0]),
        "roc": {"fpr": fpr, "tpr": tpr},
    }


def evaluate_views(
    plain: np.ndarray, flipped: np.ndarray, issame: np.ndarray, **kwargs: Any
) -> dict[str, Any]:
    """``evaluate`` on the flip-test sum, with insightface's XNorm (mean norm over both views)."""
    xnorm = float(np.linalg.norm(np.concatenate([plain, flipped]), axis=1).mean())
    return evaluate(plain + flipped, issame, xnorm=xnorm, **kwargs)


def format_results(name: str, step: int | None, res: dict[str, Any]) -> list[str]:
    """insightface-style log lines, e.g. ``[lfw][2000]Accuracy-Flip: 0.99500+-0.00300``."""
    tag = f"[{name}]" if step is None else f"[{name}][{step}]"
    far = f"{res['far_target']:.0e}".replace("e-0", "e-")
    return [
        f"{tag}XNorm: {res['xnorm']:f}",
        f"{tag}Accuracy-Flip: {res['accuracy_mean']:1.5f}+-{res['accuracy_std']:1.5f}",
        f"{tag}TAR@FAR={far}: {res['tar_at_far']:1.5f}",
    ]


def plot_roc(results: dict[str, dict[str, Any]], path_png: str, title: str = "ROC") -> str:
    """Save the ROC curves of several targets to a PNG (log-scale FAR axis).

    Args:
        results: target name -> ``evaluate`` dict (uses ``roc``, ``auc`` and, when present,
            ``accuracy_mean``); IJB results pass ``{"roc": ..., "auc": ...}`` only.
        path_png: output file; its folder must exist.
    Returns:
        ``path_png``.
    Raises:
        ValueError: empty ``results`` or an entry without ``roc``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        raise ValueError("plot_roc: no results to plot")
    fig, ax = plt.subplots(figsize=(6, 5))
    try:
        for name, res in results.items():
            if "roc" not in res:
                raise ValueError(f"plot_roc: results[{name!r}] has no 'roc' entry")
            fpr, tpr = np.asarray(res["roc"]["fpr"]), np.asarray(res["roc"]["tpr"])
            keep = fpr > 0  # a log axis cannot show FAR = 0
            acc = f"acc {res['accuracy_mean']:.4f}, " if "accuracy_mean" in res else ""
            label = f"{name} ({acc}AUC {res['auc']:.4f})"
            ax.plot(fpr[keep], tpr[keep], label=label)
        ax.set_xscale("log")
        ax.set_xlabel("False accept rate")
        ax.set_ylabel("True accept rate")
        ax.set_ylim(0.0, 1.01)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(title)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(path_png, dpi=100)
    finally:
        plt.close(fig)
    return path_png
