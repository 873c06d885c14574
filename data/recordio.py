"""MXNet RecordIO (.rec/.idx) reader and writer in pure Python, byte-identical to mxnet 1.9.1.

Format (dmlc-core ``include/dmlc/recordio.h`` / ``src/recordio.cc``): every part is the uint32
magic ``0xCED7230A``, a uint32 ``lrec = cflag << 29 | length``, ``length`` payload bytes and zero
padding to a multiple of 4. The writer splits a record wherever the magic word sits at a 4-byte
aligned offset inside it, drops that word, and writes parts with cflag 1 (first), 2 (middle),
3 (last); cflag 0 is a whole record. The reader re-inserts the magic word between parts. The
``.idx`` file is text lines ``key\\toffset\\n`` (offset of the record's first part), in write order.

Image records start with insightface/mxnet's ``IRHeader`` (struct ``IfQQ``, 24 bytes; see
``mxnet.recordio.pack``/``unpack``): ``flag`` = number of float32 labels that follow the header
(0 means the scalar ``label`` field is the label), then the payload (usually a JPEG).
"""

import numbers
import operator
import os
import struct
from collections.abc import Iterator, Sequence
from io import BufferedWriter, TextIOWrapper
from typing import Any, NamedTuple, SupportsIndex, TypeAlias, cast

import numpy as np
from numpy.typing import NDArray

from data.recordio_index import PART_HEAD as _PART_HEAD
from data.recordio_index import Keys, RecordIOError, StrPath, read_index, sort_order

__all__ = [
    "IR_SIZE",
    "MAGIC",
    "MAX_RECORD_BYTES",
    "IRHeader",
    "Keys",
    "Label",
    "RecordIOError",
    "RecordIOReader",
    "RecordIOWriter",
    "StrPath",
    "frame_record",
    "pack",
    "read_property",
    "record_label",
    "unpack",
    "write_property",
]

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LENGTH_BITS = 29
_LENGTH_MASK = (1 << _LENGTH_BITS) - 1
MAX_RECORD_BYTES = 1 << _LENGTH_BITS  # dmlc rejects records of 2**29 bytes or more

# An IRHeader label: a float (flag 0), float32 labels read back by ``unpack``, or labels to pack.
Label: TypeAlias = float | NDArray[np.float32] | Sequence[float]


class IRHeader(NamedTuple):
    """insightface/mxnet's image record header (struct ``IfQQ``); see the module docstring."""

    flag: int
    label: Label
    id: int
    id2: int


_IR = struct.Struct("<IfQQ")  # mxnet packs native "IfQQ": the same 24 bytes on little-endian hosts
IR_SIZE = _IR.size


def _pad(n: int) -> int:
    return (-n) % 4


def frame_record(record: bytes) -> bytes:
    """Encode one record as dmlc RecordIO parts, exactly as ``dmlc::RecordIOWriter::WriteRecord``.

    Args:
        record: the record bytes (any length below 2**29).
    Returns:
        bytes, a multiple of 4 long: one part (cflag 0) or, if the magic word occurs at 4-byte
        aligned offsets of ``record``, parts with cflag 1, 2..., 3 with those words removed.
    Raises:
        RecordIOError: record of 2**29 bytes or more.
    """
    record = bytes(record)
    n = len(record)
    if n >= MAX_RECORD_BYTES:
        raise RecordIOError(f"record of {n} bytes: RecordIO holds records below 2**29 bytes")
    out = []
    start = 0  # first byte of the current part
    pos = record.find(_MAGIC_BYTES)
    while pos != -1:
        if pos % 4 == 0:
            out.append(
                _PART_HEAD.pack(MAGIC, (1 if start == 0 else 2) << _LENGTH_BITS | pos - start)
            )
            out.append(record[start:pos])  # aligned parts need no padding
            start = pos + 4
            pos = record.find(_MAGIC_BYTES, start)
        else:
            pos = record.find(_MAGIC_BYTES, pos + 1)
    out.append(_PART_HEAD.pack(MAGIC, (3 if start else 0) << _LENGTH_BITS | n - start))
    out.append(record[start:])
    out.append(b"\0" * _pad(n))
    return b"".join(out)


def pack(header: IRHeader | tuple[int, Label, int, int], payload: bytes) -> bytes:
    """Prepend an IRHeader to ``payload``, byte-identical to ``mxnet.recordio.pack``.

    Args:
        header: IRHeader or 4-sequence (flag, label, id, id2). ``label`` is a number (then flag is
            written as 0) or an array-like (then flag = its size, the header's label field is 0 and
            the labels follow the header as float32). ``id``/``id2`` are uint64.
        payload: bytes (e.g. an encoded JPEG).
    Returns:
        bytes: 24-byte header + 4*flag label bytes + payload.
    Raises:
        RecordIOError: ``id``/``id2`` outside uint64 or a header of the wrong length.
    """
    try:
        flag, label, id_, id2 = header
    except (TypeError, ValueError) as e:
        raise RecordIOError(f"pack: header must be (flag, label, id, id2), got {header!r}") from e
    extra = b""
    if isinstance(label, numbers.Number):
        flag = 0
    else:
        labels = np.asarray(label, dtype=np.float32)
        flag, label, extra = labels.size, 0, labels.astype("<f4").tobytes()
    try:
        head = _IR.pack(flag, label, id_, id2)
    except struct.error as e:
        raise RecordIOError(f"pack: cannot encode header {header!r} as IfQQ: {e}") from e
    return head + extra + bytes(payload)


def unpack(record: bytes) -> tuple[IRHeader, bytes]:
    """Split a record into (IRHeader, payload), like ``mxnet.recordio.unpack``.

    Args:
        record: bytes as returned by ``RecordIOReader.read``.
    Returns:
        (IRHeader, bytes): ``label`` is a Python float when ``flag == 0``, else a float32
        np.ndarray of length ``flag`` (a writable copy); payload is what follows the labels.
    Raises:
        RecordIOError: record shorter than the header or than the labels it announces.
    """
    if len(record) < IR_SIZE:
        raise RecordIOError(f"unpack: record of {len(record)} bytes is shorter than IRHeader (24)")
    header = IRHeader(*_IR.unpack_from(record))
    if header.flag == 0:
        return header, bytes(record[IR_SIZE:])
    end = IR_SIZE + 4 * header.flag
    if len(record) < end:
        raise RecordIOError(
            f"unpack: header announces {header.flag} float32 labels but the record has only "
            f"{len(record) - IR_SIZE} bytes after the header"
        )
    labels = np.frombuffer(record, dtype="<f4", count=header.flag, offset=IR_SIZE).astype(
        np.float32
    )
    return header._replace(label=labels), bytes(record[end:])


def record_label(header: IRHeader) -> int:
    """The class label of an image record (int): ``label`` if it is a number (flag == 0), else
    ``label[0]`` (as insightface reads it).

    Raises:
        RecordIOError: a NaN or infinite label (a corrupt or crafted record).
    """
    label = header.label  # what ``unpack`` gives: a float when flag == 0, else an array
    value = label if isinstance(label, (int, float, np.floating, np.integer)) else label[0]
    if not np.isfinite(value):
        raise RecordIOError(f"label {float(value)} is not a finite number")
    return int(value)


class RecordIOWriter:
    """Write a .rec (and optionally .idx) file that mxnet's MXIndexedRecordIO reads back.

    Args:
        rec_path: output .rec path (truncated).
        idx_path: output .idx path or None for no index.
    Use as a context manager; ``write`` returns the record's byte offset.
    """

    def __init__(self, rec_path: StrPath, idx_path: StrPath | None = None) -> None:
        self.rec_path = str(rec_path)
        self.idx_path = None if idx_path is None else str(idx_path)
        # Held open across write() calls and closed by close()/__exit__.
        self._rec: BufferedWriter | None = open(self.rec_path, "wb")  # noqa: SIM115
        self._idx: TextIOWrapper | None = (
            open(self.idx_path, "w", encoding="ascii", newline="\n")  # noqa: SIM115
            if self.idx_path
            else None
        )
        self._offset = 0
        self._keys: set[int] = set()

    def write(self, key: SupportsIndex, record: bytes) -> int:
        """Append ``record`` (bytes) under integer ``key``; returns its byte offset in the .rec.

        Raises:
            RecordIOError: key not an integer, duplicate key, record too large, writer closed.
        """
        if self._rec is None:
            raise RecordIOError(f"{self.rec_path}: write(key={key!r}) after close()")
        try:
            key = int(key.__index__())
        except AttributeError:
            raise RecordIOError(f"{self.rec_path}: key must be an integer, got {key!r}") from None
        if key in self._keys:
            raise RecordIOError(f"{self.rec_path}: duplicate key {key}")
        try:
            framed = frame_record(record)
        except RecordIOError as e:
            raise RecordIOError(f"{self.rec_path}: key {key}: {e}") from None
        offset = self._offset
        self._rec.write(framed)
        self._offset += len(framed)
        self._keys.add(key)
        if self._idx is not None:
            self._idx.write(f"{key}\t{offset}\n")
        return offset

    def close(self) -> None:
        """Flush and close both files (idempotent)."""
        for f in (self._rec, self._idx):
            if f is not None:
                f.close()
        self._rec = self._idx = None

    def __enter__(self) -> "RecordIOWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RecordIOReader:
    """Random access (with an .idx) and sequential scans of a RecordIO file, no mxnet needed.

    Args:
        rec_path: the .rec file.
        idx_path: its .idx file, or None (then only ``scan``/``read_at`` work).
    The file is opened lazily and read with ``os.pread``; pickling drops the handle, so each
    DataLoader worker opens its own. ``keys`` lists the index keys in file (idx line) order: a
    ``range`` when they are consecutive (the usual case), else an int64 array. The index is held
    in numpy arrays: 8 B/entry, 16 B with non-consecutive keys, 28 B if they are also out of
    order (a sorted copy and int32 order for lookups; see ``index_nbytes``).
    Raises:
        RecordIOError: missing files, malformed idx line, duplicate key, offset past the end; and on
        read: wrong magic, truncated record, unexpected continuation flag, unknown key.
    """

    def __init__(self, rec_path: StrPath, idx_path: StrPath | None = None) -> None:
        self.rec_path = str(rec_path)
        self.idx_path = None if idx_path is None else str(idx_path)
        if not os.path.isfile(self.rec_path):
            raise RecordIOError(f"{self.rec_path}: record file not found")
        self._size = os.path.getsize(self.rec_path)
        self.keys: Keys = range(0)
        self.offsets: NDArray[np.int64] = np.empty(0, dtype=np.int64)
        # Both None unless the idx lists keys out of order.
        self._order: NDArray[np.int32] | NDArray[np.intp] | None = None
        self._sorted_keys: NDArray[np.int64] | None = None
        if self.idx_path:
            self.keys, self.offsets = read_index(self.idx_path, self.rec_path, self._size)
            self._order = sort_order(self.keys)
            if self._order is not None and not isinstance(self.keys, range):
                self._sorted_keys = self.keys[self._order]
        self._fd: int | None = None
        self._pid: int | None = None

    @property
    def index_nbytes(self) -> int:
        """Bytes held by the index arrays (keys cost nothing when they are a range)."""
        extra = 0 if isinstance(self.keys, range) else self.keys.nbytes
        if self._order is not None and self._sorted_keys is not None:
            extra += self._order.nbytes + self._sorted_keys.nbytes
        return self.offsets.nbytes + extra

    def __len__(self) -> int:
        return len(self.keys)

    def _row(self, key: object) -> int | None:
        """Row of ``key`` in the index, or None (O(1) for a range of keys, else a binary search)."""
        try:
            key = operator.index(cast(SupportsIndex, key))  # raises TypeError for the others
        except TypeError:
            return None
        if isinstance(self.keys, range):  # plain-int arithmetic: tools check millions of keys
            return key - self.keys.start if key in self.keys else None
        if not len(self.keys) or not -(2**63) <= key < 2**63:
            return None
        order = self._order
        sorted_keys = self.keys if self._sorted_keys is None else self._sorted_keys
        pos = int(np.searchsorted(sorted_keys, key))
        if pos == len(self.keys) or int(sorted_keys[pos]) != key:
            return None
        return pos if order is None else int(order[pos])

    def __contains__(self, key: object) -> bool:
        return self._row(key) is not None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fd"] = state["_pid"] = None
        return state

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        """Close the file handle (it reopens on the next read)."""
        fd: int | None = getattr(self, "_fd", None)  # unset if __init__ raised
        if fd is not None and self._pid == os.getpid():
            os.close(fd)
        self._fd = None

    def _pread(self, n: int, offset: int) -> bytes:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.rec_path, os.O_RDONLY), os.getpid()
        return os.pread(self._fd, n, offset)

    def offset_of(self, key: SupportsIndex) -> int:
        """Byte offset of ``key``'s first part. Raises RecordIOError for an unknown key."""
        row = self._row(key)
        if row is None:
            where = self.idx_path or "(no index given)"
            raise RecordIOError(f"{self.rec_path}: key {key!r} not in index {where}")
        return int(self.offsets[row])

    def read(self, key: SupportsIndex) -> bytes:
        """The record stored under ``key`` (bytes, magic words re-inserted between parts)."""
        offset = self.offset_of(key)
        try:
            return self.read_at(offset)[0]
        except RecordIOError as e:
            raise RecordIOError(f"{e} (key {key})") from None

    def read_at(self, offset: int) -> tuple[bytes, int]:
        """Read the record whose first part starts at byte ``offset``.

        Returns:
            (record bytes, offset of the next record).
        """
        chunks: list[bytes] = []
        pos = offset
        while True:
            head = self._pread(_PART_HEAD.size, pos)
            if len(head) < _PART_HEAD.size:
                raise RecordIOError(
                    f"{self.rec_path}: truncated record at offset {pos} "
                    f"({len(head)} of 8 header bytes)"
                )
            magic, lrec = _PART_HEAD.unpack(head)
            if magic != MAGIC:
                raise RecordIOError(
                    f"{self.rec_path}: wrong magic 0x{magic:08X} at offset {pos} "
                    f"(expected 0x{MAGIC:08X}; not a RecordIO file or a bad offset)"
                )
            cflag, length = lrec >> _LENGTH_BITS, lrec & _LENGTH_MASK
            if cflag not in ((0, 1) if pos == offset else (2, 3)):
                raise RecordIOError(
                    f"{self.rec_path}: unexpected part flag {cflag} at offset {pos} "
                    f"(record starting at offset {offset})"
                )
            padded = length + _pad(length)
            data = self._pread(padded, pos + _PART_HEAD.size) if padded else b""
            if len(data) < padded:
                raise RecordIOError(
                    f"{self.rec_path}: truncated record at offset {pos}: part of {length} bytes "
                    f"but only {len(data)} bytes left in the file"
                )
            chunks.append(data[:length])
            pos += _PART_HEAD.size + padded
            if cflag in (0, 3):
                return _MAGIC_BYTES.join(chunks), pos

    def scan(self, start: int = 0) -> Iterator[tuple[int, bytes]]:
        """Iterate over ``(offset, record bytes)`` from byte ``start`` to the end; needs no idx."""
        offset = start
        while offset < self._size:
            record, nxt = self.read_at(offset)
            yield offset, record
            offset = nxt


def read_property(dir_or_file: StrPath) -> tuple[int, int, int]:
    """Read insightface's ``property`` file: one line ``num_classes,height,width``.

    Args:
        dir_or_file: the dataset directory (holding ``property``) or the file itself.
    Returns:
        (num_classes, height, width) as ints.
    Raises:
        RecordIOError: file missing or not three positive integers.
    """
    path = os.path.join(dir_or_file, "property") if os.path.isdir(dir_or_file) else dir_or_file
    if not os.path.isfile(path):
        raise RecordIOError(f"{path}: property file not found")
    with open(path, encoding="ascii", errors="replace") as f:
        text = f.read().strip()
    try:
        values = tuple(int(v) for v in text.split(","))
        if len(values) != 3 or min(values) <= 0:
            raise ValueError
    except ValueError:
        raise RecordIOError(
            f"{path}: expected 'num_classes,height,width' (positive ints), got {text!r}"
        ) from None
    return values


def write_property(out_dir: StrPath, num_classes: int, height: int, width: int) -> str:
    """Write ``out_dir/property`` as ``num_classes,height,width``; returns its path."""
    path = os.path.join(out_dir, "property")
    with open(path, "w", encoding="ascii") as f:
        f.write(f"{int(num_classes)},{int(height)},{int(width)}\n")
    return path
