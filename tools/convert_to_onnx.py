"""Export a trained backbone to ONNX and prove it computes what PyTorch computes.

    python tools/convert_to_onnx.py INPUT [--network r50] [--embedding-size 512]
        [--output backbone.onnx] [--simplify] [--opset 17] [--lfw-bin path.bin | --lfw-root DIR]

INPUT is a consolidated `backbone.pt` / arcface_torch `backbone.pth` (a plain state dict saved with
`torch.save`), a step directory `checkpoints/step_<N>/` holding `backbone.pt` and `meta.json`
(`{"network": ..., "embedding_size": ..., "model_kwargs": {...}}`, used when --network is not
given), or a run directory / checkpoints directory with a `latest` file naming the step directory.

The ONNX file has one input `data` (N, 3, 112, 112) float32 with a dynamic batch axis and one
output `embedding` (N, D) float32, all weights inside the file. It is written under a temporary
name, checked with `onnx.checker.check_model(full_check=True)`, compared with PyTorch through
onnxruntime (random inputs and real face crops at batch 1 and 4; max |diff| must be <= 1e-4) and
only then renamed to --output: a failed run leaves no `.onnx` behind. Exit codes: 0 ok, 1 the
numbers disagree, 2 bad input. Reference for the idea: timm `timm/utils/onnx.py`.

The file carries its own description in `metadata_props` (network, embedding size, input size,
channel order, mean/std, flip-test convention, training config hash, project version:
`evaluation/onnx_meta.py`), read by every evaluation tool; `model_card.md` is written beside it.
INPUT may also be a `backbone.safetensors` or a folder holding arcface_torch's `model.pt`.

Deployment variants (docs/deploy.md), with onnxruntime's own converters:

    python tools/convert_to_onnx.py RUN --output RUN/backbone.onnx --lfw-bin heldout.bin \
        --variants fp16 int8 --calib data/train.rec [--calib-method minmax] [--per-tensor]

writes `backbone.fp16.onnx` and `backbone.int8.onnx` (static QDQ, `evaluation/quantize.py`)
beside the fp32 file and measures each against it on the `--lfw-bin` pairs (embedding cosine,
verification accuracy, TAR@FAR=1e-3, CPU latency at batch 1 and 32, file size:
`evaluation/deploy.py`): a table on stdout, `deploy/results.json` beside the export.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

import models
from data.atomic import atomic_path, write_text_atomic
from data.decode import decode_image, normalize
from data.lfw import DEFAULT_LFW, LFW_CROP
from evaluation.deploy import compare_variants, export_variants, format_table
from evaluation.embedders import Embedder, onnx_embedder
from evaluation.model_card import find_run_dir, model_card
from evaluation.onnx_meta import build_metadata, set_metadata
from evaluation.quantize import CALIBRATION_METHODS, Int8Options
from models.weights import load_backbone, resolve_checkpoint

__all__ = ["load_faces", "export_onnx", "main"]

TOLERANCE = 1e-4
NUM_FACES = 8
_PROG = "tools/convert_to_onnx.py"


def load_faces(lfw_root: Path | None = None, lfw_bin: Path | None = None, n: int = NUM_FACES):
    """Real face crops as a float32 array (n, 3, 112, 112) normalized to [-1, 1].

    From an insightface verification `.bin` (pickled (images, issame) with encoded 112x112
    images, read by `data.verification_bin.read_bin_raw`, which runs no code): its first n
    images. Otherwise from deep-funneled LFW: the first image of each of the
    first n people (sorted), cropped to `data.lfw.LFW_CROP` and resized to 112x112 (bilinear).

    Raises:
        FileNotFoundError: the .bin or LFW folder does not exist.
        ValueError: the .bin cannot be parsed or holds fewer than n images.
    """
    import cv2

    if lfw_bin is not None:
        if not Path(lfw_bin).is_file():
            raise FileNotFoundError(f"{_PROG}: --lfw-bin {lfw_bin} does not exist")
        from data.verification_bin import decode_bin_image, read_bin_raw  # runs no code

        images, _ = read_bin_raw(lfw_bin)
        if len(images) < n:
            raise ValueError(f"{_PROG}: {lfw_bin} holds {len(images)} images, need {n}")
        out = []
        for i, raw in enumerate(images[:n]):
            rgb = decode_bin_image(raw, lfw_bin, i)  # the .bin reader's size limit
            out.append(cv2.resize(rgb, (112, 112), interpolation=cv2.INTER_LINEAR))
        return normalize(np.stack(out))
    folder = Path(lfw_root or DEFAULT_LFW) / "lfw-deepfunneled"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{_PROG}: LFW images not found at {folder}; pass --lfw-root, --lfw-bin or --no-faces"
        )
    people = sorted(p for p in folder.iterdir() if p.is_dir())[:n]
    out = []
    left, top, right, bottom = LFW_CROP
    for person in people:
        rgb = decode_image(sorted(person.glob("*.jpg"))[0].read_bytes())
        face = rgb[top:bottom, left:right]
        out.append(cv2.resize(face, (112, 112), interpolation=cv2.INTER_LINEAR))
    return normalize(np.stack(out))


def export_onnx(model: nn.Module, output: Path, opset: int = 17) -> None:
    """torch.onnx.export (TorchScript exporter) with input `data`, output `embedding`, dynamic N.

    Raises:
        ValueError: the model is too large for a single-file ONNX (protobuf limit 2 GiB).
    """
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    if size >= 2**31:
        raise ValueError(f"{_PROG}: {size / 2**30:.2f} GiB of weights exceed single-file ONNX")
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated but supported and gives a clean single file; the
        # tracer's warning comes from timm's input-size assert, constant by design (112x112).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        _export(model, output, opset)


def _export(model: nn.Module, output: Path, opset: int) -> None:
    torch.onnx.export(
        model,
        (torch.zeros(1, 3, 112, 112),),
        str(output),
        dynamo=False,
        input_names=["data"],
        output_names=["embedding"],
        dynamic_axes={"data": {0: "batch"}, "embedding": {0: "batch"}},
        opset_version=opset,
        do_constant_folding=True,
    )


def _simplify(path: Path) -> None:
    import onnx
    import onnxsim

    simplified, ok = onnxsim.simplify(onnx.load(str(path)))
    if not ok:
        raise ValueError("onnxsim could not validate the simplified model")
    onnx.save(simplified, str(path))


def compare(model: nn.Module, embedder: Embedder, batches: dict[str, np.ndarray]) -> float:
    """Max |onnxruntime - PyTorch| over named input batches; prints one line per batch.

    ``embedder`` is the exported file loaded the way every evaluation tool loads it
    (``evaluation.embedders.onnx_embedder``), so the parity checked is the one they see.
    """
    worst = 0.0
    for label, batch in batches.items():
        with torch.no_grad():
            ref = model(torch.from_numpy(batch)).numpy()
        got = embedder(torch.from_numpy(batch)).numpy()
        if got.shape != ref.shape:
            raise ValueError(f"{_PROG}: ONNX output {got.shape} != PyTorch {ref.shape} ({label})")
        diff = float(np.abs(got - ref).max())
        worst = max(worst, diff)
        print(f"  {label:<22} max|diff| {diff:.2e}  (max|out| {np.abs(ref).max():.2f})")
    return worst


def _latency_ms(embedder: Embedder, runs: int) -> float:
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, 112, 112), np.float32))
    for _ in range(3):
        embedder.forward(x)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        embedder.forward(x)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=_PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("input", help="backbone.pt/.pth, step dir, or run dir with checkpoints/latest")
    p.add_argument("--network", default=None, help=f"one of {', '.join(models.list_models())}")
    p.add_argument("--embedding-size", type=int, default=None, help="D (default: meta or 512)")
    p.add_argument("--output", default=None, help="default: backbone.onnx beside the weights")
    p.add_argument("--simplify", action="store_true", help="run onnxsim (must be installed)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--lfw-bin", type=Path, default=None, help="verification .bin for face crops")
    p.add_argument("--lfw-root", type=Path, default=None, help=f"default {DEFAULT_LFW}")
    p.add_argument("--no-faces", action="store_true", help="compare on random inputs only")
    p.add_argument("--runs", type=int, default=50, help="latency runs (median is printed)")
    p.add_argument("--ort-threads", type=int, default=0, help="onnxruntime threads, 0 = default")
    v = p.add_argument_group("deployment variants (docs/deploy.md)")
    v.add_argument("--variants", nargs="*", default=[], choices=["fp16", "int8"])
    v.add_argument("--calib", default=None, help="int8: a .rec, its folder, or aligned faces")
    v.add_argument("--calib-size", type=int, default=256, help="calibration faces")
    v.add_argument("--calib-method", default="minmax", choices=CALIBRATION_METHODS)
    v.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor")
    v.add_argument("--activations", default="uint8", choices=["uint8", "int8"])
    v.add_argument("--exclude-nodes", default="", help="comma-separated node names kept float")
    v.add_argument("--exclude-op-types", default="", help="e.g. PRelu,Gemm: kept float")
    v.add_argument("--report-rounds", type=int, default=20, help="latency rounds per variant")
    return p.parse_args(argv)


class _Mismatch(Exception):
    """The exported file fails onnx.checker or disagrees with PyTorch (exit code 1)."""


def _batches(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """Named float32 input batches: random ones at batch 1 and 4, and real faces unless
    --no-faces."""
    rng = np.random.default_rng(0)
    batches = {
        f"random batch {b}": rng.standard_normal((b, 3, 112, 112), dtype=np.float32) for b in (1, 4)
    }
    if not args.no_faces:
        faces = load_faces(args.lfw_root, args.lfw_bin)
        batches["faces batch 1"] = faces[:1]
        for i in range(0, len(faces), 4):
            batches[f"faces {i}-{i + 3} batch 4"] = faces[i : i + 4]
    return batches


def _export_checked(model: nn.Module, path: Path, args, batches, meta) -> tuple[float, float]:
    """Export to ``path`` with metadata ``meta``, check it and compare it with PyTorch; returns
    (max |diff|, latency).

    Raises:
        _Mismatch: onnx.checker fails or the outputs differ by more than TOLERANCE.
    """
    import onnx

    export_onnx(model, path, args.opset)
    if args.simplify:
        _simplify(path)
    proto = onnx.load(str(path))
    set_metadata(proto, meta)
    onnx.save(proto, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as err:
        raise _Mismatch(f"FAILED onnx.checker: {err}") from None
    embedder = onnx_embedder(str(path), threads=args.ort_threads)
    worst = compare(model, embedder, batches)
    if worst > TOLERANCE:
        raise _Mismatch(f"FAILED max|diff| {worst:.2e} > {TOLERANCE:.0e}")
    return worst, _latency_ms(embedder, args.runs)


def _metadata(args: argparse.Namespace, weights: Path, model: nn.Module) -> dict[str, str]:
    """``metadata_props`` of the export: from meta.json (or a safetensors header) and options."""
    _, saved = resolve_checkpoint(args.input)
    saved = saved or {}
    with torch.no_grad():
        dim = int(model(torch.zeros(1, 3, 112, 112)).shape[1])
    run_dir = find_run_dir(str(weights))
    return build_metadata(
        network=str(args.network or saved.get("network")),
        embedding_size=dim,
        model_kwargs=saved.get("model_kwargs") or {},
        config=Path(run_dir) / "config.yaml" if run_dir else None,
    )


def _variants(args: argparse.Namespace, fp32: Path) -> list[str]:
    """fp16/int8 files beside ``fp32``, measured against it; returns the table's lines."""
    opts = Int8Options(
        method=args.calib_method,
        per_channel=not args.per_tensor,
        activations=args.activations,
        exclude_nodes=tuple(n for n in args.exclude_nodes.split(",") if n),
        exclude_op_types=tuple(n for n in args.exclude_op_types.split(",") if n),
    )
    paths = export_variants(str(fp32), tuple(args.variants), args.calib, args.calib_size, opts)
    results = compare_variants(
        paths, str(args.lfw_bin), rounds=args.report_rounds, threads=args.ort_threads
    )
    table = format_table(results)
    print("\n".join(table))
    folder = fp32.parent / "deploy"
    folder.mkdir(exist_ok=True)
    write_text_atomic(str(folder / "results.json"), json.dumps(results, indent=2))
    write_text_atomic(str(folder / "table.md"), "\n".join(table) + "\n")
    print(f"{_PROG}: wrote {', '.join(paths.values())}, {folder}/results.json")
    return table


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 ok, 1 mismatch, 2 bad input)."""
    args = _parse(argv)
    try:
        if args.simplify:
            try:
                import onnxsim  # noqa: F401
            except ImportError as err:
                raise ValueError("--simplify needs onnxsim (pip install onnxsim)") from err
        if args.variants and args.lfw_bin is None:  # checked before the export, not after
            raise ValueError("--variants measures on verification pairs: give --lfw-bin")
        if "int8" in args.variants and not args.calib:
            raise ValueError("--variants int8 needs --calib (a .rec or aligned faces)")
        weights, _ = resolve_checkpoint(args.input)
        model = load_backbone(args.input, args.network, embedding_size=args.embedding_size)
        output = Path(args.output) if args.output else weights.parent / "backbone.onnx"
        batches = _batches(args)
        output.parent.mkdir(parents=True, exist_ok=True)
        print(f"{_PROG}: {weights} ({model.__class__.__name__}) -> {output}")
        meta = _metadata(args, weights, model)
        with atomic_path(output) as tmp:  # a failed check leaves no .onnx behind
            worst, latency = _export_checked(model, Path(tmp), args, batches, meta)
        table = _variants(args, output) if args.variants else None
        card = output.parent / "model_card.md"
        write_text_atomic(str(card), model_card(meta, find_run_dir(str(weights)), table))
    except _Mismatch as err:
        print(f"{_PROG}: {err}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError, KeyError, TypeError) as err:
        print(f"{_PROG}: error: {err}", file=sys.stderr)
        return 2
    size_mib = output.stat().st_size / 2**20
    print(f"  max|diff| {worst:.2e} <= {TOLERANCE:.0e}; file {size_mib:.1f} MiB")
    threads = args.ort_threads or "default"
    print(
        f"  onnxruntime CPU latency, batch 1: {latency:.2f} ms "
        f"(median of {args.runs}, {threads} threads)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
