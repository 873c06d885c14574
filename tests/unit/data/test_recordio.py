"""data/recordio.py against mxnet 1.9.1 golden files, round trips and malformed input."""

import base64
import hashlib
import json
import os
import pickle
import shutil
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data.recordio import (
    IR_SIZE,
    MAGIC,
    IRHeader,
    RecordIOError,
    RecordIOReader,
    RecordIOWriter,
    frame_record,
    pack,
    read_property,
    unpack,
    write_property,
)
from tests.helpers.paths import FIXTURES

GOLDEN_REC = os.path.join(FIXTURES, "golden.rec")
GOLDEN_IDX = os.path.join(FIXTURES, "golden.idx")
MAGIC_BYTES = struct.pack("<I", MAGIC)


@pytest.fixture(scope="module")
def expected():
    with open(os.path.join(FIXTURES, "golden_expected.json")) as f:
        return json.load(f)


def sha(b):
    return hashlib.sha256(b).hexdigest()


def file_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def part_flags(data):
    """cflag of every part of a RecordIO byte string, parsed independently of data/recordio.py."""
    flags, pos = [], 0
    while pos < len(data):
        magic, lrec = struct.unpack_from("<II", data, pos)
        assert magic == MAGIC
        length = lrec & ((1 << 29) - 1)
        flags.append(lrec >> 29)
        pos += 8 + length + (-length) % 4
    return flags


def test_golden_fixture_is_intact(expected):
    assert sha(file_bytes(GOLDEN_REC)) == expected["rec_sha256"]
    assert sha(file_bytes(GOLDEN_IDX)) == expected["idx_sha256"]
    # mxnet did split some records into parts, so the fixture exercises cflag 1/2/3
    assert {1, 2, 3} <= set(part_flags(file_bytes(GOLDEN_REC)))


def test_reader_matches_mxnet(expected):
    reader = RecordIOReader(GOLDEN_REC, GOLDEN_IDX)
    assert list(reader.keys) == [r["key"] for r in expected["records"]]
    assert len(reader) == len(expected["records"])
    for r in expected["records"]:
        assert r["key"] in reader
        assert reader.offset_of(r["key"]) == r["offset"]
        record = reader.read(r["key"])
        assert sha(record) == r["record_sha256"], r["key"]
        if r["kind"] == "raw":
            assert sha(record) == r["payload_sha256"]
            continue
        header, payload = unpack(record)
        want = r["header"]
        assert (header.flag, header.id, header.id2) == (want["flag"], want["id"], want["id2"])
        if want["flag"] == 0:
            assert isinstance(header.label, float) and header.label == want["label"]
        else:
            assert header.label.dtype == np.float32
            np.testing.assert_array_equal(header.label, np.float32(want["label"]))
        assert sha(payload) == r["payload_sha256"], r["key"]
    assert 12345 not in reader


def test_scan_matches_mxnet_sequential_read(expected):
    reader = RecordIOReader(GOLDEN_REC)  # no index needed
    scanned = list(reader.scan())
    assert [sha(rec) for _, rec in scanned] == expected["scan_sha256"]
    assert [off for off, _ in scanned] == [r["offset"] for r in expected["records"]]


def test_writer_is_byte_identical_to_mxnet(expected, tmp_path):
    rec, idx = tmp_path / "x.rec", tmp_path / "x.idx"
    with RecordIOWriter(rec, idx) as writer:
        for r in expected["records"]:
            payload = base64.b64decode(r["payload_b64"])
            if r["kind"] == "packed":
                h = r["header"]
                payload = pack(IRHeader(h["flag"], h["label"], h["id"], h["id2"]), payload)
            assert writer.write(r["key"], payload) == r["offset"]
    assert file_bytes(rec) == file_bytes(GOLDEN_REC)
    assert file_bytes(idx) == file_bytes(GOLDEN_IDX)


def test_pack_unpack_match_mxnet_layout():
    rec = pack(IRHeader(9, 3.5, 7, 2**63), b"jpeg")  # scalar label: flag forced to 0
    assert rec == struct.pack("<IfQQ", 0, 3.5, 7, 2**63) + b"jpeg"
    rec = pack(IRHeader(0, [1, 2.5], 1, 0), b"")  # array label: flag = size, label field = 0
    assert rec == struct.pack("<IfQQ", 2, 0.0, 1, 0) + np.float32([1, 2.5]).tobytes()
    header, payload = unpack(rec)
    assert header.flag == 2 and payload == b""
    assert header.label.flags.writeable
    with pytest.raises(RecordIOError, match="shorter than IRHeader"):
        unpack(b"\0" * (IR_SIZE - 1))
    with pytest.raises(RecordIOError, match="announces 3 float32 labels"):
        unpack(struct.pack("<IfQQ", 3, 0.0, 0, 0) + b"\0" * 8)
    with pytest.raises(RecordIOError, match="IfQQ"):
        pack(IRHeader(0, 1.0, -1, 0), b"")


def test_frame_record_splits_only_at_aligned_magic():
    assert part_flags(frame_record(b"ab" + MAGIC_BYTES + b"cd")) == [0]
    assert part_flags(frame_record(MAGIC_BYTES)) == [1, 3]
    assert part_flags(frame_record(b"abcd" + MAGIC_BYTES + MAGIC_BYTES + b"e")) == [1, 2, 3]
    assert len(frame_record(b"abcde")) == 8 + 8  # padded to 4 bytes


records = st.lists(st.sampled_from([b"", b"x", b"ab", MAGIC_BYTES, b"\x0a\x23", b"\xd7\xce"]))
payloads = st.one_of(st.binary(max_size=64), records.map(b"".join))


@settings(max_examples=150, deadline=None)
@given(
    items=st.lists(
        st.tuples(
            payloads,
            st.one_of(
                st.floats(-1e6, 1e6, width=32),
                st.lists(st.floats(-1e6, 1e6, width=32), min_size=1, max_size=4),
            ),
            st.booleans(),
        ),
        max_size=12,
    ),
    keys=st.lists(st.integers(0, 2**62), unique=True, min_size=12, max_size=12),
)
def test_round_trip(tmp_path_factory, items, keys):
    folder = tmp_path_factory.mktemp("rt")
    rec, idx = folder / "r.rec", folder / "r.idx"
    written = []
    with RecordIOWriter(rec, idx) as writer:
        for key, (payload, label, packed) in zip(keys, items):
            record = pack(IRHeader(0, label, key, 0), payload) if packed else payload
            writer.write(key, record)
            written.append((key, record, payload, label, packed))
    reader = RecordIOReader(rec, idx)
    assert list(reader.keys) == [w[0] for w in written]
    for key, record, payload, label, packed in written:
        assert reader.read(key) == record
        if packed:
            header, body = unpack(reader.read(key))
            assert body == payload
            np.testing.assert_array_equal(header.label, np.float32(label))
    assert [r for _, r in RecordIOReader(rec).scan()] == [w[1] for w in written]


def test_reader_is_picklable_and_lazy(tmp_path):
    reader = RecordIOReader(GOLDEN_REC, GOLDEN_IDX)
    first = reader.read(1)
    assert reader._fd is not None
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._fd is None
    assert clone.read(1) == first and list(clone.keys) == list(reader.keys)
    reader.close()
    assert reader.read(1) == first  # reopens after close


def test_writer_rejects_bad_keys(tmp_path):
    with RecordIOWriter(tmp_path / "a.rec", tmp_path / "a.idx") as writer:
        writer.write(np.int64(3), b"x")
        with pytest.raises(RecordIOError, match="duplicate key 3"):
            writer.write(3, b"y")
        with pytest.raises(RecordIOError, match="must be an integer"):
            writer.write(1.5, b"y")
    with pytest.raises(RecordIOError, match="after close"):
        writer.write(4, b"z")


@pytest.fixture
def golden_copy(tmp_path):
    rec, idx = tmp_path / "g.rec", tmp_path / "g.idx"
    shutil.copy(GOLDEN_REC, rec)
    shutil.copy(GOLDEN_IDX, idx)
    return rec, idx


def test_missing_files_are_named(tmp_path, golden_copy):
    rec, idx = golden_copy
    with pytest.raises(RecordIOError, match="nope.rec: record file not found"):
        RecordIOReader(tmp_path / "nope.rec", idx)
    with pytest.raises(RecordIOError, match="nope.idx: index file not found"):
        RecordIOReader(rec, tmp_path / "nope.idx")
    with pytest.raises(RecordIOError, match=r"g\.rec: key 77 not in index"):
        RecordIOReader(rec, idx).read(77)


@pytest.mark.parametrize(
    "line, match",
    [
        ("5\n", "g.idx:20: malformed index line"),
        ("x\t4\n", "g.idx:20: malformed"),
        ("1\t40\n", "g.idx:20: duplicate key 1"),
        ("50\t999999\n", "g.idx:20: key 50 offset 999999 is past the end"),
    ],
)
def test_bad_idx_lines(golden_copy, line, match):
    rec, idx = golden_copy
    with open(idx, "a") as f:
        f.write(line)
    with pytest.raises(RecordIOError, match=match):
        RecordIOReader(rec, idx)


def test_wrong_magic_names_file_key_and_offset(golden_copy, expected):
    rec, idx = golden_copy
    offset = expected["records"][2]["offset"]  # key 2
    data = bytearray(file_bytes(rec))
    data[offset] ^= 0xFF
    rec.write_bytes(bytes(data))
    with pytest.raises(RecordIOError, match=rf"g\.rec: wrong magic .* at offset {offset}.*key 2"):
        RecordIOReader(rec, idx).read(2)
    with pytest.raises(RecordIOError, match=f"offset {offset}"):
        list(RecordIOReader(rec).scan())


def test_truncated_record_names_offset(golden_copy, expected):
    rec, idx = golden_copy
    last = expected["records"][-1]
    rec.write_bytes(file_bytes(rec)[:-6])  # cut into the last part's payload
    reader = RecordIOReader(rec, idx)
    with pytest.raises(RecordIOError, match=r"g\.rec: truncated record at offset \d+.*key 1006"):
        reader.read(last["key"])
    assert reader.read(1) == RecordIOReader(GOLDEN_REC, GOLDEN_IDX).read(1)
    rec.write_bytes(file_bytes(GOLDEN_REC) + b"\x0a\x23")  # trailing partial header
    with pytest.raises(RecordIOError, match=r"truncated record at offset 5008"):
        list(RecordIOReader(rec).scan())


def test_offset_into_the_middle_of_a_multipart_record(golden_copy, expected):
    rec, idx = golden_copy
    aligned = next(r for r in expected["records"] if r["key"] == 1000)
    second_part = aligned["offset"] + 8 + 24  # first part holds the 24-byte IRHeader
    with open(idx, "a") as f:
        f.write(f"77\t{second_part}\n")
    with pytest.raises(RecordIOError, match=f"unexpected part flag 2 at offset {second_part}"):
        RecordIOReader(rec, idx).read(77)


def test_property_file(tmp_path):
    write_property(tmp_path, 93, 112, 112)
    assert read_property(tmp_path) == (93, 112, 112)
    assert read_property(tmp_path / "property") == (93, 112, 112)
    (tmp_path / "property").write_text("93,112\n")
    with pytest.raises(RecordIOError, match="property: expected 'num_classes,height,width'"):
        read_property(tmp_path)
    with pytest.raises(RecordIOError, match="property file not found"):
        read_property(tmp_path / "missing")


def _reference_index(idx_path):
    """The .idx parsed line by line, as the dict-based reader did: [(key, offset)]."""
    with open(idx_path) as f:
        return [tuple(int(v) for v in line.split()) for line in f if line.strip()]


@pytest.mark.parametrize("consecutive", [True, False])
def test_numpy_index_matches_line_parse(tmp_path, monkeypatch, consecutive):
    import data.recordio_index as recordio_index

    monkeypatch.setattr(recordio_index, "_CHUNK_BYTES", 64)  # many chunks, lines cut at boundaries
    rng = np.random.default_rng(0)
    n = 500
    keys = np.arange(7, 7 + n) if consecutive else rng.permutation(10 * n)[:n] + 2**40
    offsets = np.sort(rng.integers(0, 10**6, size=n))
    rec, idx = tmp_path / "a.rec", tmp_path / "a.idx"
    rec.write_bytes(b"\0" * (10**6 + 8))
    text = "".join(f"{k}\t{o}\n" for k, o in zip(keys.tolist(), offsets.tolist()))
    idx.write_text(text.replace("\n", "\n\n", 3)[:-1])  # blank lines, no final newline
    reader = RecordIOReader(rec, idx)
    ref = _reference_index(idx)
    assert list(reader.keys) == [k for k, _ in ref] and reader.offsets.tolist() == [
        o for _, o in ref
    ]
    assert isinstance(reader.keys, range) == consecutive
    assert all(reader.offset_of(k) == o for k, o in ref[::37])
    assert int(keys.max()) + 1 not in reader and 1.5 not in reader
    assert reader.offsets.dtype == np.int64
    # the dict/list/set index took ~158 B per entry; the arrays take 8 B (keys as a range),
    # 28 B when the keys are neither consecutive nor increasing (keys, sorted keys, int32 order)
    assert reader.index_nbytes / n <= (8 if consecutive else 28)
