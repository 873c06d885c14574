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
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

import models
from data.atomic import atomic_path
from data.decode import decode_image, normalize
from data.lfw import DEFAULT_LFW, LFW_CROP
from evaluation.embedders import Embedder, onnx_embedder
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
        from data.verification_bin import read_bin_raw  # restricted unpickler: runs no code

        images, _ = read_bin_raw(lfw_bin)
        if len(images) < n:
            raise ValueError(f"{_PROG}: {lfw_bin} holds {len(images)} images, need {n}")
        out = []
        for i, raw in enumerate(images[:n]):
            rgb = decode_image(raw, where=f"{lfw_bin} image {i}")
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


def _export_checked(model: nn.Module, path: Path, args, batches) -> tuple[float, float]:
    """Export to ``path``, check it and compare it with PyTorch; returns (max |diff|, latency).

    Raises:
        _Mismatch: onnx.checker fails or the outputs differ by more than TOLERANCE.
    """
    import onnx

    export_onnx(model, path, args.opset)
    if args.simplify:
        _simplify(path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as err:
        raise _Mismatch(f"FAILED onnx.checker: {err}") from None
    embedder = onnx_embedder(str(path), threads=args.ort_threads)
    worst = compare(model, embedder, batches)
    if worst > TOLERANCE:
        raise _Mismatch(f"FAILED max|diff| {worst:.2e} > {TOLERANCE:.0e}")
    return worst, _latency_ms(embedder, args.runs)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 ok, 1 mismatch, 2 bad input)."""
    args = _parse(argv)
    try:
        if args.simplify:
            try:
                import onnxsim  # noqa: F401
            except ImportError as err:
                raise ValueError("--simplify needs onnxsim (pip install onnxsim)") from err
        weights, _ = resolve_checkpoint(args.input)
        model = load_backbone(args.input, args.network, embedding_size=args.embedding_size)
        output = Path(args.output) if args.output else weights.parent / "backbone.onnx"
        batches = _batches(args)
        output.parent.mkdir(parents=True, exist_ok=True)
        print(f"{_PROG}: {weights} ({model.__class__.__name__}) -> {output}")
        with atomic_path(output) as tmp:  # a failed check leaves no .onnx behind
            worst, latency = _export_checked(model, Path(tmp), args, batches)
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
