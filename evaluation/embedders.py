"""The one place that loads a face model for evaluation or inference and embeds images with it.

A model is any of: an ONNX file (run by onnxruntime on CPU; fp32, fp16 or INT8 QDQ alike), a
consolidated ``backbone.pt`` or ``backbone.safetensors``, an arcface_torch ``backbone.pth`` or
``model.pt`` with a network name, a folder holding one of those, a step directory or a run
directory (all but ONNX through ``models.weights.load_backbone``), or a freshly initialized network
of the ``models`` registry (``build_untrained``, a baseline). ``load_embedder`` turns one into an
``Embedder``: float32 (B, 3, 112, 112) RGB in [-1, 1] -> (B, D) float32 embeddings, on CPU.

An ONNX model's ``metadata_props`` (``evaluation/onnx_meta.py``) are read, not assumed: its
declared channel order, mean and std are applied inside the ``Embedder`` (callers keep feeding
the canonical [-1, 1] RGB), and a ``network``/``embedding_size`` that contradicts the options
given is refused (``MetadataMismatch``, a ``ValueError``). A model without metadata is taken to
use the canonical input.

Embedding loops: ``embed_batch`` (one batch, optionally + its horizontal mirror, the flip test of
insightface's ``verification.py`` and arcface_torch's ``eval_ijbc.py``), ``embed_views`` and
``embed_images`` (uint8 image arrays, batch by batch). No normalization happens here: callers
(verification metrics, IJB template pooling) normalize where their protocol says.

    from evaluation.embedders import load_embedder, embed_images
    embedder = load_embedder("work_dirs/run", batch_size=128)          # or "backbone.onnx"
    emb = embed_images(embedder, images_uint8, flip=True)              # (N, D) float32
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from data.decode import normalize
from evaluation.onnx_meta import MetadataMismatch, Normalization, check_options, read_metadata

__all__ = [
    "EmbedFn",
    "Embedder",
    "MetadataMismatch",
    "onnx_embedder",
    "onnx_session",
    "torch_embedder",
    "build_untrained",
    "load_embedder",
    "check_input_size",
    "embed_batch",
    "embed_views",
    "embed_images",
]

# float32 (B, 3, H, W) CPU tensor in [-1, 1] -> (B, D) embeddings (any device/dtype).
EmbedFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Embedder:
    """A model ready to embed normalized face batches.

    Attributes:
        forward: the raw model call (see ``EmbedFn``).
        batch_size: images per model call the caller should use (a fixed-batch ONNX model's own).
        description: what was loaded (path, or network and seed), for logs and results.
        fixed_batch: the model takes exactly ``batch_size`` rows; ``__call__`` pads and splits.
        input_shape: the ONNX input shape (e.g. ``['batch', 3, 112, 112]``), None for PyTorch.
        metadata: the ONNX model's ``metadata_props`` (empty for PyTorch or an old export).
    """

    forward: EmbedFn
    batch_size: int
    description: str
    fixed_batch: bool = False
    input_shape: tuple[Any, ...] | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float32 -> (B, D) float32 CPU tensor, under ``torch.no_grad``.

        Raises:
            ValueError: the model returned something other than (B, D).
        """
        with torch.no_grad():
            if not self.fixed_batch:
                return _check_output(self.forward(x), x)
            outs = []
            for start in range(0, x.shape[0], self.batch_size):
                chunk = x[start : start + self.batch_size]
                rows = chunk.shape[0]
                if rows < self.batch_size:  # repeat the last row; the padding is dropped
                    pad = chunk[-1:].expand(self.batch_size - rows, -1, -1, -1)
                    chunk = torch.cat([chunk, pad])
                outs.append(_check_output(self.forward(chunk), chunk)[:rows])
            return torch.cat(outs)


def _check_output(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if y.ndim != 2 or y.shape[0] != x.shape[0]:
        raise ValueError(f"the model returned {tuple(y.shape)} for input {tuple(x.shape)}")
    return y.detach().float().cpu()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def onnx_session(path: str, threads: int = 0) -> Any:
    """An onnxruntime ``InferenceSession`` of ``path`` on the CPU provider.

    Raises:
        ValueError: onnxruntime cannot load the file (its first error line is kept).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's errors (InvalidProtobuf, Fail...) share no base class
        raise ValueError(f"{path}: onnxruntime cannot load it: {_first_line(e)}") from None


def onnx_embedder(
    path: str,
    batch_size: int = 64,
    threads: int = 0,
    network: str | None = None,
    embedding_size: int | None = None,
) -> Embedder:
    """An onnxruntime (CPU) session of ``path`` as an ``Embedder``, input prepared as its
    metadata declares (see the module docstring).

    Args:
        path: ONNX file with one input (N, 3, H, W) float32 and one output (N, D).
        batch_size: images per call; replaced by the model's own when its batch axis is fixed.
        threads: onnxruntime intra-op threads, 0 = its default.
        network, embedding_size: what the user expects (None: no expectation); checked against
            the metadata.
    Raises:
        ValueError: onnxruntime cannot load the file (its first error line is kept).
        MetadataMismatch: the metadata contradicts ``network``/``embedding_size``, the graph, or
            holds an unusable normalization.
    """
    sess = onnx_session(path, threads)
    inp = sess.get_inputs()[0]
    meta = read_metadata(sess)
    check_options(
        meta, path, network, embedding_size, tuple(inp.shape), tuple(sess.get_outputs()[0].shape)
    )
    norm = Normalization.from_metadata(meta, path)
    fixed = isinstance(inp.shape[0], int) and inp.shape[0] > 0

    def forward(x: torch.Tensor) -> torch.Tensor:
        x = norm.apply(x)
        out = sess.run(None, {inp.name: np.ascontiguousarray(x.numpy(), dtype=np.float32)})[0]
        return torch.from_numpy(np.asarray(out))

    return Embedder(
        forward=forward,
        batch_size=int(inp.shape[0]) if fixed else batch_size,
        description=path,
        fixed_batch=fixed,
        input_shape=tuple(inp.shape),
        metadata=meta,
    )


def torch_embedder(
    model: torch.nn.Module, device: str | torch.device = "cpu", batch_size: int = 64, desc: str = ""
) -> Embedder:
    """A PyTorch backbone, put in eval mode on ``device``, as an ``Embedder`` (fp32)."""
    model = model.to(device).eval()

    def forward(x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = model(x.to(device))
        return out

    return Embedder(forward, batch_size, desc or type(model).__name__)


def build_untrained(
    network: str, embedding_size: int, seed: int, model_kwargs: dict[str, Any] | None = None
) -> torch.nn.Module:
    """Randomly initialized backbone ``network`` from the ``models`` registry (seeded).

    Raises:
        models.UnknownModelError: ``network`` is not registered.
    """
    import models

    torch.manual_seed(seed)
    net: torch.nn.Module = models.create(
        network, embedding_size=embedding_size, **(model_kwargs or {})
    )
    return net


def load_embedder(
    model: str,
    network: str | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    embedding_size: int | None = None,
    threads: int = 0,
) -> Embedder:
    """Load ``model`` (see the module docstring for what it may be) as an ``Embedder``.

    Args:
        model: ``*.onnx`` path, or a ``backbone.pt``/``.pth``/``.safetensors``/``model.pt``
            file, a folder holding one, a step dir or run dir.
        network: registered backbone name; needed for a bare ``.pth`` without ``meta.json``;
            for ONNX, checked against the model's metadata.
        device: where a PyTorch model runs (ONNX always runs on CPU).
        batch_size: images per model call.
        embedding_size: D for a bare ``.pth`` (default: meta.json's or the builder's 512).
        threads: onnxruntime intra-op threads (0 = default).
    Raises:
        FileNotFoundError: ``model`` does not exist.
        ValueError: an unloadable file, no network known, or weights that do not fit the network.
        MetadataMismatch: an ONNX model's metadata contradicts ``network``/``embedding_size``.
        models.UnknownModelError: unknown ``network``.
    """
    if not os.path.exists(model):
        from pathlib import Path

        from models.weights import missing_reason  # a broken link or a link loop, named as such

        if os.path.lexists(model):
            raise FileNotFoundError(f"cannot use the model: {missing_reason(Path(model))}")
        raise FileNotFoundError(f"no such model file or folder: {model}")
    if model.endswith(".onnx"):
        return onnx_embedder(model, batch_size, threads, network, embedding_size)
    from models.weights import load_backbone  # heavy (models, timm): lazy

    net = load_backbone(model, network, embedding_size=embedding_size)
    return torch_embedder(net, device, batch_size, model)


def check_input_size(embedder: Embedder, height: int, width: int, where: str) -> None:
    """An ONNX model with a fixed (C, H, W) must fit the images.

    Raises:
        ValueError: naming the model's input shape, ``where`` and the images' size.
    """
    shape = embedder.input_shape
    if shape is None or len(shape) != 4:
        return
    want = (3, height, width)
    if any(isinstance(d, int) and d > 0 and d != w for d, w in zip(shape[1:], want)):
        raise ValueError(
            f"model {embedder.description} takes input {list(shape)} but {where} holds "
            f"{width}x{height} images, i.e. (N, 3, {height}, {width})"
        )


def embed_batch(embed_fn: EmbedFn, x: torch.Tensor, flip: bool = True) -> torch.Tensor:
    """Embeddings of one normalized batch, plus those of its horizontal mirror when ``flip``.

    Args:
        embed_fn: an ``Embedder`` or any ``EmbedFn``.
        x: (B, 3, H, W) float32 in [-1, 1].
        flip: add ``embed_fn(x mirrored left-right)`` (insightface's flip test).
    Returns:
        (B, D) float32 CPU tensor, not normalized.
    Raises:
        ValueError: the model output is not (B, D).
    """
    with torch.no_grad():
        out = _check_output(embed_fn(x), x)
        if flip:
            out = out + _check_output(embed_fn(torch.flip(x, dims=[3])), x)
    return out


def _check_images(images_uint8: NDArray[Any], batch_size: int) -> None:
    if images_uint8.ndim != 4 or images_uint8.shape[-1] != 3 or images_uint8.dtype != np.uint8:
        raise ValueError(
            f"images must be uint8 (N, H, W, 3), got {images_uint8.dtype} {images_uint8.shape}"
        )
    if images_uint8.shape[0] == 0 or batch_size < 1:
        raise ValueError(
            f"need N >= 1 images and batch_size >= 1, got {images_uint8.shape[0]} and {batch_size}"
        )


def _normalized(chunk: NDArray[np.uint8]) -> torch.Tensor:
    # channels_last (data.decode.normalize): the layout the trainer feeds, ~1.5x faster on CPU.
    x = normalize(torch.from_numpy(np.ascontiguousarray(chunk)))
    assert isinstance(x, torch.Tensor)  # normalize keeps the input's type
    return x


def embed_views(
    embed_fn: EmbedFn, images_uint8: NDArray[np.uint8], batch_size: int
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Embeddings of the images and of their horizontal mirrors, batch by batch, no grad.

    Args:
        embed_fn: an ``Embedder`` or any ``EmbedFn`` (moves the input to its device itself; the
            caller sets eval mode).
        images_uint8: (N, H, W, 3) uint8 RGB, N >= 1.
        batch_size: images per forward call.
    Returns:
        ``(plain, flipped)``: two (N, D) float32 arrays; ``embed_fn`` is called
        ``2 * ceil(N / batch_size)`` times (plain then flipped per batch).
    Raises:
        ValueError: bad image array or batch size, or an output of the wrong shape.
    """
    _check_images(images_uint8, batch_size)
    plain: list[NDArray[np.float32]] = []
    flipped: list[NDArray[np.float32]] = []
    with torch.no_grad():
        for start in range(0, images_uint8.shape[0], batch_size):
            x = _normalized(images_uint8[start : start + batch_size])
            plain.append(_check_output(embed_fn(x), x).numpy())
            flipped.append(_check_output(embed_fn(torch.flip(x, dims=[3])), x).numpy())
    return np.concatenate(plain), np.concatenate(flipped)


def embed_images(
    embedder: Embedder, images_uint8: NDArray[np.uint8], flip: bool = True
) -> NDArray[np.float32]:
    """(N, D) float32 embeddings of uint8 (N, H, W, 3) RGB images, with ``embedder.batch_size``
    images per call; with ``flip`` each row is ``emb(image) + emb(mirrored image)``; not
    normalized.

    Raises:
        ValueError: bad image array, or an output of the wrong shape.
    """
    _check_images(images_uint8, embedder.batch_size)
    out = [
        embed_batch(embedder, _normalized(images_uint8[s : s + embedder.batch_size]), flip).numpy()
        for s in range(0, images_uint8.shape[0], embedder.batch_size)
    ]
    return np.concatenate(out)
