"""The cost of a deployment variant, measured against the fp32 model in one process.

``compare_variants`` loads every variant through the evaluation tools' own loader
(``evaluation.embedders.load_embedder``), embeds the same verification ``.bin`` with each (plain
and mirrored views), and reports per variant: cosine of its embeddings to fp32's (mean and worst
over every image and view), flip-test verification accuracy and TAR@FAR (``evaluation.
verification.evaluate_views``), onnxruntime CPU latency at the given batch sizes and the file
size. Latency rounds visit the variants in turn, so load from other processes on a shared
machine hits all of them alike; each cell is a median over rounds, and the speed-up is the
per-round fp32/variant ratio's median.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from data.decode import normalize
from data.verification_bin import load_bin
from evaluation.embedders import Embedder, check_input_size, embed_views, load_embedder
from evaluation.quantize import Int8Options, calibration_faces, to_fp16, to_int8
from evaluation.verification import evaluate_views, l2_normalize

__all__ = ["compare_variants", "export_variants", "format_table", "latency_rounds", "variant_path"]


def _views(embedder: Embedder, images: NDArray[np.uint8]) -> NDArray[np.float32]:
    plain, flipped = embed_views(embedder, images, embedder.batch_size)
    return np.concatenate([plain, flipped])


def latency_rounds(
    embedders: dict[str, Embedder], x: torch.Tensor, rounds: int, warmup: int = 2
) -> dict[str, list[float]]:
    """Milliseconds per ``embedder(x)`` call, ``rounds`` times each, variants taken in turn.

    Args:
        embedders: name -> loaded model (its ``forward`` is timed: the onnxruntime run plus the
            input conversion every caller pays).
        x: (B, 3, H, W) float32 canonical input.
    Returns:
        name -> list of ``rounds`` times in ms.
    """
    for emb in embedders.values():
        for _ in range(warmup):
            emb.forward(x)
    times: dict[str, list[float]] = {name: [] for name in embedders}
    for _ in range(rounds):
        for name, emb in embedders.items():
            start = time.perf_counter()
            emb.forward(x)
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def _accuracy(views: NDArray[np.float32], issame: NDArray[np.bool_], far: float) -> dict[str, Any]:
    half = views.shape[0] // 2
    res = evaluate_views(views[:half], views[half:], issame, far_target=far)
    return {k: res[k] for k in ("accuracy_mean", "accuracy_std", "tar_at_far", "far_target")}


def compare_variants(
    paths: dict[str, str],
    bin_path: str,
    batches: tuple[int, ...] = (1, 32),
    rounds: int = 20,
    threads: int = 0,
    far_target: float = 1e-3,
) -> dict[str, Any]:
    """Measure every variant against the first one (the fp32 reference).

    Args:
        paths: variant name -> ``.onnx`` path; the first entry is the reference.
        bin_path: insightface verification ``.bin`` (real aligned faces and pairs).
        batches: batch sizes timed (real faces from the ``.bin``, repeated if it holds fewer).
        rounds: timed calls per variant and batch size.
        threads: onnxruntime intra-op threads (0: its default, all cores).
    Returns:
        ``{"bin", "num_pairs", "threads", "rounds", "variants": {name: row}}``; a row holds
        ``path``, ``size_mib``, ``precision``, ``calibration``, ``cosine_mean``,
        ``cosine_worst``, ``accuracy_mean``/``_std``, ``tar_at_far``, ``far_target``,
        ``latency_ms`` {batch: median}, ``speedup`` {batch: median fp32/variant ratio}.
    Raises:
        FileNotFoundError, ValueError: a model or the ``.bin`` cannot be read, or a model does
            not fit the ``.bin``'s images.
    """
    images, issame = load_bin(bin_path)
    embedders = {
        name: load_embedder(p, batch_size=64, threads=threads) for name, p in paths.items()
    }
    ref_name = next(iter(paths))
    rows: dict[str, dict[str, Any]] = {}
    ref_views: NDArray[np.float32] | None = None
    for name, emb in embedders.items():
        check_input_size(emb, images.shape[1], images.shape[2], bin_path)
        views = _views(emb, images)
        ref_views = views if ref_views is None else ref_views
        cos = np.sum(l2_normalize(views) * l2_normalize(ref_views), axis=1)
        rows[name] = {
            "path": paths[name],
            "size_mib": os.path.getsize(paths[name]) / 2**20,
            "precision": emb.metadata.get("precision", "?"),
            "calibration": emb.metadata.get("calibration", ""),
            "cosine_mean": float(cos.mean()),
            "cosine_worst": float(cos.min()),
            **_accuracy(views, issame, far_target),
            "latency_ms": {},
            "speedup": {},
        }
    for b in batches:
        idx = np.arange(b) % len(images)
        x = normalize(torch.from_numpy(np.ascontiguousarray(images[idx]))).contiguous()
        times = latency_rounds(embedders, x, rounds)
        for name, row in rows.items():
            row["latency_ms"][b] = statistics.median(times[name])
            ratios = [r / t for r, t in zip(times[ref_name], times[name])]
            row["speedup"][b] = statistics.median(ratios)
    return {
        "bin": bin_path,
        "num_pairs": int(len(issame)),
        "threads": threads or "default",
        "rounds": rounds,
        "reference": ref_name,
        "variants": rows,
    }


def format_table(results: dict[str, Any]) -> list[str]:
    """The comparison as a Markdown table (one row per variant), for stdout and the docs."""
    batches = list(next(iter(results["variants"].values()))["latency_ms"])
    far = next(iter(results["variants"].values()))["far_target"]
    head = [
        "variant",
        "file MiB",
        "cos to fp32 mean / worst",
        "accuracy (flip)",
        f"TAR@FAR={far:g}",
    ] + [f"latency b{b} ms (x fp32)" for b in batches]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results["variants"].items():
        cells = [
            name,
            f"{r['size_mib']:.2f}",
            f"{r['cosine_mean']:.4f} / {r['cosine_worst']:.4f}",
            f"{100 * r['accuracy_mean']:.2f} +- {100 * r['accuracy_std']:.2f} %",
            f"{100 * r['tar_at_far']:.1f} %",
        ] + [f"{r['latency_ms'][b]:.2f} ({r['speedup'][b]:.2f}x)" for b in batches]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def variant_path(fp32: str, precision: str) -> str:
    """``backbone.onnx`` -> ``backbone.fp16.onnx`` / ``backbone.int8.onnx`` (same folder)."""
    stem, ext = os.path.splitext(fp32)
    return f"{stem}.{precision}{ext}"


def export_variants(
    fp32: str,
    variants: tuple[str, ...],
    calib: str | None,
    calib_size: int,
    opts: Int8Options,
) -> dict[str, str]:
    """Write the requested variants of ``fp32`` beside it (each atomically).

    Args:
        fp32: the checked fp32 export.
        variants: any of ``fp16``, ``int8``.
        calib: calibration faces (``evaluation.quantize.calibration_faces``); needed for int8.
        calib_size: how many faces calibrate.
        opts: INT8 settings.
    Returns:
        name -> path, ``fp32`` first.
    Raises:
        ValueError: int8 without ``calib``, or a calibration / quantization failure.
    """
    from data.atomic import atomic_path

    paths = {"fp32": fp32}
    if "fp16" in variants:
        with atomic_path(variant_path(fp32, "fp16")) as tmp:
            to_fp16(fp32, tmp)
        paths["fp16"] = variant_path(fp32, "fp16")
    if "int8" in variants:
        if not calib:
            raise ValueError(
                "int8 needs calibration faces: --calib a .rec or an aligned-face folder"
            )
        faces = calibration_faces(calib, calib_size)
        with atomic_path(variant_path(fp32, "int8")) as tmp:
            to_int8(fp32, tmp, faces, opts, where=calib)
        paths["int8"] = variant_path(fp32, "int8")
    return paths
