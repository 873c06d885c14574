"""Training-step throughput and peak memory on synthetic data, one process (world size 1).

    python benchmarks/bench_train.py [--networks mbf,r18] [--precisions bf16,fp32]
        [--stages 1,2,3] [--checkpointing off,on] [--batch 8] [--steps 3] [--warmup 1]
        [--channels-last] [--smoke] [--json out.json]

Every case builds the engine and head exactly as training does (`trainer.run.build_engine` /
`build_head`: Accelerate + DeepSpeed with the JSON of `trainer.engine.build_ds_config`) and times
``--steps`` calls of the trainer's own `trainer.step.train_step` after ``--warmup`` untimed ones.
Each step is cut, synchronize-then-time, at hooks of the real step into data (loader ``next()``
and the uint8 copy + normalize), backbone forward, head forward, backward and optimizer
(``engine.step`` + head unscale/step). By default each case runs in a fresh subprocess, which
isolates its peak memory and DeepSpeed's global state.

Peak memory: on GPU ``torch.cuda.max_memory_allocated``; on CPU the peak resident set (``VmHWM``
of ``/proc/self/status``) minus the resident set before the model was built, reported twice:
over the whole case (initialization included) and over the timed steps only (``VmHWM`` is reset
through ``/proc/self/clear_refs`` after the warm-up). Speed and memory only, never pass/fail.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
from dataclasses import asdict

from perf.isolated import run_child, run_isolated
from perf.train_step import PHASES, Case, has_cuda, run_case

__all__ = [
    "PUBLISHED",
    "default_cases",
    "format_table",
    "main",
]

# insightface arcface_torch docs/speed_benchmark.md and README (8x V100 32GB, fp16): published,
# not measured here. (setting, samples/s, MB per GPU or "" when not published)
PUBLISHED = [
    ("r50, 1.4M ids, data parallel (8x V100)", 1672, 32252),
    ("r50, 1.4M ids, model parallel (8x V100)", 3043, 11178),
    ("r50, 1.4M ids, Partial FC 0.1 (8x V100)", 4738, 6056),
    ("r50, 29M ids, Partial FC 0.1 (8x V100)", 1855, 32324),
    ("r50, multi-host, batch 128 x 32 GPUs", 17000, ""),
    ("ViT-B, multi-host, batch 384 x 64 GPUs", 13800, ""),
]


# -- case lists, table, command line ------------------------------------------------------------
def default_cases(cuda: bool) -> dict:
    """Default sweep: CPU mbf/r18 x bf16/fp32 x ZeRO 1-3 x checkpointing off/on at batch 8;
    GPU r50/r100/vit_b x fp16/bf16 x ZeRO 1-3 at batch 128."""
    if cuda:
        return dict(networks="r50,r100,vit_b", precisions="fp16,bf16", batch=128)
    return dict(networks="mbf,r18", precisions="bf16,fp32", batch=8)


def _csv(text: str, kind=str, name: str = "") -> list:
    try:
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise SystemExit(f"benchmarks/bench_train.py: --{name}: {e}") from e
    if not values:
        raise SystemExit(f"benchmarks/bench_train.py: --{name} is empty")
    return values


def build_cases(args: argparse.Namespace, cuda: bool) -> list[Case]:
    """Cartesian product of the command-line lists (or the single `--smoke` case)."""
    common = dict(
        steps=args.steps,
        warmup=args.warmup,
        embedding_size=args.embedding_size,
        num_classes=args.num_classes,
        sample_rate=args.sample_rate,
        optimizer=args.optimizer,
        channels_last=args.channels_last,
        num_workers=args.workers,
    )
    if args.smoke:
        common.update(steps=2, warmup=1, embedding_size=64, num_classes=1000)
        return [Case("r18", "fp32", 2, False, 4, model_kwargs={"base_width": 8}, **common)]
    defaults = default_cases(cuda)
    ckpt_names = {"off": False, "on": True}
    ckpts = _csv(args.checkpointing, str, "checkpointing")
    bad = [c for c in ckpts if c not in ckpt_names]
    if bad:
        raise SystemExit(f"benchmarks/bench_train.py: --checkpointing: {bad} not in off,on")
    kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    return [
        Case(
            net,
            prec,
            stage,
            ckpt_names[ck],
            args.batch or defaults["batch"],
            model_kwargs=kwargs,
            **common,
        )  # fmt: skip
        for net in _csv(args.networks or defaults["networks"], str, "networks")
        for prec in _csv(args.precisions or defaults["precisions"], str, "precisions")
        for stage in _csv(args.stages, int, "stages")
        for ck in ckpts
    ]


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def format_table(rows: list[tuple[Case, dict]]) -> str:
    """Markdown table of measured cases; a failed case shows its error in place of numbers."""
    head = ["case", "samples/s", "step ms"] + [f"{p} ms" for p in PHASES]
    head += ["peak MB", "steady peak MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case, r in rows:
        if "error" in r:
            lines.append(f"| {case.label()} | failed: {r['error']} |" + " |" * (len(head) - 2))
            continue
        cells = [case.label(), _fmt(r["samples_per_s"], 2), _fmt(r["step_ms"], 0)]
        cells += [_fmt(r[f"{p}_ms"], 0) for p in PHASES]
        cells += [_fmt(r["peak_mb"], 0), _fmt(r["steady_peak_mb"], 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_published() -> str:
    """The arcface_torch reference numbers, labelled as published (not measured here)."""
    lines = [
        "Published by insightface arcface_torch (docs/speed_benchmark.md, fp16; NOT measured "
        "here):",
        "| setting | samples/s | MB per GPU |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {sps:,} | {f'{mb:,}' if mb else '-'} |" for name, sps, mb in PUBLISHED]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--networks", default="", help="comma list (default: CPU mbf,r18; GPU r50,...)")
    p.add_argument("--precisions", default="", help="comma list of fp32,fp16,bf16")
    p.add_argument("--stages", default="1,2,3", help="ZeRO stages, comma list")
    p.add_argument("--checkpointing", default="off,on", help="activation checkpointing: off,on")
    p.add_argument("--batch", type=int, default=0, help="per-device batch (default CPU 8, GPU 128)")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    p.add_argument("--embedding-size", type=int, default=512)
    p.add_argument("--num-classes", type=int, default=10000)
    p.add_argument("--sample-rate", type=float, default=0.3)
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"))
    p.add_argument("--model-kwargs", default="", help="JSON, e.g. '{\"base_width\": 16}'")
    p.add_argument("--workers", type=int, default=0, help="loader worker processes")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--smoke", action="store_true", help="one tiny case, 2 steps (CI)")
    p.add_argument("--in-process", action="store_true", help="no subprocess per case")
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    p.add_argument("--case-json", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    """Runs the sweep and prints the table; exit status 1 when any case failed."""
    args = parse_args(argv)
    if args.case_json:
        return run_child(args.case_json)
    cuda = has_cuda()
    rows = []
    for case in build_cases(args, cuda):
        print(f"[bench_train] {case.label()} ...", file=sys.stderr, flush=True)
        if args.in_process:
            try:
                result = run_case(case)
            except Exception as e:  # a failed case is a row, not a crash of the sweep
                result = {"error": f"{type(e).__name__}: {e}"}
        else:
            result = run_isolated(case)
        rows.append((case, result))
    import torch

    where = f"GPU {torch.cuda.get_device_name()}" if cuda else "CPU"
    print(
        f"Training step, world size 1, synthetic data, torch {torch.__version__}, deepspeed "
        f"{importlib.metadata.version('deepspeed')}, {where}, "
        f"{torch.get_num_threads()} threads, load average "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())} at the end"
    )
    print(format_table(rows))
    print()
    print(format_published())
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"case": asdict(c), "result": r} for c, r in rows], f, indent=1)
    return 1 if any("error" in r for _, r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
