"""Sub-center ArcFace's second stage: find each class's dominant sub-center, drop the far samples.

    python tools/clean_subcenters.py CHECKPOINT --rec SRC --out OUT_DIR [--threshold-deg 75]
        [--batch-size 64] [--threads 8] [--no-progress]

Reference: Deng et al., "Sub-center ArcFace: Boosting Face Recognition by Large-scale Noisy Web
Faces", ECCV 2020, Sec. 3: once a model trained with K sub-centers per class is discriminative,
each class's dominant sub-center is the one most of its samples are nearest to; samples whose
angle to their class's dominant sub-center exceeds a fixed threshold (75 degrees in the paper) are
dropped as label noise, the non-dominant sub-centers with them, and a model is trained again
with one center per class (``head.num_subcenters: 1``) on the cleaned data.

CHECKPOINT is a run directory (its latest checkpoint) or a step directory of a sub-center run:
the backbone embeds every image of SRC (a ``train.rec`` with its ``.idx``, or their folder; the
image only, no flip, as the head saw it) and the head's saved centers (``head/shard_*.pt``, read
memory-mapped) give each image's cosine to the K sub-centers of its class.

OUT_DIR receives:
  - ``train.rec``/``train.idx`` (+ ``property``, ``train.lst`` when SRC has them): the kept
    images, records copied byte for byte in their original order, labels unchanged (classes
    left without images keep their id; ``property`` still counts them);
  - ``dropped.tsv``: ``key<TAB>label<TAB>angle_deg`` of every dropped image (its key in SRC);
  - ``dominant.npy``: (C,) int64, each class's dominant sub-center (-1 for a class without
    images), to initialize a one-center head from the old one if wanted;
  - ``clean_report.json``: counts (images, kept, dropped, classes emptied, images whose nearest
    sub-center is not the dominant one) and the settings;
  - ``angles.png``: histogram of the angle to the dominant sub-center, with the threshold.
All are written atomically; nothing is skipped silently (a corrupt record is an error naming it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from data.atomic import atomic_path, write_text_atomic
from data.datasets import RecordDataset
from data.face_jpeg import progress_bar
from data.image_index import image_index_of
from data.rec_copy import check_output_folder, copy_records, source_paths
from data.recordio import RecordIOReader
from heads.checkpoint import SavedCenters, centers_of, open_centers

__all__ = ["CleanSummary", "nearest_subcenters", "choose_kept", "clean", "main"]

PAPER_THRESHOLD_DEG = 75.0


@dataclass
class CleanSummary:
    """What ``clean`` found and wrote (also ``clean_report.json``)."""

    checkpoint: str
    rec: str
    out_dir: str
    threshold_deg: float
    num_classes: int
    num_subcenters: int
    images: int
    kept: int
    dropped: int
    classes_with_images: int
    classes_emptied: int
    non_dominant: int  # images whose nearest sub-center is not their class's dominant one
    seconds: float

    def line(self) -> str:
        """One human-readable line."""
        return (
            f"kept {self.kept} of {self.images} images ({self.dropped} dropped at > "
            f"{self.threshold_deg:g} deg from the dominant sub-center, {self.non_dominant} nearest "
            f"to a non-dominant one; {self.classes_emptied} of {self.classes_with_images} classes "
            f"emptied) into {self.out_dir} in {self.seconds:.1f} s"
        )


def nearest_subcenters(
    embeddings: torch.Tensor, labels: torch.Tensor, centers: SavedCenters
) -> torch.Tensor:
    """Cosines of each embedding to the K sub-centers of its own class.

    Args:
        embeddings: (B, D) float embeddings (any norm). labels: (B,) int64 class ids.
        centers: the saved head (``heads.checkpoint.open_centers``).

    Returns:
        (B, K) float32 cosines (Eq. 2 of Sub-center ArcFace before the max).

    Raises:
        ValueError: a label outside the head's classes, or D differs from the head's.
    """
    if embeddings.shape[1] != centers.embedding_size:
        raise ValueError(
            f"embeddings are {embeddings.shape[1]}-d but the head's centers are "
            f"{centers.embedding_size}-d"
        )
    x = torch.nn.functional.normalize(embeddings.float(), dim=1)
    w = torch.nn.functional.normalize(centers_of(centers, labels), dim=2)  # (B, K, D)
    return torch.einsum("bd,bkd->bk", x, w)


def choose_kept(
    cosines: np.ndarray, labels: np.ndarray, num_classes: int, threshold_deg: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The paper's rule: the dominant sub-center of a class is the one most of its images are
    nearest to (ties: the lowest index); an image is kept when its angle to that sub-center is
    at most ``threshold_deg``.

    Args:
        cosines: (N, K) float32 cosines to the sub-centers of each image's class.
        labels: (N,) int64 class ids in ``[0, num_classes)``.
        threshold_deg: angle in degrees, in (0, 180].

    Returns:
        ``(keep, angle_deg, dominant)``: (N,) bool, (N,) float64 angle to the dominant
        sub-center in degrees, (C,) int64 dominant sub-center (-1 for a class without images).
    """
    n, k = cosines.shape
    nearest = cosines.argmax(axis=1)
    votes = np.bincount(labels * k + nearest, minlength=num_classes * k).reshape(num_classes, k)
    dominant = np.where(votes.sum(axis=1) > 0, votes.argmax(axis=1), -1)
    cos_dom = cosines[np.arange(n), dominant[labels]].astype(np.float64)
    angle = np.degrees(np.arccos(np.clip(cos_dom, -1.0, 1.0)))
    return angle <= threshold_deg, angle, dominant


def _plot_angles(angle: np.ndarray, threshold_deg: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    try:
        ax.hist(angle, bins=90, range=(0, 180), color="tab:blue")
        ax.axvline(threshold_deg, color="tab:red", label=f"threshold {threshold_deg:g} deg")
        ax.set_yscale("log")
        ax.set_xlabel("angle to the class's dominant sub-center (deg)")
        ax.set_ylabel("images")
        ax.legend()
        fig.tight_layout()
        with atomic_path(path) as tmp:  # keeps the .png extension matplotlib reads
            fig.savefig(tmp)
    finally:
        plt.close(fig)


def _step_dir(checkpoint: str) -> str:
    from models.weights import resolve_checkpoint

    weights, _ = resolve_checkpoint(checkpoint)
    return str(weights.parent)


def _subcenter_cosines(
    step: str, data: RecordDataset, centers: SavedCenters, batch_size: int, progress: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The embedding pass: (N, K) float32 cosines of every image to its class's K sub-centers,
    and the (N,) int64 labels, in dataset order."""
    from evaluation.embedders import embed_images, load_embedder

    embedder = load_embedder(step, batch_size=batch_size)
    n = len(data)
    cosines = np.empty((n, centers.num_subcenters), dtype=np.float32)
    labels = np.empty(n, dtype=np.int64)
    with progress_bar(progress) as bar:
        task = bar.add_task("embedding", total=n)
        for start in range(0, n, batch_size):
            items = [data[i] for i in range(start, min(n, start + batch_size))]
            images = np.stack([img for img, _ in items])
            y = torch.tensor([label for _, label in items], dtype=torch.int64)
            emb = torch.from_numpy(embed_images(embedder, images, flip=False))
            cosines[start : start + len(items)] = nearest_subcenters(emb, y, centers).numpy()
            labels[start : start + len(items)] = y.numpy()
            bar.advance(task, len(items))
    return cosines, labels


def clean(
    checkpoint: str,
    src: str,
    out_dir: str,
    threshold_deg: float = PAPER_THRESHOLD_DEG,
    batch_size: int = 64,
    threads: int = 8,
    progress: bool = True,
) -> CleanSummary:
    """Embed every image of ``src``, pick the dominant sub-centers, write the kept images.

    Args:
        checkpoint: run or step directory holding ``backbone.pt``, ``meta.json`` and ``head/``.
        src: ``train.rec`` (``.idx`` beside it) or its folder; out_dir: output folder.
        threshold_deg: largest kept angle to the dominant sub-center, degrees (paper: 75).
        batch_size: images per backbone call; threads: record reader threads of the copy.
        progress: rich progress bars (count, ETA).

    Returns:
        CleanSummary (also written to ``out_dir/clean_report.json``).

    Raises:
        FileNotFoundError: a missing checkpoint, head folder, ``.rec`` or ``.idx``.
        ValueError: a bad threshold, data whose classes or labels do not fit the head, the
            output folder is the source folder, a corrupt record (named), unloadable weights.
    """
    if not 0.0 < threshold_deg <= 180.0:
        raise ValueError(f"--threshold-deg must be in (0, 180], got {threshold_deg}")
    t0 = time.perf_counter()
    step = _step_dir(checkpoint)
    centers = open_centers(step)
    rec, idx = source_paths(src)
    check_output_folder(rec, out_dir)  # before the embedding pass, not after it
    reader = RecordIOReader(rec, idx)
    index = image_index_of(reader, rec)
    data = RecordDataset(rec, idx, index=index)
    if data.num_classes != centers.num_classes:
        raise ValueError(
            f"{rec}: {data.num_classes} classes, but the head of {step} has {centers.num_classes}"
        )
    cosines, labels = _subcenter_cosines(step, data, centers, batch_size, progress)
    n, k = len(data), centers.num_subcenters
    keep, angle, dominant = choose_kept(cosines, labels, centers.num_classes, threshold_deg)
    copy_records(rec, reader, index, out_dir, np.nonzero(keep)[0], threads, progress, "writing")
    keys = np.asarray(index.keys)
    lines = [f"{keys[i]}\t{labels[i]}\t{angle[i]:.3f}\n" for i in np.nonzero(~keep)[0]]
    write_text_atomic(os.path.join(out_dir, "dropped.tsv"), "".join(lines))
    with atomic_path(os.path.join(out_dir, "dominant.npy")) as tmp, open(tmp, "wb") as f:
        np.save(f, dominant)
    _plot_angles(angle, threshold_deg, os.path.join(out_dir, "angles.png"))
    with_images = np.bincount(labels, minlength=centers.num_classes) > 0
    kept_classes = np.bincount(labels[keep], minlength=centers.num_classes) > 0
    summary = CleanSummary(
        checkpoint=checkpoint,
        rec=rec,
        out_dir=out_dir,
        threshold_deg=float(threshold_deg),
        num_classes=centers.num_classes,
        num_subcenters=k,
        images=n,
        kept=int(keep.sum()),
        dropped=int(n - keep.sum()),
        classes_with_images=int(with_images.sum()),
        classes_emptied=int((with_images & ~kept_classes).sum()),
        non_dominant=int((cosines.argmax(axis=1) != dominant[labels]).sum()),
        seconds=time.perf_counter() - t0,
    )
    report = json.dumps(asdict(summary), indent=2) + "\n"
    write_text_atomic(os.path.join(out_dir, "clean_report.json"), report)
    return summary


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="run or step directory of a sub-center run")
    p.add_argument("--rec", required=True, help="train.rec (with train.idx beside it) or folder")
    p.add_argument("--out", required=True, help="output folder for the cleaned train.rec/.idx")
    p.add_argument(
        "--threshold-deg",
        type=float,
        default=PAPER_THRESHOLD_DEG,
        help="largest kept angle to the dominant sub-center, degrees (default 75, the paper's)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per backbone call")
    p.add_argument("--threads", type=int, default=8, help="record reader threads of the copy")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 1 bad input, 2 usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.threads < 1:
        parser.error("--batch-size and --threads must be >= 1")
    try:
        summary = clean(
            args.checkpoint, args.rec, args.out, args.threshold_deg, args.batch_size,
            args.threads, not args.no_progress,
        )  # fmt: skip
    except (OSError, ValueError) as e:
        print(f"clean_subcenters: error: {e}", file=sys.stderr)
        return 1
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
