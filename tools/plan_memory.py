"""Per-device memory planner for backbone (DeepSpeed ZeRO) + Partial FC head training.

    python tools/plan_memory.py --network r100 --embedding-size 512 --num-classes 2059906 \\
        --sample-rate 0.3 --batch-size 128 --world-size 8 --zero-stage 2 --precision bf16 \\
        [--optimizer sgd] [--offload] [--grad-checkpointing] [--device-memory-gb 80]
        [--num-subcenters 1]

Prints a breakdown table (bytes per device by item and phase) and the largest ``num_classes`` that
fits ``--device-memory-gb``. The model and what it leaves out: ``trainer/memory_plan.py``;
predicted vs measured on this host: ``python benchmarks/bench_memory.py``.
"""

from __future__ import annotations

import argparse
import json
import sys

from trainer.memory_plan import OPTIMIZER_STATES, PRECISION_BYTES, plan

__all__ = ["format_plan", "main"]


def format_plan(result: dict) -> str:
    """Markdown breakdown table of a ``plan`` result, totals and the largest C that fits."""
    r = result
    lines = [
        f"{r['network']} (P = {r['params'] / 1e6:.1f} M), D = {r['embedding_size']}, "
        f"C = {r['num_classes']:,} (n = {r['classes_per_rank']:,} per rank, K = "
        f"{r['sampled_per_rank']:,} sampled), batch {r['batch_size']} x W = {r['world_size']}, "
        f"ZeRO-{r['zero_stage']}, {r['precision']}, {r['optimizer']}"
        + f", {r['num_subcenters']} sub-centers per class" * (r["num_subcenters"] > 1)
        + ", offload" * r["offload"]
        + ", checkpointing" * r["grad_checkpointing"],
        "",
        "| item | where | phase | MiB |",
        "|---|---|---|---|",
    ]
    for where in ("device", "host"):
        lines += [
            f"| {name} | {where} | {r['phase'][name]} | {b / 2**20:,.1f} |"
            for name, b in r[where].items()
        ]
    total = r["device_total"] / 2**20
    lines.append(
        f"| **peak per device** (persistent + max(backward, step)) | device | | **{total:,.1f}** |"
    )
    if r["host"]:
        lines.append(f"| peak offloaded per rank | host | | {r['host_total'] / 2**20:,.1f} |")
    if r["max_num_classes"] is not None:
        lines += [
            "",
            f"Largest num_classes fitting {r['device_memory_gb']:g} GiB per device: "
            f"{r['max_num_classes']:,}",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line (see module docstring). Returns 0, or 2 for invalid arguments."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--network", default="r100")
    p.add_argument("--embedding-size", type=int, default=512)
    p.add_argument("--num-classes", type=int, default=2_059_906)
    p.add_argument("--sample-rate", type=float, default=0.3)
    p.add_argument("--batch-size", type=int, default=128, help="per device")
    p.add_argument("--world-size", type=int, default=8)
    p.add_argument("--zero-stage", type=int, default=2, choices=(0, 1, 2, 3))
    p.add_argument("--precision", default="bf16", choices=sorted(PRECISION_BYTES))
    p.add_argument("--optimizer", default="sgd", choices=sorted(OPTIMIZER_STATES))
    p.add_argument("--offload", action="store_true")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--device-memory-gb", type=float, default=80.0, help="GiB per device")
    p.add_argument("--num-subcenters", type=int, default=1, help="Sub-center ArcFace rows/class")
    p.add_argument("--model-kwargs", default="", help="JSON, e.g. '{\"base_width\": 16}'")
    args = p.parse_args(argv)
    try:
        result = plan(
            args.network, args.embedding_size, args.num_classes, args.sample_rate,
            args.batch_size, args.world_size, args.zero_stage, args.precision, args.optimizer,
            args.offload, args.grad_checkpointing, args.device_memory_gb,
            json.loads(args.model_kwargs) if args.model_kwargs else None,
            num_subcenters=args.num_subcenters,
        )  # fmt: skip
    except (ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_plan(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
