"""Data-loading throughput: CPU loader (1 and 2 workers) and the DALI CPU pipeline.

    python benchmarks/bench_data.py [--rec work_dirs/lfw_demo/train.rec] [--batch-size 128]
        [--batches 40] [--dali-threads 2]

Reads the LFW demo ``.rec`` (built as ``tools/prepare_lfw.py`` does when missing) and prints a
Markdown table of images/s per rank, decode + flip + normalize included, after one warm-up
batch (worker start-up and pipeline build are reported separately). Speed only, never pass/fail.

It also prints the mean number of distinct identities per batch of each loader (same seed):
the LFW demo ``.rec`` is sorted by identity, so a loader that shuffles only locally would show
far fewer than the global shuffle. Both loaders draw one global permutation per epoch
(``data/sampler.py``) and must agree within 5%.
"""

from __future__ import annotations

import argparse
import os
import platform

import torch

from data.dali_loader import build_dali_loader
from data.datasets import RecordDataset
from data.face_jpeg import default_workers
from data.lfw import DEFAULT_LFW
from data.lfw_demo import DEFAULT_OUT, build_demo_split
from data.loader import build_cpu_loader
from perf.loader_speed import measure
from trainer.device_batch import DevicePrefetcher

DEFAULT_REC = os.path.join(DEFAULT_OUT, "train.rec")


def ensure_rec(rec_path: str) -> None:
    """Build the LFW demo split (``data/lfw_demo.py``, as ``tools/prepare_lfw.py`` does) if
    ``rec_path`` is missing."""
    if os.path.isfile(rec_path):
        return
    try:
        build_demo_split(
            DEFAULT_LFW, os.path.dirname(rec_path), workers=default_workers(), progress=False
        )
    except (OSError, ValueError) as e:
        raise SystemExit(f"bench_data: could not build {rec_path} from {DEFAULT_LFW}: {e}") from e


def run(args: argparse.Namespace) -> list[tuple[str, dict]]:
    ensure_rec(args.rec)
    ds = RecordDataset(args.rec)
    rows = []
    for workers in (1, 2):
        loader = build_cpu_loader(ds, args.batch_size, 0, 1, seed=0, num_workers=workers)
        loader = DevicePrefetcher(loader, torch.device("cpu"))  # uint8 -> normalized, as the step
        rows.append(
            (f"CPU loader, {workers} worker{'s' * (workers > 1)}", measure(loader, args.batches))
        )
    dali = build_dali_loader(
        args.rec, None, args.batch_size, 0, 1, seed=0, num_threads=args.dali_threads
    )
    rows.append((f"DALI CPU pipeline, {args.dali_threads} threads", measure(dali, args.batches)))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rec", default=DEFAULT_REC, help="RecordIO file (default: LFW demo)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=40, help="timed batches after one warm-up")
    p.add_argument("--dali-threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # the main process only normalizes (workers decode and flip)
    rows = run(args)
    print(
        f"\nData loading, {args.rec} (batch {args.batch_size}, 112x112 JPEG, flip+normalize), "
        f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}\n"
    )
    print("| loader | images/s | timed images | start-up + first batch (s) | identities/batch |")
    print("|---|---:|---:|---:|---:|")
    for name, r in rows:
        print(
            f"| {name} | {r['img_per_s']:.0f} | {r['images']} | {r['startup_s']:.2f} "
            f"| {r['ids_per_batch']:.1f} |"
        )
    cpu, dali = rows[0][1]["ids_per_batch"], rows[-1][1]["ids_per_batch"]
    gap = abs(dali - cpu) / cpu
    print(
        f"\nDistinct identities per {args.batch_size}-image batch: CPU {cpu:.1f}, DALI {dali:.1f} "
        f"({100 * gap:.1f}% apart; {'within' if gap <= 0.05 else 'NOT within'} 5%)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
