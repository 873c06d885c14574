"""Image decoding and the ArcFace input normalization.

The one decoder entry point of the project (`decode_image`: the training loaders, `.bin` sets,
IJB, and every tool that reads images). Before any pixel is decoded the size the header declares
is read (`declared_size`: JPEG through simplejpeg, PNG from its IHDR, other formats through
Pillow's lazy open) and checked against a pixel limit, so a few-hundred-byte file declaring
50000x50000 pixels is one `ValueError`, not an 8 GB allocation. JPEG then goes through simplejpeg
(libjpeg-turbo, no Python-side copies), everything else through OpenCV, and Pillow is the last
resort for formats neither handles (e.g. some CMYK JPEGs).
"""

from __future__ import annotations

import io
import struct
import warnings
from typing import overload

import cv2
import numpy as np
import simplejpeg
import torch
from numpy.typing import NDArray
from PIL import Image

__all__ = ["MAX_PIXELS", "declared_size", "decode_image", "normalize"]

# Pillow's decompression-bomb threshold (~89.5 M pixels, ~256 MB decoded as RGB): far above any
# face photo, far below what a hostile header can declare.
MAX_PIXELS = int(Image.MAX_IMAGE_PIXELS or 89_478_485)
_PNG = b"\x89PNG\r\n\x1a\n"

# OpenCV would otherwise spawn its own thread pool inside every DataLoader worker.
cv2.setNumThreads(1)


def _to_rgb3(img: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Gray (H, W) / (H, W, 1) or RGBA (H, W, 4) -> (H, W, 3) RGB uint8, C-contiguous."""
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    elif img.shape[2] == 4:
        img = img[:, :, :3]
    return np.ascontiguousarray(img)


def _decode_jpeg(buf: bytes) -> NDArray[np.uint8] | None:
    try:
        img: NDArray[np.uint8] = simplejpeg.decode_jpeg(buf, colorspace="RGB")
        return img
    except (ValueError, RuntimeError):
        return None  # e.g. CMYK or damaged headers: let the generic decoders try


def _decode_cv2(buf: bytes) -> NDArray[np.uint8] | None:
    arr = np.frombuffer(buf, dtype=np.uint8)
    img = cv2.imdecode(arr, cv2.IMREAD_UNCHANGED)
    if img is None or img.dtype != np.uint8:
        return None  # 16-bit PNGs and the like go to PIL, which converts to 8-bit
    if img.ndim == 3 and img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    elif img.ndim == 3 and img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    return np.asarray(img, dtype=np.uint8)  # uint8 already: the same array, typed


def _decode_pil(buf: bytes) -> NDArray[np.uint8] | None:
    try:
        with Image.open(io.BytesIO(buf)) as im:
            return np.asarray(im.convert("RGB"))
    except Exception:  # PIL raises many unrelated types for bad data
        return None


def declared_size(buf: bytes) -> tuple[int, int] | None:
    """(height, width) an encoded image's header declares, read without decoding a pixel;
    None when no header can be read (not an image, or a damaged one).

    Raises:
        PIL.Image.DecompressionBombError: Pillow's own refusal of a header over twice its limit.
    """
    if simplejpeg.is_jpeg(buf):
        try:
            h, w = simplejpeg.decode_jpeg_header(buf)[:2]
            return int(h), int(w)
        except (ValueError, RuntimeError):
            pass  # damaged or unusual header: Pillow may still read it
    if buf[:8] == _PNG and len(buf) >= 24:
        w, h = struct.unpack(">II", buf[16:24])  # IHDR: width, height
        return int(h), int(w)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(buf)) as im:  # lazy: reads the header only
                return int(im.height), int(im.width)
    except Image.DecompressionBombError:
        raise  # Pillow refused the header's size itself (`check_size` reports it)
    except Exception:  # Pillow raises many unrelated types for bad data
        return None


def check_size(buf: bytes, where: str, max_pixels: int, max_side: int | None = None) -> None:
    """Refuses an image whose header declares more than `max_pixels` pixels or a side above
    `max_side`, before it is decoded.

    Raises:
        ValueError: one line naming `where`, the declared size and the limit.
    """
    try:
        size = declared_size(buf)
    except Image.DecompressionBombError as e:
        raise ValueError(f"{where}: {e} (refused before decoding)") from None
    if size is None:
        return  # not an image at all: the decoders fail on it and say so
    h, w = size
    if max_side is not None and max(h, w) > max_side:
        raise ValueError(f"{where}: declares a {max(h, w)}-pixel side (limit {max_side})")
    if h * w > max_pixels:
        raise ValueError(
            f"{where}: declares {w}x{h} pixels, over the limit of {max_pixels} "
            "(refused before decoding: a decompression bomb or a wrong file)"
        )


def decode_image(
    buf: bytes,
    where: str = "<bytes>",
    max_pixels: int | None = None,
    max_side: int | None = None,
) -> NDArray[np.uint8]:
    """Decode an encoded image (JPEG, PNG, BMP, WebP, ...) to RGB, after checking the size its
    header declares (`check_size`): no decoder runs on a file that declares more pixels.

    Args:
        buf: encoded image bytes.
        where: names the source in error messages, e.g. ``"train.rec key 17"``.
        max_pixels: pixel limit (height x width); None: `MAX_PIXELS`.
        max_side: limit on the longer side, None for none (`.bin` crops: 4096).

    Returns:
        ``np.ndarray`` uint8 of shape (H, W, 3), RGB channel order, C-contiguous.
        Gray images are replicated to three channels; alpha is dropped.

    Raises:
        ValueError: if ``buf`` is empty, declares too many pixels, or no decoder can read it;
            the message contains ``where``.
    """
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise ValueError(f"{where}: expected encoded image bytes, got {type(buf).__name__}")
    buf = bytes(buf)
    if len(buf) == 0:
        raise ValueError(f"{where}: empty image payload")
    check_size(buf, where, MAX_PIXELS if max_pixels is None else max_pixels, max_side)
    img = None
    if simplejpeg.is_jpeg(buf):
        img = _decode_jpeg(buf)
    if img is None:
        img = _decode_cv2(buf)
    if img is None:
        img = _decode_pil(buf)
    if img is None:
        head = buf[:8].hex()
        raise ValueError(
            f"{where}: cannot decode image ({len(buf)} bytes, starts with 0x{head}); "
            "not a JPEG/PNG/BMP/WebP file or corrupted"
        )
    return _to_rgb3(img)


@overload
def normalize(
    images: torch.Tensor,
    dtype: torch.dtype = ...,
    memory_format: torch.memory_format = ...,
) -> torch.Tensor: ...


@overload
def normalize(
    images: NDArray[np.uint8],
    dtype: torch.dtype = ...,
    memory_format: torch.memory_format = ...,
) -> NDArray[np.float32]: ...


def normalize(
    images: NDArray[np.uint8] | torch.Tensor,
    dtype: torch.dtype = torch.float32,
    memory_format: torch.memory_format = torch.preserve_format,
) -> NDArray[np.float32] | torch.Tensor:
    """Map uint8 RGB images to the ArcFace input range: ``(x / 255 - 0.5) / 0.5`` in [-1, 1].

    The one input normalization of the project: the training step (on the device, see
    ``trainer/device_batch.py``), verification and the benchmarks all call it.
    Reference: insightface arcface_torch ``dataset.py`` (ToTensor + Normalize(0.5, 0.5)).

    Args:
        images: uint8, shape (H, W, 3) or (N, H, W, 3) (channels last), numpy array or torch
            tensor (any device; the arithmetic runs where the tensor is).
        dtype: torch output dtype (e.g. the engine's bf16); computed in float32, then cast.
            Numpy input always gives float32.
        memory_format: torch layout of a batch; ``preserve_format`` means
            ``torch.channels_last``. Ignored for numpy and single images.

    Returns:
        shape (3, H, W) or (N, 3, H, W) (channels first), same container type (and device for
        tensors) as the input. A torch batch (N, H, W, 3) comes back by default in
        ``torch.channels_last`` memory format (the permuted view needs no copy), which CPU
        convolutions read ~1.5x faster in the forward than NCHW-contiguous input.

    Raises:
        ValueError: wrong dtype, rank or channel count.
    """
    if images.dtype not in (np.uint8, torch.uint8):
        raise ValueError(f"normalize: expected uint8 images, got dtype {images.dtype}")
    if images.ndim not in (3, 4) or images.shape[-1] != 3:
        raise ValueError(
            f"normalize: expected shape (H, W, 3) or (N, H, W, 3), got {tuple(images.shape)}"
        )
    perm = (2, 0, 1) if images.ndim == 3 else (0, 3, 1, 2)
    if isinstance(images, torch.Tensor):
        x = images.permute(*perm).to(torch.float32)
        if images.ndim == 3:
            fmt = torch.contiguous_format
        elif memory_format == torch.preserve_format:
            fmt = torch.channels_last
        else:
            fmt = memory_format
        x = x.div_(127.5).sub_(1.0)
        if x.dtype != dtype:
            x = x.to(dtype, memory_format=fmt)  # cast and layout in one pass
        return x.contiguous(memory_format=fmt)  # no copy when the layout already matches
    arr = images.transpose(perm).astype(np.float32)
    # (x/255 - 0.5)/0.5 == x/127.5 - 1 up to one float32 rounding
    return np.ascontiguousarray(arr / np.float32(127.5) - np.float32(1.0))
