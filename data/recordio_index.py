""".idx index of a RecordIO file: text lines ``key\toffset\n`` parsed in bounded chunks into
keys and offsets, and key lookups; with ``RecordIOError``, the error every RecordIO reader raises.

Format and references: ``data/recordio.py``. Kept apart from the record framing because it is a
job of its own: a WebFace42M index has 42M lines, parsed without a Python loop per line.
"""

import os
import struct
from typing import TypeAlias

import numpy as np
from numpy.typing import ArrayLike, NDArray

# A part starts with the uint32 magic and the uint32 lrec word: no record is shorter.
PART_HEAD = struct.Struct("<II")
StrPath: TypeAlias = str | os.PathLike[str]
# Index keys in file order: consecutive keys as a range, else an int64 array.
Keys: TypeAlias = range | NDArray[np.int64]


class RecordIOError(ValueError):
    """A malformed .rec/.idx/property file; the message names the file and key and/or offset."""


_CHUNK_BYTES = 16 << 20  # .idx text parsed per chunk: bounds the temporaries at 42M entries
_DIGITS = np.zeros(256, dtype=bool)
_DIGITS[ord("0") : ord("9") + 1] = True


def _idx_line_error(
    idx_path: StrPath,
    rec_path: StrPath,
    rec_size: int,
    lineno: int,
    line: str,
    seen: set[int] | None = None,
) -> RecordIOError | None:
    """The error for one bad .idx line (None if it is fine), with the messages of the old parser."""
    fields = line.split()
    if not fields:
        return None
    try:
        if len(fields) != 2:
            raise ValueError
        key, offset = int(fields[0]), int(fields[1])
    except ValueError:
        return RecordIOError(
            f"{idx_path}:{lineno}: malformed index line {line.rstrip()!r} "
            "(expected 'key<TAB>offset')"
        )
    if seen is not None and key in seen:
        return RecordIOError(f"{idx_path}:{lineno}: duplicate key {key}")
    if offset < 0 or offset + PART_HEAD.size > rec_size:
        return RecordIOError(
            f"{idx_path}:{lineno}: key {key} offset {offset} is past the end of "
            f"{rec_path} ({rec_size} bytes)"
        )
    return None


def _line_of_entry(idx_path: StrPath, entry: int) -> int:
    """1-based line number of the ``entry``-th (0-based) non-blank line of an .idx file."""
    count = -1
    with open(idx_path, encoding="ascii", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            count += bool(line.strip())
            if count == entry:
                return lineno
    raise AssertionError(f"{idx_path}: entry {entry} past the end")


def _chunk_is_clean(chunk: bytes) -> bool:
    """True if every line of ``chunk`` (bytes ending with a newline) is blank or two integers."""
    if chunk.translate(None, b"0123456789 \t\r\n"):
        return False  # a character no index line may hold
    arr = np.frombuffer(chunk, dtype=np.uint8)
    digit = _DIGITS[arr]
    starts = np.flatnonzero(digit[1:] & ~digit[:-1]) + 1
    if digit[0]:
        starts = np.concatenate(([0], starts))
    newlines = np.flatnonzero(arr == 10)
    per_line = np.diff(np.searchsorted(starts, newlines), prepend=0)
    return bool(np.all((per_line == 0) | (per_line == 2)))


def read_index(
    idx_path: StrPath, rec_path: StrPath, rec_size: int
) -> tuple[Keys, NDArray[np.int64]]:
    """Parse a ``.idx`` file into numpy arrays, in line order (C parsing, chunk by chunk).

    Args:
        idx_path: the text index (``key<TAB>offset`` lines; blank lines are ignored).
        rec_path, rec_size: the record file named in errors and its size in bytes.
    Returns:
        ``(keys, offsets)``: ``keys`` is ``range(k0, k0 + N)`` when the keys are consecutive
        (mxnet and insightface number records 0..N-1), else an int64 array (N,); ``offsets`` is
        int64 (N,). Peak memory: the result plus one chunk's temporaries (~100 MB).
    Raises:
        RecordIOError: missing file, malformed line, duplicate key or offset past the end,
        naming the file and line (same messages as a line-by-line parser).
    """
    if not os.path.isfile(idx_path):
        raise RecordIOError(f"{idx_path}: index file not found (for {rec_path})")
    with open(idx_path, "rb") as f:
        lines = sum(block.count(b"\n") for block in iter(lambda: f.read(_CHUNK_BYTES), b""))
    offsets = np.empty(lines + 1, dtype=np.int64)  # + a last line without a newline
    key_array: NDArray[np.int64] | None = None  # filled once the keys stop being consecutive
    first, n, lineno, tail = 0, 0, 0, b""
    with open(idx_path, "rb") as f:
        while True:
            block = f.read(_CHUNK_BYTES)
            chunk = tail + block
            cut = chunk.rfind(b"\n") + 1 if block else len(chunk)
            chunk, tail = chunk[:cut], chunk[cut:]
            if chunk and not chunk.endswith(b"\n"):
                chunk += b"\n"
            if chunk:
                if not _chunk_is_clean(chunk):
                    text = chunk.decode("ascii", errors="replace").splitlines()
                    for i, line in enumerate(text, lineno + 1):
                        err = _idx_line_error(idx_path, rec_path, rec_size, i, line)
                        if err is not None:
                            raise err
                values = np.fromstring(chunk, dtype=np.int64, sep=" ")
                m = len(values) // 2
                got = values[0::2]
                if m and key_array is None:
                    first = int(got[0]) if n == 0 else first
                    if not np.array_equal(got, np.arange(first + n, first + n + m)):
                        key_array = np.empty(len(offsets), dtype=np.int64)
                        key_array[:n] = np.arange(first, first + n)
                if key_array is not None:
                    key_array[n : n + m] = got
                offsets[n : n + m] = values[1::2]
                n += m
                lineno += chunk.count(b"\n")
            if not block:
                break
    offsets = offsets[:n]
    keys: Keys
    if key_array is None:
        keys = range(first, first + n)
    else:
        keys = key_array = key_array[:n]
        if not np.all(key_array[1:] > key_array[:-1]):  # not strictly increasing: find repeats
            order = np.argsort(key_array, kind="stable")
            repeat = key_array[order[1:]] == key_array[order[:-1]]
            if repeat.any():
                entry = int(order[1:][repeat].min())
                at = _line_of_entry(idx_path, entry)
                raise RecordIOError(f"{idx_path}:{at}: duplicate key {int(key_array[entry])}")
    bad = np.flatnonzero((offsets < 0) | (offsets > rec_size - PART_HEAD.size))
    if len(bad):
        entry = int(bad[0])
        raise RecordIOError(
            f"{idx_path}:{_line_of_entry(idx_path, entry)}: key {int(keys[entry])} offset "
            f"{int(offsets[entry])} is past the end of {rec_path} ({rec_size} bytes)"
        )
    return keys, offsets


def sort_order(keys: Keys) -> NDArray[np.int32] | NDArray[np.intp] | None:
    """None when ``keys`` (range or int64 array) is increasing, else its argsort (for lookups),
    int32 below 2**31 keys."""
    if isinstance(keys, range) or len(keys) < 2 or bool(np.all(keys[1:] > keys[:-1])):
        return None
    order = np.argsort(keys, kind="stable")
    return order.astype(np.int32) if len(keys) < 2**31 else order


def lookup_offsets(
    keys: Keys,
    offsets: NDArray[np.int64],
    wanted: ArrayLike,
    order: NDArray[np.int32] | NDArray[np.intp] | None = None,
) -> tuple[NDArray[np.bool_], NDArray[np.int64]]:
    """Offsets of the keys ``wanted`` in an index ``(keys, offsets)``.

    Args:
        keys: a range (see ``read_index``) or an int64 array; offsets: int64 array, same length.
        wanted: int array-like of keys. order: ``sort_order(keys)`` (needed if keys decrease).
    Returns:
        ``(found, result)``: bool mask of the wanted keys present; their int64 offsets (0 if not).
    """
    wanted = np.asarray(wanted, dtype=np.int64).reshape(-1)
    if isinstance(keys, range):
        pos = wanted - keys.start
        found = (pos >= 0) & (pos < len(keys))
        rows = np.where(found, pos, 0)
    elif not len(keys):
        return np.zeros(len(wanted), dtype=bool), np.zeros(len(wanted), dtype=np.int64)
    else:
        sorted_keys = keys if order is None else keys[order]
        pos = np.minimum(np.searchsorted(sorted_keys, wanted), len(keys) - 1)
        found = sorted_keys[pos] == wanted
        rows = pos if order is None else order[pos]
    if not len(offsets):
        return found, np.zeros(len(wanted), dtype=np.int64)
    return found, np.where(found, offsets[rows], 0)
