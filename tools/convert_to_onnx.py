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
import json
import os
import secrets
import statistics
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

if __package__ in (None, ""):  # run as `python tools/convert_to_onnx.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from trainer.checkpoint import STEP_RE  # noqa: E402

__all__ = ["load_backbone", "load_faces", "resolve_checkpoint", "export_onnx", "main"]

_REPO = Path(__file__).resolve().parents[1]
DEFAULT_LFW = Path(os.environ.get("ARCSCALE_LFW", _REPO.parent / "shared" / "data" / "lfw"))
CROP_BOX = (59, 56, 191, 188)  # (left, top, right, bottom) in a 250x250 deep-funneled LFW image
TOLERANCE = 1e-4
NUM_FACES = 8
_PROG = "tools/convert_to_onnx.py"


def resolve_checkpoint(path: str | os.PathLike) -> tuple[Path, dict | None]:
    """Find the state-dict file and its meta.json (if any) behind INPUT.

    Returns:
        (path of the `backbone.pt`/`.pth` file, parsed meta.json or None).

    Raises:
        FileNotFoundError: INPUT, `backbone.pt` in a step dir, or the step dir named by `latest`
            does not exist, or a directory has none of the expected layouts.
        ValueError: meta.json is not valid JSON / not an object.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{_PROG}: input {path} does not exist")
    if path.is_file():
        return path, None
    for latest in (path / "latest", path / "checkpoints" / "latest"):
        if latest.is_file():
            name = latest.read_text(errors="replace")[:256].strip()
            if not STEP_RE.match(name):  # confined to the run's own checkpoints/ folder
                raise ValueError(f"{_PROG}: {latest} must name a step_<N> folder, got {name!r}")
            step_dir = latest.parent / name
            if not step_dir.is_dir():
                raise FileNotFoundError(f"{_PROG}: {latest} names {step_dir}, which does not exist")
            return resolve_checkpoint(step_dir)
    weights = path / "backbone.pt"
    if not weights.is_file():
        raise FileNotFoundError(
            f"{_PROG}: {path} is a directory without backbone.pt, latest or checkpoints/latest"
        )
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        return weights, None
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{_PROG}: {meta_file} is not valid JSON: {err}") from err
    if not isinstance(meta, dict):
        raise ValueError(f"{_PROG}: {meta_file} must hold a JSON object, got {type(meta).__name__}")
    return weights, meta


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for unreadable files
        raise ValueError(f"{_PROG}: cannot read {path} as a torch state dict: {err}") from err
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"{_PROG}: {path} must hold a plain state dict (str -> tensor)")
    return dict(state)


def _check_keys(model: nn.Module, state: Mapping[str, torch.Tensor], source: Path, network: str):
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    )
    if missing or unexpected or mismatched:
        parts = [f"{_PROG}: {source} does not fit network {network!r}"]
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape-mismatched", mismatched),
        ):
            if keys:
                parts.append(f"  {label} keys ({len(keys)}): {', '.join(keys)}")
        raise ValueError("\n".join(parts))


def load_backbone(path: str | os.PathLike, network: str | None = None, **kwargs) -> nn.Module:
    """Build the backbone and strictly load a checkpoint into it; returned in eval mode, fp32, CPU.

    Args:
        path: any INPUT accepted by this tool (file, step dir, run dir; see module docstring).
        network: registered name; if None it comes from the step dir's meta.json.
        **kwargs: `embedding_size` and builder overrides; they win over meta.json's values.

    Raises:
        FileNotFoundError: missing input (see `resolve_checkpoint`).
        ValueError: no network known, meta.json disagrees with `network`, unreadable file, or
            keys that do not fit (missing / unexpected / shape-mismatched ones are listed).
        models.UnknownModelError: unknown network name.
    """
    weights, meta = resolve_checkpoint(path)
    meta = meta or {}
    meta_network = meta.get("network")
    if network is None and meta_network is None:
        raise ValueError(f"{_PROG}: no --network given and no meta.json network for {weights}")
    if network is not None and meta_network is not None and network != meta_network:
        raise ValueError(
            f"{_PROG}: --network {network!r} but {weights.parent}/meta.json says {meta_network!r}"
        )
    network = network or meta_network
    build_kwargs = dict(meta.get("model_kwargs") or {})
    if "embedding_size" in meta:
        build_kwargs["embedding_size"] = int(meta["embedding_size"])
    build_kwargs.update({k: v for k, v in kwargs.items() if v is not None})
    model = models.create(network, **build_kwargs)
    state = _read_state_dict(weights)
    _check_keys(model, state, weights, network)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _normalize(rgb: np.ndarray) -> np.ndarray:
    """uint8 (112, 112, 3) RGB -> float32 (3, 112, 112) in [-1, 1]: (x / 255 - 0.5) / 0.5."""
    return ((rgb.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)


def load_faces(lfw_root: Path | None = None, lfw_bin: Path | None = None, n: int = NUM_FACES):
    """Real face crops as a float32 array (n, 3, 112, 112) normalized to [-1, 1].

    From an insightface verification `.bin` (pickled (images, issame) with encoded 112x112
    images, read by `data.verification_bin.read_bin_raw`, which runs no code): its first n
    images. Otherwise from deep-funneled LFW: the first image of each of the
    first n people (sorted), cropped to `CROP_BOX` and resized to 112x112 (bilinear).

    Raises:
        FileNotFoundError: the .bin or LFW folder does not exist.
        ValueError: the .bin cannot be parsed or holds fewer than n images.
    """
    import cv2
    from PIL import Image

    if lfw_bin is not None:
        if not Path(lfw_bin).is_file():
            raise FileNotFoundError(f"{_PROG}: --lfw-bin {lfw_bin} does not exist")
        from data.verification_bin import read_bin_raw  # restricted unpickler: runs no code

        images, _ = read_bin_raw(lfw_bin)
        if len(images) < n:
            raise ValueError(f"{_PROG}: {lfw_bin} holds {len(images)} images, need {n}")
        out = []
        for raw in images[:n]:
            bgr = cv2.imdecode(np.frombuffer(bytes(raw), np.uint8), cv2.IMREAD_COLOR)
            if bgr is None:
                raise ValueError(f"{_PROG}: {lfw_bin} holds an image cv2 cannot decode")
            rgb = cv2.cvtColor(cv2.resize(bgr, (112, 112)), cv2.COLOR_BGR2RGB)
            out.append(_normalize(rgb))
        return np.stack(out)
    folder = Path(lfw_root or DEFAULT_LFW) / "lfw-deepfunneled"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{_PROG}: LFW images not found at {folder}; pass --lfw-root, --lfw-bin or --no-faces"
        )
    people = sorted(p for p in folder.iterdir() if p.is_dir())[:n]
    out = []
    for person in people:
        first = sorted(person.glob("*.jpg"))[0]
        face = Image.open(first).convert("RGB").crop(CROP_BOX).resize((112, 112), Image.BILINEAR)
        out.append(_normalize(np.asarray(face)))
    return np.stack(out)


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
        raise ValueError(f"{_PROG}: onnxsim could not validate the simplified model")
    onnx.save(simplified, str(path))


def compare(model: nn.Module, session, batches: dict[str, np.ndarray]) -> float:
    """Max |onnxruntime - PyTorch| over named input batches; prints one line per batch."""
    worst = 0.0
    for label, batch in batches.items():
        with torch.no_grad():
            ref = model(torch.from_numpy(batch)).numpy()
        got = session.run(None, {"data": batch})[0]
        if got.shape != ref.shape:
            raise ValueError(f"{_PROG}: ONNX output {got.shape} != PyTorch {ref.shape} ({label})")
        diff = float(np.abs(got - ref).max())
        worst = max(worst, diff)
        print(f"  {label:<22} max|diff| {diff:.2e}  (max|out| {np.abs(ref).max():.2f})")
    return worst


def _latency_ms(session, runs: int) -> float:
    x = np.random.default_rng(0).standard_normal((1, 3, 112, 112), dtype=np.float32)
    for _ in range(3):
        session.run(None, {"data": x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {"data": x})
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


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 ok, 1 mismatch, 2 bad input)."""
    import onnx
    import onnxruntime as ort

    args = _parse(argv)
    tmp = None
    try:
        if args.simplify:
            try:
                import onnxsim  # noqa: F401
            except ImportError as err:
                raise ValueError(
                    f"{_PROG}: --simplify needs onnxsim (pip install onnxsim)"
                ) from err
        weights, _ = resolve_checkpoint(args.input)
        model = load_backbone(args.input, args.network, embedding_size=args.embedding_size)
        output = Path(args.output) if args.output else weights.parent / "backbone.onnx"
        rng = np.random.default_rng(0)
        batches = {
            f"random batch {b}": rng.standard_normal((b, 3, 112, 112), dtype=np.float32)
            for b in (1, 4)
        }
        if not args.no_faces:
            faces = load_faces(args.lfw_root, args.lfw_bin)
            batches["faces batch 1"] = faces[:1]
            for i in range(0, len(faces), 4):
                batches[f"faces {i}-{i + 3} batch 4"] = faces[i : i + 4]
        output.parent.mkdir(parents=True, exist_ok=True)
        # a name, not mkstemp: the exporter's open() gives the umask permissions, mkstemp 0600
        tmp = output.parent / f".{output.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
        export_onnx(model, tmp, args.opset)
        if args.simplify:
            _simplify(tmp)
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except onnx.checker.ValidationError as err:
            print(f"{_PROG}: FAILED onnx.checker: {err}", file=sys.stderr)
            return 1
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.ort_threads
        session = ort.InferenceSession(
            str(tmp), sess_options=options, providers=["CPUExecutionProvider"]
        )
        print(f"{_PROG}: {weights} ({model.__class__.__name__}) -> {output}")
        worst = compare(model, session, batches)
        if worst > TOLERANCE:
            print(f"{_PROG}: FAILED max|diff| {worst:.2e} > {TOLERANCE:.0e}", file=sys.stderr)
            return 1
        latency = _latency_ms(session, args.runs)
        os.replace(tmp, output)
        tmp = None
        size_mib = output.stat().st_size / 2**20
        print(f"  max|diff| {worst:.2e} <= {TOLERANCE:.0e}; file {size_mib:.1f} MiB")
        threads = args.ort_threads or "default"
        print(
            f"  onnxruntime CPU latency, batch 1: {latency:.2f} ms "
            f"(median of {args.runs}, {threads} threads)"
        )
        return 0
    except (FileNotFoundError, ValueError, KeyError, TypeError) as err:
        print(f"{_PROG}: error: {err}", file=sys.stderr)
        return 2
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
