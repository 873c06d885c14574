"""fp16 and INT8 variants of an fp32 ONNX face model, with onnxruntime's own tools.

- fp16: ``onnxruntime.transformers.float16.convert_float_to_float16`` with ``keep_io_types``
  (float32 input and output stay, so every loader feeds it as the fp32 model).
- INT8: ``onnxruntime.quantization.quant_pre_process`` (shape inference + graph optimization, as
  onnxruntime's quantization guide advises), then ``quantize_static`` in QDQ format, weights
  int8 per output channel (or per tensor), activations uint8 (or int8), calibrated on real aligned
  faces (``calibration_faces``: a ``.rec`` or an image folder) with MinMax, Entropy, Percentile or
  Distribution, optionally leaving named nodes or whole op types in float.

Both copy the fp32 file's ``metadata_props`` (``evaluation/onnx_meta.py``) and set ``precision``;
the INT8 file also records its ``calibration``. Calibration batches are prepared with the model's
own declared normalization (``Normalization.apply``), as the evaluation loader does.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from data.decode import decode_image, normalize
from evaluation.onnx_meta import Normalization, read_metadata, set_metadata

__all__ = [
    "CALIBRATION_METHODS",
    "Int8Options",
    "calibration_faces",
    "to_fp16",
    "to_int8",
]

CALIBRATION_METHODS = ("minmax", "entropy", "percentile", "distribution")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass(frozen=True)
class Int8Options:
    """How ``to_int8`` quantizes.

    Attributes:
        method: one of ``CALIBRATION_METHODS`` (onnxruntime ``CalibrationMethod``).
        per_channel: one weight scale per output channel (else one per tensor).
        activations: ``uint8`` (U8S8, onnxruntime's advice for x86) or ``int8`` (S8S8).
        exclude_nodes: node names left in float.
        exclude_op_types: op types (e.g. ``PRelu``) whose every node is left in float.
        batch: calibration images per ``get_next`` batch.
    """

    method: str = "minmax"
    per_channel: bool = True
    activations: str = "uint8"
    exclude_nodes: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()
    batch: int = 16

    def describe(self) -> str:
        """One line for the metadata, logs and the report."""
        parts = [
            self.method,
            "per-channel" if self.per_channel else "per-tensor",
            "U8S8" if self.activations == "uint8" else "S8S8",
        ]
        if self.exclude_op_types:
            parts.append("float " + "+".join(self.exclude_op_types))
        if self.exclude_nodes:
            parts.append(f"{len(self.exclude_nodes)} nodes float")
        return ", ".join(parts)


def _rec_images(rec: str, n: int, size: tuple[int, int], rng: np.random.Generator) -> list[Any]:
    from data.datasets import RecordDataset

    ds = RecordDataset(rec, image_size=size[0])
    picks = rng.choice(len(ds), size=min(n, len(ds)), replace=False)
    return [ds[int(i)][0] for i in sorted(picks)]


def _folder_images(
    folder: str, n: int, size: tuple[int, int], rng: np.random.Generator
) -> list[Any]:
    files = sorted(
        os.path.join(root, f)
        for root, _, names in os.walk(folder)
        for f in names
        if f.lower().endswith(_IMAGE_SUFFIXES)
    )
    if not files:
        raise ValueError(f"{folder}: no images ({', '.join(_IMAGE_SUFFIXES)}) and no train.rec")
    picks = rng.choice(len(files), size=min(n, len(files)), replace=False)
    out = []
    for i in sorted(picks):
        img = decode_image(Path(files[i]).read_bytes(), where=files[i])
        if img.shape[:2] != size:
            raise ValueError(
                f"{files[i]}: {img.shape[1]}x{img.shape[0]} image, the model takes aligned "
                f"{size[1]}x{size[0]} faces (tools/align_faces.py)"
            )
        out.append(img)
    return out


def calibration_faces(
    source: str, n: int = 256, seed: int = 0, size: tuple[int, int] = (112, 112)
) -> NDArray[np.uint8]:
    """``n`` aligned faces drawn at random (seeded, without replacement) from ``source``.

    Args:
        source: a ``.rec`` (with its ``.idx``), a folder holding ``train.rec``, or a folder of
            aligned face images (searched recursively).
        n: how many (fewer when the source holds fewer).
        size: (H, W) every image must have.
    Returns:
        uint8 (n, H, W, 3) RGB.
    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: no images, or an image of another size.
    """
    if not os.path.exists(source):
        raise FileNotFoundError(f"calibration source {source} does not exist")
    rng = np.random.default_rng(seed)
    rec = os.path.join(source, "train.rec") if os.path.isdir(source) else source
    if rec.endswith(".rec") and os.path.isfile(rec):
        images = _rec_images(rec, n, size, rng)
    elif os.path.isdir(source):
        images = _folder_images(source, n, size, rng)
    else:
        raise ValueError(f"calibration source {source} is neither a .rec nor a folder")
    return np.stack(images).astype(np.uint8)


def _reader(model_path: str, faces: NDArray[np.uint8], batch: int) -> Any:
    """An onnxruntime ``CalibrationDataReader`` over ``faces``, normalized as the model says."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader

    model = onnx.load(model_path, load_external_data=False)
    norm = Normalization.from_metadata(read_metadata(model), model_path)
    name = model.graph.input[0].name
    feeds = []
    for s in range(0, len(faces), batch):
        x = norm.apply(normalize(torch.from_numpy(faces[s : s + batch])).contiguous())
        feeds.append({name: x.numpy().astype(np.float32)})

    class FacesReader(CalibrationDataReader):  # type: ignore[misc]  # onnxruntime's interface
        def __init__(self) -> None:
            self._it = iter(feeds)

        def get_next(self) -> dict[str, NDArray[np.float32]] | None:
            return next(self._it, None)

        def rewind(self) -> None:
            self._it = iter(feeds)

    return FacesReader()


def _with_metadata(src: str, dst: str, entries: dict[str, str]) -> None:
    """Copy ``src``'s metadata into ``dst`` (in place), updated with ``entries``."""
    import onnx

    meta = read_metadata(onnx.load(src, load_external_data=False))
    model = onnx.load(dst)
    set_metadata(model, {**meta, **entries})
    onnx.save(model, dst)


def to_fp16(src: str, dst: str) -> None:
    """Write the fp16 variant of the fp32 model ``src`` to ``dst`` (float32 input/output kept).

    Raises:
        ValueError: ``src`` is not a float32 model onnx can read.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(src), keep_io_types=True)
    set_metadata(
        model, {**read_metadata(onnx.load(src, load_external_data=False)), "precision": "fp16"}
    )
    onnx.save(model, dst)


def _excluded(model_path: str, opts: Int8Options) -> list[str]:
    import onnx

    graph = onnx.load(model_path, load_external_data=False).graph
    names = {n.name for n in graph.node}
    unknown = sorted(set(opts.exclude_nodes) - names)
    if unknown:
        raise ValueError(f"{model_path}: no node named {', '.join(unknown)} to exclude")
    by_type = [n.name for n in graph.node if n.op_type in opts.exclude_op_types]
    return sorted(set(opts.exclude_nodes) | set(by_type))


def to_int8(
    src: str, dst: str, faces: NDArray[np.uint8], opts: Int8Options, where: str = ""
) -> None:
    """Write the static INT8 QDQ variant of the fp32 model ``src`` to ``dst``.

    Args:
        src: fp32 ONNX with a dynamic or fixed batch axis (kept as it is).
        dst: output path.
        faces: uint8 (N, H, W, 3) RGB calibration faces (``calibration_faces``).
        opts: method, per-channel, activation type, exclusions.
        where: the faces' source, recorded in the ``calibration`` metadata entry.
    Raises:
        ValueError: an unknown method or activation type, or an excluded node that is not there.
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {
        m.lower(): getattr(CalibrationMethod, m)
        for m in ("MinMax", "Entropy", "Percentile", "Distribution")
    }
    if opts.method not in methods:
        raise ValueError(f"calibration method {opts.method!r}: choose one of {', '.join(methods)}")
    if opts.activations not in ("uint8", "int8"):
        raise ValueError(f"activations {opts.activations!r}: choose uint8 or int8")
    with tempfile.TemporaryDirectory(prefix="arcscale_quant_") as tmp:
        pre = os.path.join(tmp, "pre.onnx")
        quant_pre_process(src, pre)
        quantize_static(
            pre,
            dst,
            _reader(src, faces, opts.batch),
            quant_format=QuantFormat.QDQ,
            per_channel=opts.per_channel,
            activation_type=QuantType.QUInt8 if opts.activations == "uint8" else QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=methods[opts.method],
            nodes_to_exclude=_excluded(pre, opts),
        )
    calib = f"{opts.describe()}; {len(faces)} faces" + (f" from {where}" if where else "")
    _with_metadata(src, dst, {"precision": "int8", "calibration": calib})
