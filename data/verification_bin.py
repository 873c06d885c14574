"""insightface verification sets (``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin``...): read and write.

A ``.bin`` is a pickle of ``(bins, issame_list)``: ``bins`` holds 2P encoded images (JPEG/PNG
bytes; pair p is ``bins[2p], bins[2p+1]``) and ``issame_list`` P booleans (insightface
``recognition/arcface_torch/eval/verification.py``, ``load_bin``). Files written by Python 2 are
read with ``encoding="bytes"``. Unpickling is restricted to plain containers and numpy arrays, so a
hostile file cannot run code.
"""

import io
import os
import pickle
import tempfile
from collections.abc import Sequence

import numpy as np

from data.decode import decode_image

# The only globals a .bin pickle may reference (numpy arrays/bools in some converted sets).
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy", "bool_"),
    ("_codecs", "encode"),
    ("__builtin__", "bytearray"),
    ("builtins", "bytearray"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _to_bytes(item, path, i):
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
        return item.tobytes()
    raise ValueError(f"{path}: image {i} is a {type(item).__name__}, expected encoded image bytes")


def read_bin_raw(path):
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
        obj = _SafeUnpickler(io.BytesIO(blob), encoding="bytes").load()
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
    images = [_to_bytes(b, path, i) for i, b in enumerate(bins)]
    return images, np.asarray(issame, dtype=bool)


def load_bin(path):
    """Load and decode an insightface verification ``.bin``.

    Args:
        path: the ``.bin`` file.
    Returns:
        images: np.ndarray uint8 (2P, H, W, 3), RGB; pair p is ``images[2p], images[2p+1]``.
        issame: np.ndarray bool (P,), True where the pair shows one person.
    Raises:
        FileNotFoundError: missing file.
        ValueError: bad pickle, odd/mismatched count, an image that does not decode, or images of
            different sizes (each message names the file and the image index).
    """
    encoded, issame = read_bin_raw(path)
    if not encoded:
        raise ValueError(f"{path}: contains no pairs")
    first = decode_image(encoded[0], where=f"{path} image 0")
    images = np.empty((len(encoded), *first.shape), dtype=np.uint8)
    images[0] = first
    for i in range(1, len(encoded)):
        img = decode_image(encoded[i], where=f"{path} image {i}")
        if img.shape != first.shape:
            raise ValueError(
                f"{path}: image {i} is {img.shape[1]}x{img.shape[0]}, image 0 is "
                f"{first.shape[1]}x{first.shape[0]}; all images of a .bin must share one size"
            )
        images[i] = img
    return images, issame


def write_bin(path, encoded_images: Sequence[bytes], issame: Sequence[bool]):
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
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".bin", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump((images, flags), f, protocol=4)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
