"""One-shot GPU readiness check (issues 13, 28): every shipped recipe's path on one GPU.

    python benchmarks/gpu_check.py [--quick] [--out work_dirs/gpu_check.json]  # one GPU
    python benchmarks/gpu_check.py --cpu [--out ...]             # tiny sizes on CPU (CI)

Each case runs in its own process through the trainer's own set-up (``perf/gpu_cases.py``:
``trainer.run.build_run`` from a recipe under ``configs/``, ``trainer.step.train_step``; NCCL
on GPU, gloo with --cpu), world size 1. Cases and their rows:

- default (r18, bf16 ZeRO-2): ``host_syncs`` (attributed to project call sites, head backward
  included; ``perf/sync_probe.py``), ``bn_stats_fp32``, ``cudnn_benchmark`` (as
  ``build_run`` sets it), ``head_kernels`` (FAIL when the compiled head kernels fell back to
  eager).
- r50 (bf16 ZeRO-2): ``r50_bf16_zero2`` and ``r50_plain_pytorch``, the same step as a plain loop
  (autocast bf16, torch SGD) with the same Partial FC head and loader: the ratio is the engine's
  cost, not the head's.
- fp16: ``r50_fp16_zero1`` = configs/ms1mv3_r50.yaml (dynamic loss scale, head logits in TF32).
- vit_b: ``vit_b_adamw_zero2`` = configs/wf42m_pfc03_vit_b.yaml (AdamW, gradient_acc 3).
- vit_l: ``vit_l_zero3_ckpt`` = configs/wf42m_pfc02_vit_l_zero3.yaml (ZeRO-3 + checkpointing).
- input (r50 bf16 ZeRO-2, a ``.rec`` written here): ``input_pinned_batches`` (no decode),
  ``input_cpu_loader`` (workers ``auto`` + ``DevicePrefetcher``), ``input_dali`` (the trainer's
  DALI branch, ``mixed`` decode, uint8 hand-over).

Every training row carries ``syncs`` (per step by owner, the sites) and FAILs when our code
syncs more than once per micro-batch + one logging read. Speed numbers are measurements, never
pass/fail. Prints one table and writes one JSON (``SCHEMA``: mode, device, seconds, cases, rows,
ok); exit 1 when a row FAILs. Time limits per case, out of ``BUDGET``, keep the whole run under
8 minutes (``--quick``: 4); ``--cases`` runs a subset (CI runs three on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script: the project's packages are importable
    sys.path.insert(0, REPO)

from perf.gpu_cases import CASES, ROWS, init_process  # noqa: E402

# The whole run's limit in seconds and the least each case keeps (start-up, the head kernels'
# compile and cudnn autotuning included): the first case may use what later ones leave.
BUDGET = {"gpu": 450.0, "quick": 220.0, "cpu": 1800.0}
MIN_CASE = {"gpu": 45.0, "quick": 25.0, "cpu": 120.0}
SCHEMA = {"mode", "device", "seconds", "cases", "rows", "ok"}


def _all(case: str, **row) -> dict:
    return {name: dict(row) for name in CASES[case][1]}


def _run_case(name: str, mode: str, timeout: float) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if mode == "cpu":
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    else:
        env.pop("DS_ACCELERATOR", None)  # DeepSpeed detects CUDA itself
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--case", name, "--rows", out]
        cmd += ["--mode", mode]
        try:
            proc = subprocess.run(
                cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return _all(name, status="FAIL", why=f"timed out after {timeout:.0f} s")
        if proc.returncode != 0 or not os.path.isfile(out):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            why = f"case {name} exited {proc.returncode}: " + " | ".join(tail)
            return _all(name, status="FAIL", why=why[-1500:])
        with open(out) as f:
            rows: dict = json.load(f)
        return rows


def cell(row: dict) -> str:
    """The table's result column of one row."""
    syncs = row.get("syncs", row if "ours_per_step" in row else None)
    keys = [
        ("samples_per_s", "{:.1f} samples/s"),
        ("peak_gib", "peak {:.2f} GiB"),
        ("predicted_gib", "plan {:.2f} GiB"),
        ("ratio_over_plain", "x{:.2f} of plain"),
        ("over_pinned_batches", "x{:.2f} of pinned batches"),
        ("loss_scale", "loss scale {:g}"),
        ("logits_dtype", "logits {}"),
        ("running_stat_dtypes", "{}"),
        ("set", "benchmark={}"),
        ("workers", "{} workers"),
        ("why", "{}"),
    ]
    parts = [fmt.format(row[k]) for k, fmt in keys if row.get(k) is not None]
    if isinstance(syncs, dict) and "ours_per_step" in syncs:
        top = next(iter(syncs["sites"]), "none")
        parts.append(f"syncs/step ours {syncs['ours_per_step']:.1f} (top: {top})")
    return ", ".join(parts)


def report(mode: str, device: str, seconds: float, rows: dict, cases: list[str]) -> dict:
    """The JSON document (keys ``SCHEMA``): every row of the run ``cases`` in ``ROWS`` order
    (a missing one FAILs), ``ok`` = no row FAILed."""
    names = [r for r in ROWS if any(r in CASES[c][1] for c in cases)]
    rows = {r: rows.get(r, {"status": "FAIL", "why": "row missing"}) for r in names}
    ok = all(row["status"] != "FAIL" for row in rows.values())
    doc = {"mode": mode, "device": device, "seconds": seconds, "cases": cases, "rows": rows}
    return {**doc, "ok": ok}


def table(doc: dict) -> str:
    lines = [f"| check ({doc['mode']}: {doc['device']}) | status | result |", "|---|---|---|"]
    lines += [f"| {r} | {row['status']} | {cell(row)} |" for r, row in doc["rows"].items()]
    return "\n".join(lines)


def _exit_with_parent() -> None:
    """A case process ends when the command that started it is killed (no orphan holding the
    GPU): a daemon thread polls the parent's pid."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="tiny sizes on CPU over gloo (CI)")
    p.add_argument("--quick", action="store_true", help="fewer steps: <= 4 minutes on one GPU")
    p.add_argument("--out", default=os.path.join(REPO, "work_dirs", "gpu_check.json"))
    p.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)
    p.add_argument("--rows", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of cases")
    args = p.parse_args(argv)
    if args.case:  # child: one case, rows to --rows
        _exit_with_parent()
        init_process(args.mode == "cpu")
        with tempfile.TemporaryDirectory() as out:
            rows = CASES[args.case][0](args.mode, out)
        with open(args.rows, "w") as f:
            json.dump(rows, f)
        return 0

    import torch

    mode = "cpu" if args.cpu else "quick" if args.quick else "gpu"
    if mode != "cpu" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --cpu for the CI mode)", file=sys.stderr)
        return 2
    device = "cpu" if mode == "cpu" else torch.cuda.get_device_name(0)
    cases = [c for c in args.cases.split(",") if c]
    if unknown := sorted(set(cases) - set(CASES)):
        print(f"gpu_check: unknown cases {unknown}; known: {list(CASES)}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    rows: dict = {}
    for i, name in enumerate(cases):
        left = BUDGET[mode] - (time.perf_counter() - t0)
        timeout = max(MIN_CASE[mode], left - MIN_CASE[mode] * (len(cases) - i - 1))
        rows.update(_run_case(name, mode, timeout))
    doc = report(mode, device, time.perf_counter() - t0, rows, cases)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(table(doc))
    print(f"{'all checks passed' if doc['ok'] else 'FAILED'} in {doc['seconds']:.0f} s; {args.out}")
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
