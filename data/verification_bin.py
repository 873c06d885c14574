"""insightface verification sets (``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin``...): read and write.

A ``.bin`` is a pickle of ``(bins, issame_list)``: ``bins`` holds 2P encoded images (JPEG/PNG
bytes; pair p is ``bins[2p], bins[2p+1]``) and ``issame_list`` P booleans (insightface
``recognition/arcface_torch/eval/verification.py``, ``load_bin``). Files written by Python 2 are
read with ``encoding="bytes"``. Unpickling is restricted to plain containers and numpy arrays, so a
hostile file cannot run code, and nothing it builds may be larger than the file itself (a 40-byte
``bytearray(2**40)`` is refused with a ``ValueError`` naming the file, not a ``MemoryError``). This
is the project's only ``.bin`` reader (the trainer, ``tools/eval_verification.py`` and
``tools/convert_to_onnx.py --lfw-bin`` use it).
"""

import codecs
import importlib
import io
import math
import os
import pickle
import pickletools
from collections.abc import Callable, Sequence
from typing import IO, Any, NoReturn

import numpy as np
from numpy.typing import NDArray

from data.atomic import atomic_path
from data.decode import decode_image


def _import_numpy_scalar() -> Callable[..., Any]:
    """``numpy.core.multiarray.scalar`` (numpy >= 2 moved its internals to ``numpy._core``)."""
    try:
        module = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # pragma: no cover - numpy 1.x
        module = importlib.import_module("numpy.core.multiarray")
    scalar: Callable[..., Any] = module.scalar
    return scalar


_numpy_scalar = _import_numpy_scalar()


class _Refused:
    """Stands for ``numpy.ndarray`` in a pickle: only ``_reconstruct`` may use it, never a call."""


# Pickle's globals are called with whatever the stream holds: Any is the boundary here.
_Global = Callable[..., Any] | type


def _bounded_globals(limit: int) -> dict[tuple[str, str], _Global]:
    """The only globals a .bin pickle may reference (numpy arrays/bools in some converted sets),
    each wrapped so that no call allocates more than ``limit`` bytes (the file's own length): a
    few bytes of pickle can otherwise ask for ``bytearray(2**40)`` or a huge array."""

    def refuse(what: str) -> NoReturn:
        raise pickle.UnpicklingError(f"refusing {what}: larger than the file ({limit} bytes)")

    def dtype(spec: Any, *args: Any) -> np.dtype[Any]:
        d: np.dtype[Any] = np.dtype(spec, *args)
        if d.hasobject:
            raise pickle.UnpicklingError(f"refusing numpy dtype {d} (holds Python objects)")
        if d.itemsize > limit:
            refuse(f"numpy dtype of {d.itemsize} bytes")
        return d

    def reconstruct(subtype: Any, shape: Any, kind: Any) -> NDArray[Any]:
        if subtype is not _Refused:
            raise pickle.UnpicklingError(f"refusing to reconstruct a {subtype!r}")
        d = dtype(kind)
        if not all(isinstance(n, int) and n >= 0 for n in shape):
            raise pickle.UnpicklingError(f"bad array shape {shape!r}")
        if math.prod(shape) * d.itemsize > limit:
            refuse(f"an array of shape {tuple(shape)}")
        return np.ndarray(shape, d)

    def scalar(kind: Any, *args: Any) -> Any:
        return _numpy_scalar(dtype(kind), *args)

    def frombuffer(buf: Any, kind: Any, shape: Any, order: Any) -> NDArray[Any]:
        return np.frombuffer(buf, dtype(kind)).reshape(shape, order=order)

    def make_bytearray(source: Any = b"", *args: Any) -> bytearray:
        if not isinstance(source, (bytes, str)):  # what picklers write; an int would allocate
            raise pickle.UnpicklingError(f"refusing bytearray({type(source).__name__})")
        return bytearray(source, *args)

    def encode(text: Any, encoding: str = "utf-8", *args: Any) -> bytes:
        if codecs.lookup(encoding).name != "iso8859-1":  # pickle's bytes: latin-1, 1 byte/char
            raise pickle.UnpicklingError(f"refusing _codecs.encode(..., {encoding!r})")
        return codecs.encode(text, encoding, *args)

    table: dict[str, _Global] = {
        "_reconstruct": reconstruct,
        "scalar": scalar,
        "_frombuffer": frombuffer,
        "ndarray": _Refused,
        "dtype": dtype,
        "bool_": np.bool_,
        "encode": encode,
        "bytearray": make_bytearray,
    }
    modules = {
        "_reconstruct": ("numpy.core.multiarray", "numpy._core.multiarray"),
        "scalar": ("numpy.core.multiarray", "numpy._core.multiarray"),
        "_frombuffer": ("numpy.core.numeric", "numpy._core.numeric"),
        "ndarray": ("numpy",),
        "dtype": ("numpy",),
        "bool_": ("numpy",),
        "encode": ("_codecs",),
        "bytearray": ("__builtin__", "builtins"),
    }
    return {(m, name): fn for name, fn in table.items() for m in modules[name]}


_MEMO_OPS = {"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"}


def _check_opcodes(blob: bytes) -> None:
    """Walks the opcodes without building anything, so that nothing the C unpickler would
    allocate from a number in the stream exceeds the stream: counted bytes/strings must be
    there (``genops`` reads them), and a memo index may not run ahead of the objects stored so
    far (the unpickler sizes its memo table by the largest index; picklers number entries
    0, 1, 2..., Python 2's cPickle from 1).

    Raises:
        ValueError (pickle.UnpicklingError included): malformed stream or a memo index out of
            order.
    """
    stored = 0
    for op, arg, _ in pickletools.genops(blob):
        if op.name == "MEMOIZE":
            stored += 1
        elif op.name in _MEMO_OPS:
            if not isinstance(arg, int) or arg > stored + 1:  # genops decodes memo args as int
                raise pickle.UnpicklingError(f"memo index {arg} after {stored} stored objects")
            stored += op.name.endswith("PUT")


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], limit: int, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._globals = _bounded_globals(limit)

    def find_class(self, module: str, name: str) -> _Global:
        if (module, name) in self._globals:
            return self._globals[(module, name)]
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _to_bytes(item: object, path: str, i: int) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, (bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
        return item.tobytes()
    raise ValueError(f"{path}: image {i} is a {type(item).__name__}, expected encoded image bytes")


def read_bin_raw(path: str | os.PathLike[str]) -> tuple[list[bytes], NDArray[np.bool_]]:
    """Unpickle a verification .bin without decoding the images.

    Args:
        path: the ``.bin`` file.
    Returns:
        (list of 2P encoded images as bytes, np.ndarray bool (P,)).
    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: not a ``(bins, issame_list)`` pickle, an item is not bytes, or
            ``len(bins) != 2 * len(issame_list)``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: verification .bin not found")
    with open(path, "rb") as f:
        blob = f.read()
    try:
        _check_opcodes(blob)
        obj = _SafeUnpickler(io.BytesIO(blob), len(blob), encoding="bytes").load()
    except Exception as e:  # pickle raises many types for corrupt input
        raise ValueError(f"{path}: not a verification .bin pickle ({type(e).__name__}: {e})") from e
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise ValueError(
            f"{path}: expected a pickled (bins, issame_list), got {type(obj).__name__}"
        )
    bins, issame = obj
    try:
        bins, issame = list(bins), [bool(v) for v in issame]
    except TypeError as e:
        raise ValueError(f"{path}: bins and issame_list must be sequences ({e})") from e
    if len(bins) != 2 * len(issame):
        raise ValueError(
            f"{path}: {len(bins)} images for {len(issame)} pairs; a .bin needs exactly 2 per pair"
        )
    copies: dict[
        int, bytes
    ] = {}  # one copy per distinct object: a list may name one big bytearray 10**6 times
    images: list[bytes] = []
    for i, b in enumerate(bins):
        if id(b) not in copies:
            copies[id(b)] = _to_bytes(b, path, i)
        images.append(copies[id(b)])
    return images, np.asarray(issame, dtype=bool)


MAX_SIDE = 4096  # verification crops are ~112 px; a larger declared size is a decode bomb


def decode_bin_image(buf: bytes, path: str | os.PathLike[str], i: int) -> NDArray[np.uint8]:
    """Image ``i`` of the ``.bin`` at ``path`` decoded to (H, W, 3) uint8 RGB by
    ``data.decode.decode_image``, a declared side above ``MAX_SIDE`` refused before decoding.

    Raises:
        ValueError: undecodable, or too large a declared size (names the file and index).
    """
    return decode_image(buf, where=f"{path} image {i}", max_side=MAX_SIDE)


def load_bin(path: str | os.PathLike[str]) -> tuple[NDArray[np.uint8], NDArray[np.bool_]]:
    """Load and decode an insightface verification ``.bin``.

    Args:
        path: the ``.bin`` file.
    Returns:
        images: np.ndarray uint8 (2P, H, W, 3), RGB; pair p is ``images[2p], images[2p+1]``.
        issame: np.ndarray bool (P,), True where the pair shows one person.
    Raises:
        FileNotFoundError: missing file.
        ValueError: bad pickle, odd/mismatched count, an image that does not decode, declares a
            side above ``MAX_SIDE`` pixels, or images of different sizes (each message names the
            file and the image index).
    """
    encoded, issame = read_bin_raw(path)
    if not encoded:
        raise ValueError(f"{path}: contains no pairs")
    first = decode_bin_image(encoded[0], path, 0)
    try:  # 2P references to one image in the pickle cost 2P decoded copies here
        images = np.empty((len(encoded), *first.shape), dtype=np.uint8)
    except MemoryError:
        need = len(encoded) * first.nbytes / 2**30
        raise ValueError(f"{path}: {len(encoded)} images need {need:.1f} GiB decoded") from None
    images[0] = first
    for i in range(1, len(encoded)):
        img = decode_bin_image(encoded[i], path, i)
        if img.shape != first.shape:
            raise ValueError(
                f"{path}: image {i} is {img.shape[1]}x{img.shape[0]}, image 0 is "
                f"{first.shape[1]}x{first.shape[0]}; all images of a .bin must share one size"
            )
        images[i] = img
    return images, issame


def write_bin(
    path: str | os.PathLike[str], encoded_images: Sequence[bytes], issame: Sequence[bool]
) -> None:
    """Write a verification ``.bin`` that insightface's ``load_bin`` reads (pickle protocol 4).

    Written to a temporary file in the same folder and moved into place with ``os.replace``, so
    ``path`` never holds a partial file.

    Args:
        path: output ``.bin`` path.
        encoded_images: 2P encoded images (JPEG/PNG bytes), pair p = items 2p and 2p+1.
        issame: P booleans.
    Raises:
        ValueError: count mismatch or an item that is not bytes.
    """
    path = os.fspath(path)
    images = [_to_bytes(b, path, i) for i, b in enumerate(encoded_images)]
    flags = [bool(v) for v in issame]
    if len(images) != 2 * len(flags):
        raise ValueError(
            f"{path}: {len(images)} images for {len(flags)} pairs; need exactly 2 per pair"
        )
    with atomic_path(path) as tmp, open(tmp, "xb") as f:
        pickle.dump((images, flags), f, protocol=4)
