"""IJB-B / IJB-C evaluation: 1:1 verification (TAR@FAR) and 1:N identification, as arcface_torch.

    python tools/eval_ijb.py --model work_dirs/run --release IJB_release/IJBC --out eval_ijbc
    python tools/eval_ijb.py --model backbone.onnx --release IJB_release/IJBB --batch-size 256
    python tools/eval_ijb.py --model backbone.pth --network r100 --release IJB_release/IJBC
    accelerate launch --num_processes 8 tools/eval_ijb.py --model ... --release ...  # sharded
    python tools/eval_ijb.py --image-features eval_ijbc/image_features.npy --release ... \\
        --no-detector-score                                      # re-score without re-embedding

Faces are decoded and aligned (5-point similarity to the ArcFace template, ``data.align``) in
DataLoader workers, embedded with their horizontal mirror (``evaluation.embedders``) and, under
``accelerate launch``/``torchrun``, sharded over the processes and gathered on rank 0, which pools
templates and scores (``evaluation.ijb_metrics``; protocol in docs/eval.md). Writes to ``--out``:
``results.json``, ``roc.png``, ``image_features.npy`` (N, D) float32 (flip-summed unless
``--no-flip``, before score weighting), ``template_features.npz`` (``ids``, ``features``),
``scores.npy`` (P,) float32 and ``labels.npy`` (P,) bool. Bad input: one line
``eval_ijb: error: ...`` naming the file (and line), exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np
import torch

from data.atomic import atomic_path, make_writable_folder, write_text_atomic
from data.ijb import AlignedFaces, IJBMeta, IJBProtocol1N, check_templates, load_1n, load_meta
from evaluation.embedders import Embedder, check_input_size, embed_batch, load_embedder
from evaluation.ijb_metrics import (
    FAR_TARGETS,
    RULES,
    far_key,
    identification,
    pool_templates,
    score_pairs,
    tar_at_far,
)
from evaluation.sharded import embed_sharded
from evaluation.verification import plot_roc

_PROG = "eval_ijb"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tools/eval_ijb.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--release", required=True, help="IJB release folder (IJB_release/IJBC|IJBB)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="backbone.onnx, backbone.pt/.pth, step dir or run dir")
    src.add_argument("--image-features", help="image_features.npy of an earlier run: no embedding")
    p.add_argument("--network", default=None, help="backbone name for a bare .pth (r50, r100...)")
    p.add_argument("--out", default="work_dirs/eval_ijb", help="output folder")
    p.add_argument("--batch-size", type=int, default=128, help="faces per forward (x2 with flip)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decoders")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-flip", action="store_true", help="embed the image only (no mirror sum)")
    p.add_argument("--no-detector-score", action="store_true", help="no face score weighting")
    p.add_argument(
        "--normalize-images", action="store_true", help="L2-normalize each image feature first"
    )
    p.add_argument("--no-1n", action="store_true", help="skip 1:N identification")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.workers < 0:
        _fail(
            f"--batch-size must be >= 1 and --workers >= 0, got {args.batch_size}, {args.workers}"
        )
    return args


def _fail(message: str) -> None:
    print(f"{_PROG}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def dist_context(device: str) -> tuple[int, int, str]:
    """(rank, world size, device) of this process; joins the process group that
    ``accelerate launch``/``torchrun`` describe in the environment (WORLD_SIZE > 1)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not dist.is_initialized():
        return 0, 1, device
    if not dist.is_initialized():
        cuda = device.startswith("cuda") and torch.cuda.is_available()
        dist.init_process_group("nccl" if cuda else "gloo")
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    return dist.get_rank(), dist.get_world_size(), device


def _progress(enabled: bool) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    cols = (
        "{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    )
    return Progress(*cols, disable=not enabled)


def embed_release(
    embedder: Embedder,
    meta: IJBMeta,
    flip: bool = True,
    workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> np.ndarray:
    """Image features (N, D) float32 of every face, in meta order, on every rank.

    Rank r embeds its contiguous share (decoded and aligned by ``workers`` DataLoader
    processes); ``evaluation.sharded.embed_sharded`` pads and all-gathers the shares.

    Raises:
        FileNotFoundError / ValueError: a missing or undecodable image, degenerate landmarks.
    """
    from data.decode import normalize

    def embed_rows(start: int, stop: int, per: int) -> np.ndarray:
        faces = AlignedFaces(meta.root, meta.images, meta.landmarks, np.arange(start, stop))
        loader = torch.utils.data.DataLoader(
            faces, batch_size=embedder.batch_size, num_workers=workers, shuffle=False
        )
        chunks: list[np.ndarray] = []
        t0 = time.perf_counter()
        with _progress(progress and rank == 0) as bar:
            task = bar.add_task(
                f"embed {meta.prefix} (rank 0 of {world_size})", total=len(faces), rate=""
            )
            done = 0
            for images, _ in loader:
                x = normalize(images)
                assert isinstance(x, torch.Tensor)
                chunks.append(embed_batch(embedder, x, flip).numpy())
                done += images.shape[0]
                rate = done / max(time.perf_counter() - t0, 1e-9)
                bar.update(task, advance=images.shape[0], rate=f"{rate:.0f} img/s")
        return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)

    return embed_sharded(len(meta.images), embed_rows, rank, world_size)


def score_release(
    meta: IJBMeta,
    image_feats: np.ndarray,
    args: argparse.Namespace,
    protocol: IJBProtocol1N | None = None,
) -> dict[str, Any]:
    """Pool, score 1:1 and (unless --no-1n) 1:N; writes the output files (image_features.npy
    is written by `_run` as soon as the features exist); returns results. `protocol`: the 1:N
    protocol already read (read here when None and 1:N is on)."""
    ids, feats = pool_templates(
        image_feats,
        meta.templates,
        meta.medias,
        None if args.no_detector_score else meta.face_scores,
        normalize_images=args.normalize_images,
    )
    scores = score_pairs(ids, feats, meta.pairs)
    results: dict[str, Any] = {
        "release": meta.prefix,
        "num_images": len(meta.images),
        "num_templates": int(ids.shape[0]),
        "num_pairs": int(meta.pairs.shape[0]),
        "options": {
            "flip": not args.no_flip,
            "detector_score": not args.no_detector_score,
            "normalize_images": args.normalize_images,
        },
        "tar_at_far": tar_at_far(meta.labels, scores, FAR_TARGETS),
    }
    if not args.no_1n:
        protocol = protocol or load_1n(meta.root, meta.prefix)
        results["identification"] = identification(ids, feats, protocol.galleries, protocol.probes)
    os.makedirs(args.out, exist_ok=True)
    _save(args.out, "scores.npy", scores)
    _save(args.out, "labels.npy", meta.labels)
    with atomic_path(os.path.join(args.out, "template_features.npz")) as tmp:
        np.savez(tmp, ids=ids, features=feats)
    _plot_roc(meta.labels, scores, os.path.join(args.out, "roc.png"), meta.prefix)
    write_text_atomic(os.path.join(args.out, "results.json"), json.dumps(results, indent=2))
    return results


def _save(folder: str, name: str, array: np.ndarray) -> None:
    with atomic_path(os.path.join(folder, name)) as tmp:
        np.save(tmp, array)


def _plot_roc(labels: np.ndarray, scores: np.ndarray, path: str, name: str) -> None:
    from sklearn.metrics import auc, roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)
    curve = {"roc": {"fpr": fpr, "tpr": tpr}, "auc": float(auc(fpr, tpr))}
    with atomic_path(path) as tmp:  # keeps the .png extension matplotlib reads
        plot_roc({name.upper(): curve}, tmp, title=f"ROC on {name.upper()} 1:1")


def format_table(results: dict[str, Any]) -> list[str]:
    """Plain-text tables: TAR (%) per FAR for both rules, then 1:N rank-k and TPIR (%)."""
    head = "".join(f"{far_key(f):>9}" for f in FAR_TARGETS)
    lines = [f"{results['release'].upper()} 1:1 TAR (%) at FAR", f"{'rule':<10}{head}"]
    for rule in RULES:
        row = "".join(f"{v * 100:9.2f}" for v in results["tar_at_far"][rule].values())
        lines.append(f"{rule:<10}{row}")
    ident = results.get("identification")
    if ident:
        lines.append(f"{results['release'].upper()} 1:N (%)")
        for name, m in [*ident["galleries"].items(), ("mean", ident["mean"])]:
            ranks = " ".join(f"rank-{k} {v * 100:.2f}" for k, v in m["rank"].items())
            tpir = " ".join(
                f"TPIR@FPIR={k} " + ("n/a" if v is None else f"{v * 100:.2f}")
                for k, v in m["tpir"].items()
            )
            lines.append(f"{name:<6}{ranks}  {tpir}")
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Command-line entry point; returns the results on rank 0 (None elsewhere)."""
    args = parse_args(argv)
    try:
        return _run(args)
    except (OSError, ValueError, KeyError) as e:
        _fail(_reason(e))
    return None


def _reason(error: BaseException) -> str:
    """One line for an error; a DataLoader worker's ("Caught ValueError in DataLoader worker
    process 1. Original Traceback ...") is the worker's own last line, which names the file."""
    lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
    if not lines:
        return type(error).__name__
    if lines[0].startswith("Caught ") and "DataLoader worker" in lines[0]:
        last = lines[-1]
        return last.split(": ", 1)[1] if last.split(": ", 1)[0].isidentifier() else last
    return lines[0]


def _prepare_out(out: str) -> None:
    """`--out` is a folder this process can write (created if missing), checked before the
    embedding pass: a file, a path under a file or a read-only folder fails in seconds."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} exists and is not a folder")
    try:
        make_writable_folder(out)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write there ({e.strerror or e})") from None


def load_features(path: str, rows: int, release: str) -> np.ndarray:
    """(rows, D) float32 image features of `--image-features`: the header is checked against the
    file's size before anything is read (memory-mapped; a 2^40-element header is one line).

    Raises:
        ValueError: not a .npy, a shape other than (rows, D), or a header the file cannot hold.
    """
    try:
        feats = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        text = str(e).strip()
        reason = text[:200] or type(e).__name__
        raise ValueError(f"{path}: not a readable .npy array ({reason})") from None
    if not isinstance(feats, np.ndarray) or feats.ndim != 2 or feats.shape[0] != rows:
        shape = getattr(feats, "shape", None)
        raise ValueError(f"{path}: shape {shape}, expected ({rows}, D) for {release}")
    if feats.dtype.kind != "f":
        raise ValueError(f"{path}: dtype {feats.dtype}, expected floating-point features")
    return np.asarray(feats, dtype=np.float32)


def _run(args: argparse.Namespace) -> dict[str, Any] | None:
    rank, world, device = (0, 1, args.device) if args.image_features else dist_context(args.device)
    meta = load_meta(args.release)  # every protocol file read and checked before embedding
    protocol = None if args.no_1n else load_1n(meta.root, meta.prefix)
    check_templates(meta, protocol)
    if rank == 0:
        _prepare_out(args.out)
    if args.image_features:
        image_feats = load_features(args.image_features, len(meta.images), args.release)
    else:
        embedder = load_embedder(args.model, args.network, device, args.batch_size)
        check_input_size(embedder, 112, 112, f"{args.release} (aligned faces)")
        if rank == 0:
            print(f"model: {embedder.description}; {len(meta.images)} faces, {world} process(es)")
        t0 = time.perf_counter()
        image_feats = embed_release(
            embedder, meta, not args.no_flip, args.workers, rank, world, not args.no_progress
        )
        if rank == 0:
            elapsed = time.perf_counter() - t0
            print(f"embedded {len(meta.images)} faces in {elapsed:.1f} s")
    if rank != 0:
        return None
    _save(args.out, "image_features.npy", image_feats.astype(np.float32))  # before scoring
    results = score_release(meta, image_feats, args, protocol)
    results["model"] = args.model or f"features {args.image_features}"
    write_text_atomic(os.path.join(args.out, "results.json"), json.dumps(results, indent=2))
    for line in format_table(results):
        print(line)
    print(f"wrote {args.out}/results.json, roc.png, scores and features")
    return results


def cli() -> int:
    """Console entry (`arcscale-eval-ijb`): exit status 0; errors exit 2 inside `main`."""
    main()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
