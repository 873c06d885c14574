"""The memory planner (``trainer/memory_plan.py``) against real runs on this host.

    python benchmarks/bench_memory.py

Runs each case of ``VALIDATION_CASES`` for real (``perf.isolated``, bench_train's runner: one
fresh process per case, world size 1) and prints a Markdown table of predicted vs measured MiB.
"""

from __future__ import annotations

import argparse
import sys

from perf.isolated import run_isolated
from perf.train_step import Case
from trainer.memory_plan import plan

VALIDATION_CASES = [
    # (label, bench Case fields); all world size 1 on this machine
    ("baseline", dict(network="r18", model_kwargs={"base_width": 8}, embedding_size=64,
                      num_classes=1000, sample_rate=1.0, batch_size=4)),
    ("head 10k", dict(network="r18", model_kwargs={"base_width": 16}, embedding_size=128,
                      num_classes=10_000, sample_rate=1.0)),
    ("head 1M r0.1", dict(network="r18", model_kwargs={"base_width": 16}, embedding_size=128,
                          num_classes=1_000_000, sample_rate=0.1)),
    ("head 500k r1", dict(network="r18", model_kwargs={"base_width": 16}, embedding_size=128,
                          num_classes=500_000, sample_rate=1.0)),
    ("sub-centers 3 x 333k r0.1", dict(network="r18", model_kwargs={"base_width": 16},
                                       embedding_size=128, num_classes=333_334, sample_rate=0.1,
                                       num_subcenters=3)),
    ("bf16", dict(network="r18", model_kwargs={"base_width": 16}, embedding_size=128,
                  num_classes=10_000, sample_rate=1.0, precision="bf16")),
    ("r18 ZeRO-1", dict(network="r18", zero_stage=1)),
    ("r18 ZeRO-3", dict(network="r18", zero_stage=3)),
    ("r18 ckpt", dict(network="r18", grad_checkpointing=True)),
]  # fmt: skip


def validate(cases=VALIDATION_CASES, log=print) -> list[dict]:
    """Runs each case for real (``perf.isolated.run_isolated``: one fresh process,
    world size 1, 1 warm-up + 1 timed step) and compares with ``plan``.

    Measured = peak RSS of the timed step minus RSS before the model was built (CPU) or
    ``torch.cuda.max_memory_allocated`` (GPU). Returns one dict per case with ``predicted_mb``,
    ``measured_mb`` (None when the run failed, with ``error``), ``ratio``; the first case is
    also used as a fixed-overhead baseline (``ratio_minus_baseline``).
    """
    rows = []
    for label, fields in cases:
        fields = dict(dict(precision="fp32", zero_stage=2, batch_size=8), **fields)
        case = Case(steps=1, warmup=1, **fields)
        log(f"[bench_memory] validating {label}: {case.label()} ...")
        predicted = plan(
            case.network, case.embedding_size, case.num_classes, case.sample_rate,
            case.batch_size, 1, case.zero_stage, case.precision, case.optimizer, case.offload,
            case.grad_checkpointing, model_kwargs=case.model_kwargs,
            num_subcenters=case.num_subcenters,
        )  # fmt: skip
        measured = run_isolated(case)
        mb = measured.get("steady_peak_mb") or measured.get("peak_mb")
        pred_mb = (predicted["device_total"] + predicted["host_total"]) / 2**20
        rows.append(
            dict(label=label, case=case.label(), predicted_mb=pred_mb, measured_mb=mb,
                 whole_run_mb=measured.get("peak_mb"), error=measured.get("error"),
                 ratio=pred_mb / mb if mb else None)
        )  # fmt: skip
    base = rows[0] if rows and rows[0]["measured_mb"] else None
    for row in rows:
        row["ratio_minus_baseline"] = None
        if base and row is not base and row["measured_mb"]:
            extra = row["measured_mb"] - base["measured_mb"]
            if extra > 0:
                row["ratio_minus_baseline"] = (row["predicted_mb"] - base["predicted_mb"]) / extra
    return rows


def format_validation(rows: list[dict]) -> str:
    """Markdown table of ``validate`` rows."""

    def f(v, d=0):
        return "-" if v is None else f"{v:,.{d}f}"

    lines = [
        "| case | config | predicted MiB | measured MiB (steps) | measured MiB (with init) "
        "| ratio | ratio above baseline |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        measured = f(r["measured_mb"]) if not r["error"] else f"failed: {r['error']}"
        lines.append(
            f"| {r['label']} | {r['case']} | {f(r['predicted_mb'])} | {measured} | "
            f"{f(r['whole_run_mb'])} | {f(r['ratio'], 2)} | {f(r['ratio_minus_baseline'], 2)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: run the cases, print the table; returns 0."""
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    print(format_validation(validate()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
