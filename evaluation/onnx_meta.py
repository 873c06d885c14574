"""What an exported ONNX face model says about itself: its ``metadata_props``.

Every ``.onnx`` that ``tools/convert_to_onnx.py`` writes (fp32, and its fp16 / INT8 variants)
carries these string entries, so a deployer needs no other file to feed it correctly:

| key | example | meaning |
|---|---|---|
| ``network`` | ``r18`` | registry name of the backbone |
| ``model_kwargs`` | ``{"base_width": 16}`` | builder arguments (JSON) |
| ``embedding_size`` | ``512`` | D of the (N, D) output |
| ``input_size`` | ``112x112`` | H x W of the aligned face crop |
| ``input_layout`` | ``NCHW`` | float32 input layout |
| ``channel_order`` | ``RGB`` | order of the 3 input channels |
| ``mean``, ``std`` | ``127.5,127.5,127.5`` | per channel, pixel units (below) |
| ``flip_test`` | ``sum`` | add the mirrored crop's embedding, then L2-normalize |
| ``precision`` | ``fp32`` / ``fp16`` / ``int8`` | weights and compute of this file |
| ``config_sha256`` | hex or ``unknown`` | SHA-256 of the run's ``config.yaml`` bytes |
| ``arcscale_version`` | ``0.1.0`` | the exporting project's version |

The input is ``(pixel - mean) / std`` per channel in ``channel_order`` (insightface's
``input_mean``/``input_std``). ``Normalization`` turns the project's canonical input (RGB,
``(pixel - 127.5) / 127.5``, what ``data.decode.normalize`` gives) into the one a model's
metadata declares; ``check_options`` refuses a model whose metadata contradicts what the user
asked for (``MetadataMismatch``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from typing import Any

import torch

__all__ = [
    "CANONICAL_MEAN",
    "CANONICAL_STD",
    "MetadataMismatch",
    "Normalization",
    "build_metadata",
    "check_options",
    "config_sha256",
    "project_version",
    "read_metadata",
    "set_metadata",
]

CANONICAL_MEAN = 127.5  # data.decode.normalize: (x / 255 - 0.5) / 0.5 == (x - 127.5) / 127.5
CANONICAL_STD = 127.5
FLIP_TEST = "sum"  # embedding(image) + embedding(mirror), then L2-normalize (insightface)


class MetadataMismatch(ValueError):
    """A model's metadata contradicts the options given, itself, or its graph (CLI exit 2)."""


@dataclass(frozen=True)
class Normalization:
    """Input preparation a model expects: ``(pixel[channels] - mean) / std``, pixel in [0, 255].

    Attributes:
        mean, std: 3 floats each, in the model's channel order (pixel units).
        channel_order: ``"RGB"`` or ``"BGR"``.
    """

    mean: tuple[float, float, float] = (CANONICAL_MEAN,) * 3
    std: tuple[float, float, float] = (CANONICAL_STD,) * 3
    channel_order: str = "RGB"

    @property
    def canonical(self) -> bool:
        """True when the model takes exactly what ``data.decode.normalize`` produces."""
        return self == Normalization()

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Canonical float32 (B, 3, H, W) RGB in [-1, 1] -> the model's own input, same shape.

        Exact for the canonical case (returned unchanged); otherwise one affine map per channel.
        """
        if self.canonical:
            return x
        if self.channel_order == "BGR":
            x = torch.flip(x, dims=[1])
        mean = torch.tensor(self.mean, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(1, 3, 1, 1)
        return (x * CANONICAL_STD + CANONICAL_MEAN - mean) / std

    @classmethod
    def from_metadata(cls, meta: dict[str, str], where: str) -> Normalization:
        """The normalization ``meta`` declares; the canonical one for a model without entries.

        Raises:
            MetadataMismatch: an unknown channel order, or mean/std not 3 numbers (std > 0).
        """
        order = meta.get("channel_order", "RGB").upper()
        if order not in ("RGB", "BGR"):
            raise MetadataMismatch(f"{where}: metadata channel_order {order!r} is not RGB or BGR")
        return cls(
            _triple(meta, "mean", CANONICAL_MEAN, where),
            _triple(meta, "std", CANONICAL_STD, where),
            order,
        )


def _triple(
    meta: dict[str, str], key: str, default: float, where: str
) -> tuple[float, float, float]:
    text = meta.get(key)
    if text is None:
        return (default,) * 3
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or (key == "std" and min(values) <= 0):
        raise MetadataMismatch(f"{where}: metadata {key}={text!r} is not 3 numbers (std > 0)")
    return values[0], values[1], values[2]


def project_version() -> str:
    """The installed ``arcscale`` distribution's version, ``unknown`` when not installed."""
    try:
        return importlib_metadata.version("arcscale")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def config_sha256(path: str | os.PathLike[str] | None) -> str:
    """SHA-256 hex digest of a config file's bytes, ``unknown`` when there is none."""
    if path is None or not os.path.isfile(path):
        return "unknown"
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def build_metadata(
    network: str,
    embedding_size: int,
    model_kwargs: dict[str, Any] | None = None,
    config: str | os.PathLike[str] | None = None,
    input_size: tuple[int, int] = (112, 112),
    precision: str = "fp32",
) -> dict[str, str]:
    """The metadata entries (see the module docstring) of a model trained by this project."""
    return {
        "network": network,
        "model_kwargs": json.dumps(model_kwargs or {}, sort_keys=True),
        "embedding_size": str(int(embedding_size)),
        "input_size": f"{input_size[0]}x{input_size[1]}",
        "input_layout": "NCHW",
        "channel_order": "RGB",
        "mean": ",".join([str(CANONICAL_MEAN)] * 3),
        "std": ",".join([str(CANONICAL_STD)] * 3),
        "flip_test": FLIP_TEST,
        "precision": precision,
        "config_sha256": config_sha256(config),
        "arcscale_version": project_version(),
    }


def set_metadata(model: Any, entries: dict[str, str]) -> None:
    """Write ``entries`` into an ``onnx.ModelProto``'s ``metadata_props`` (replacing equal keys)."""
    kept = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, str(value)


def read_metadata(model: Any) -> dict[str, str]:
    """``metadata_props`` of an ``onnx.ModelProto`` or an onnxruntime session as a dict."""
    if hasattr(model, "get_modelmeta"):  # onnxruntime.InferenceSession
        return dict(model.get_modelmeta().custom_metadata_map)
    return {p.key: p.value for p in model.metadata_props}


def check_options(
    meta: dict[str, str],
    where: str,
    network: str | None = None,
    embedding_size: int | None = None,
    graph_input: tuple[Any, ...] | None = None,
    graph_output: tuple[Any, ...] | None = None,
) -> None:
    """Refuse a model whose metadata contradicts the options or its own graph.

    Args:
        meta: the model's metadata (empty: nothing to check).
        where: the model's path, for the message.
        network, embedding_size: what the user gave (None: not given).
        graph_input, graph_output: the ONNX input (N, 3, H, W) and output (N, D) shapes.
    Raises:
        MetadataMismatch: one line naming the field, the metadata's value and the other one.
    """
    checks = [
        ("network", network, "--network"),
        ("embedding_size", embedding_size, "--embedding-size"),
    ]
    for key, given, option in checks:
        if given is not None and key in meta and str(given) != meta[key]:
            raise MetadataMismatch(
                f"{where}: its metadata says {key}={meta[key]} but {option} {given} was given"
            )
    out_dim = graph_output[-1] if graph_output else None
    if (
        "embedding_size" in meta
        and isinstance(out_dim, int)
        and str(out_dim) != meta["embedding_size"]
    ):
        raise MetadataMismatch(
            f"{where}: its metadata says embedding_size={meta['embedding_size']} but the graph "
            f"outputs {out_dim}"
        )
    hw = graph_input[2:] if graph_input and len(graph_input) == 4 else None
    size_hw = f"{hw[0]}x{hw[1]}" if hw and all(isinstance(d, int) for d in hw) else None
    if "input_size" in meta and size_hw and meta["input_size"] != size_hw:
        raise MetadataMismatch(
            f"{where}: its metadata says input_size={meta['input_size']} but the graph takes "
            f"{size_hw}"
        )
