"""Check a RecordIO face dataset: counts, label range, image sizes, and that every image decodes.

    python tools/inspect_rec.py REC [--idx IDX] [--num-classes C] [--workers N] [--size S]

With an index (``--idx``, default REC with ``.idx`` when that file exists) records are read by key;
without one the file is scanned and records are named by byte offset. An insightface header
(key 0, ``flag > 0``) is recognised: keys 1..label[0]-1 are images, label[0]..label[1]-1 identity
records, whose ``[start, end)`` ranges must hold images of exactly that label. Labels must lie in
[0, C) where C is ``--num-classes`` or the ``property`` file next to REC, and images must be
S x S (``--size``, else the ``property`` file's height x width, else 112x112). Exits 1 and lists
the bad keys when any record is malformed, does not decode or breaks a rule above, or when the
index is empty beside a non-empty REC.
"""

import argparse
import collections
import multiprocessing as mp
import os
import sys

import numpy as np

from data.decode import decode_image
from data.recordio import RecordIOError, RecordIOReader, read_property, record_label, unpack

_reader = None  # per-worker reader (set by _init_worker)


def check_image(record, where, num_classes=None):
    """Unpack and decode one image record.

    Returns:
        (label: int, (height, width)).
    Raises:
        ValueError (RecordIOError included): malformed record, undecodable image, label outside
            [0, num_classes).
    """
    header, payload = unpack(record)
    label = record_label(header)
    if label < 0 or (num_classes is not None and label >= num_classes):
        raise ValueError(f"{where}: label {label} outside [0, {num_classes})")
    img = decode_image(payload, where=where)
    return label, img.shape[:2]


def _init_worker(reader):
    global _reader
    _reader = reader


def _check_keys(job):
    keys, num_classes = job
    out = []
    for key in keys:
        try:
            out.append((key, *check_image(_reader.read(key), f"key {key}", num_classes), None))
        except ValueError as e:
            out.append((key, None, None, str(e)))
    return out


def _iter_results(reader, image_keys, num_classes, workers):
    if reader.idx_path is None:  # no index: one sequential scan, named by offset
        for offset, record in reader.scan():
            try:
                header, payload = unpack(record)
                if header.flag >= 2 and not payload:  # insightface header/identity record
                    yield offset, None, None, None
                    continue
                yield (offset, *check_image(record, f"offset {offset}", num_classes), None)
            except ValueError as e:
                yield offset, None, None, str(e)
        return
    chunks = [(image_keys[i : i + 256], num_classes) for i in range(0, len(image_keys), 256)]
    if workers <= 1:
        _init_worker(reader)
        for chunk in chunks:
            yield from _check_keys(chunk)
        return
    with mp.Pool(workers, initializer=_init_worker, initargs=(reader,)) as pool:
        for part in pool.imap(_check_keys, chunks):
            yield from part


def _key_range(header, limit=None):
    """``[start, end)`` keys a header or identity record declares (its two float labels), or
    None when they are not finite integers with ``0 <= start <= end`` (``<= limit`` when given):
    a record that lies must not make us walk 3e9 keys."""
    values = np.asarray(header.label, dtype=np.float64).ravel()[:2]
    if values.shape != (2,) or not np.isfinite(values).all() or (values != values.round()).any():
        return None
    start, end = int(values[0]), int(values[1])
    ok = 0 <= start <= end and (limit is None or end <= limit)
    return (start, end) if ok else None


def _header_ranges(reader, header):
    """(image keys, identity keys) an insightface header record declares, or None with the
    reason when they cannot be right: a header that lies must not make us list 2**31 keys."""
    n = len(reader)
    bounds = _key_range(header)
    if bounds is None:  # NaN/inf/fractional labels
        return None, f"header record label {header.label.tolist()} is not two key numbers"
    first_id, end_id = bounds
    if not 1 <= first_id <= end_id or end_id > 2 * n + 2:  # a few missing keys are listed
        return None, (
            f"header record declares images 1..{first_id - 1} and identities "
            f"{first_id}..{end_id - 1}, but the index lists {n} records"
        )
    return (list(range(1, first_id)), list(range(first_id, end_id))), None


def inspect(rec_path, idx_path=None, num_classes=None, workers=1, image_size=None):
    """Check every record of ``rec_path``; returns a report dict (counts, sizes, ``bad``).

    ``bad`` is a list of (key or offset, reason): malformed or undecodable records, labels out
    of range, images that are not ``image_size`` (height, width) when given, an empty index
    beside a non-empty ``.rec``, a header record whose ranges cannot be right. Raises
    RecordIOError for unreadable files.
    """
    reader = RecordIOReader(rec_path, idx_path)
    bad, identities = [], []
    image_keys, header_keys = list(reader.keys), 0
    if reader.idx_path and len(reader) == 0 and os.path.getsize(rec_path) > 0:
        bad.append(("index", f"{reader.idx_path} lists no records but {rec_path} is not empty"))
    if 0 in reader:
        header, _ = unpack(reader.read(0))
        if header.flag >= 2:  # insightface layout
            header_keys = 1
            ranges, why = _header_ranges(reader, header)
            if ranges is None:
                bad.append((0, why))
                image_keys = [k for k in image_keys if k != 0]
            else:
                image_keys, identities = ranges
                missing = [k for k in image_keys + identities if k not in reader]
                bad += [(k, "key named by the header record is not in the index") for k in missing]
                image_keys = [k for k in image_keys if k in reader]
    labels, sizes, meta = {}, collections.Counter(), 0
    for key, label, size, error in _iter_results(reader, image_keys, num_classes, workers):
        if error is not None:
            bad.append((key, error))
            continue
        if label is None:
            meta += 1
            continue
        labels[key] = label
        sizes[size] += 1
        if image_size is not None and tuple(size) != tuple(image_size):
            h, w = size
            bad.append((key, f"image is {w}x{h}, expected {image_size[1]}x{image_size[0]}"))
    last_image = max(image_keys, default=0)  # once: millions of identity records follow
    for c, key in enumerate(k for k in identities if k in reader):
        header, _ = unpack(reader.read(key))
        if header.flag < 2:
            bad.append((key, f"identity record has flag {header.flag}, expected a [start, end)"))
            continue
        bounds = _key_range(header, last_image + 1)
        if bounds is None:
            why = f"identity record range {header.label.tolist()} is not within the image keys"
            bad.append((key, f"{why} 1..{last_image}"))
            continue
        start, end = bounds
        wrong = [k for k in range(start, end) if k in labels and labels[k] != c]
        if wrong:
            bad.append(
                (key, f"identity {c} range [{start}, {end}) holds other labels: {wrong[:5]}")
            )
    values = list(labels.values())
    return {
        "records": len(reader) if reader.idx_path else None,
        "images": len(values),
        "identities": len(set(values)),
        "label_range": (min(values), max(values)) if values else None,
        "identity_records": len(identities) if reader.idx_path else meta,
        "unchecked_keys": (
            len(reader) - len(image_keys) - len(identities) - header_keys if reader.idx_path else 0
        ),
        "sizes": dict(sizes),
        "bytes": os.path.getsize(rec_path),
        "bad": bad,
    }


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("rec", help="the .rec file")
    p.add_argument("--idx", help="its .idx (default: REC with .idx if present, else a scan)")
    p.add_argument("--num-classes", type=int, help="expected classes (default: property file)")
    p.add_argument("--workers", type=int, default=1, help="decoding processes (with an index)")
    p.add_argument(
        "--size", type=int, default=None, help="expected image side (default: property, else 112)"
    )
    return p


def main(argv=None) -> int:
    """CLI entry point; 0 when every record is fine, 1 otherwise (bad keys are listed)."""
    args = build_parser().parse_args(argv)
    idx = args.idx
    if idx is None and os.path.isfile(os.path.splitext(args.rec)[0] + ".idx"):
        idx = os.path.splitext(args.rec)[0] + ".idx"
    num_classes = args.num_classes
    prop = os.path.join(os.path.dirname(os.path.abspath(args.rec)), "property")
    image_size = (args.size, args.size) if args.size else (112, 112)  # what the models take
    try:
        if os.path.isfile(prop):
            classes, height, width = read_property(prop)
            num_classes = classes if num_classes is None else num_classes
            image_size = image_size if args.size else (height, width)
        report = inspect(args.rec, idx, num_classes, args.workers, image_size)
    except (OSError, RecordIOError) as e:
        print(f"inspect_rec: error: {e}", file=sys.stderr)
        return 1
    print(f"{args.rec}: {report['bytes'] / 2**20:.1f} MiB, index: {idx or 'none (scanned)'}")
    print(
        f"  images: {report['images']}  identities: {report['identities']} "
        f"(num_classes {num_classes})  label range: {report['label_range']}  "
        f"header/identity records: {report['identity_records']}"
    )
    if report["unchecked_keys"]:
        print(f"  keys outside the header's ranges (not checked): {report['unchecked_keys']}")
    for (h, w), n in sorted(report["sizes"].items(), key=lambda kv: -kv[1]):
        print(f"  size {w}x{h}: {n} images")
    if report["bad"]:
        print(f"  BAD records: {len(report['bad'])}", file=sys.stderr)
        for key, reason in report["bad"][:50]:
            print(f"    {key}: {reason}", file=sys.stderr)
        print(f"  bad keys: {[k for k, _ in report['bad']]}", file=sys.stderr)
        return 1
    print("  all records OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
