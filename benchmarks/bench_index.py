"""Record index at WebFace42M scale: parse time and memory per rank of the shared image index.

    python benchmarks/bench_index.py [--entries 42000000] [--ranks 8] [--ids-per 20]

Writes a synthetic insightface-layout pair in a temporary folder (deleted afterwards): an
``.idx`` with a header record, ``--entries`` image records and one identity record per
``--ids-per`` images, and a sparse ``.rec`` with a real header record at offset 0. Then
``--ranks`` processes (one node) call ``data.image_index.shared_image_index``: local rank 0
parses the ``.idx`` into numpy and saves the image offsets to the cache, the others wait at a
barrier and memory-map them; every rank then touches all offsets (as an epoch's reads would).
Prints per rank: seconds until the index is ready, RSS before the index (interpreter + numpy;
the ``data`` package is loaded without its ``__init__``, so torch/DALI are not counted), peak
RSS, and index bytes per image. Never pass/fail.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import shutil
import sys
import tempfile
import time
import types

import numpy as np

from perf.memory_probe import status_bytes

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINES_PER_WRITE = 1 << 20


def _import_index_module():
    """``data.image_index`` without ``data/__init__.py`` (which imports torch and DALI)."""
    if "data" not in sys.modules:
        pkg = types.ModuleType("data")
        pkg.__path__ = [os.path.join(REPO_ROOT, "data")]
        sys.modules["data"] = pkg
    import data.image_index as image_index

    return image_index


def _status_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process in MiB."""
    return status_bytes(field) / 2**20


def write_synthetic(folder: str, entries: int, ids_per: int) -> tuple[str, str]:
    """insightface-layout ``train.rec``/``train.idx``: returns their paths."""
    from data.recordio import IRHeader, frame_record, pack

    ids = max(1, entries // ids_per)
    rec, idx = os.path.join(folder, "train.rec"), os.path.join(folder, "train.idx")
    header = frame_record(pack(IRHeader(2, [entries + 1, entries + 1 + ids], 0, 0), b""))
    step = 6000  # ~ a 112x112 JPEG record
    total = entries + ids
    with open(idx, "w") as fh:
        fh.write("0\t0\n")
        for lo in range(1, total + 1, LINES_PER_WRITE):
            keys = np.arange(lo, min(lo + LINES_PER_WRITE, total + 1))
            offsets = len(header) + (keys - 1) * step
            fh.write("".join(f"{k}\t{o}\n" for k, o in zip(keys.tolist(), offsets.tolist())))
    with open(rec, "wb") as fh:
        fh.write(header)
        fh.truncate(len(header) + total * step)  # sparse: only the header is ever read
    return rec, idx


def _rank(rank, ranks, rec, idx, cache, barrier, out):
    image_index = _import_index_module()
    base = _status_mib("VmRSS")
    t0 = time.perf_counter()
    index = image_index.shared_image_index(rec, idx, cache, rank, barrier.wait)
    ready = time.perf_counter() - t0
    touched = int(np.asarray(index.offsets[-1])) + int(index.offsets.sum() % 7)  # read every page
    peak = _status_mib("VmHWM")
    out.put((rank, ready, base, peak, _status_mib("VmRSS"), index.nbytes / len(index), touched > 0))


def run(entries: int, ranks: int, ids_per: int, workdir: str | None) -> tuple[list, float, int]:
    _import_index_module()
    folder = tempfile.mkdtemp(prefix="bench_index_", dir=workdir)
    try:
        t0 = time.perf_counter()
        rec, idx = write_synthetic(folder, entries, ids_per)
        gen_s = time.perf_counter() - t0
        idx_bytes = os.path.getsize(idx)
        ctx = mp.get_context("spawn")
        barrier, out = ctx.Barrier(ranks), ctx.Queue()
        cache = os.path.join(folder, "cache")
        procs = [
            ctx.Process(target=_rank, args=(r, ranks, rec, idx, cache, barrier, out))
            for r in range(ranks)
        ]
        for p in procs:
            p.start()
        rows = sorted(out.get() for _ in procs)
        for p in procs:
            p.join()
        return rows, gen_s, idx_bytes
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--entries", type=int, default=4_200_000, help="image records (42M: WF42M)")
    p.add_argument("--ranks", type=int, default=8, help="processes on the simulated node")
    p.add_argument("--ids-per", type=int, default=20, help="images per identity record")
    p.add_argument("--workdir", default=None, help="where the temporary files go (default tmp)")
    args = p.parse_args(argv)
    rows, gen_s, idx_bytes = run(args.entries, args.ranks, args.ids_per, args.workdir)
    print(
        f"\nShared image index, {args.entries:,} images + {args.entries // args.ids_per:,} "
        f"identity records (.idx {idx_bytes / 2**20:.0f} MiB, written in {gen_s:.0f} s), "
        f"{args.ranks} ranks on {os.cpu_count()} CPU cores, "
        f"{platform.processor() or platform.machine()}, numpy {np.__version__}\n"
    )
    print("| local rank | role | index ready (s) | RSS before (MiB) | peak RSS (MiB) | B/image |")
    print("|---|---|---:|---:|---:|---:|")
    for rank, ready, base, peak, _now, per, _ in rows:
        role = "parse .idx, save .npy" if rank == 0 else "barrier, mmap .npy"
        print(f"| {rank} | {role} | {ready:.1f} | {base:.0f} | {peak:.0f} | {per:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
