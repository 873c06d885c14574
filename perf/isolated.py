"""Run a training-step benchmark case (``perf.train_step``) in a fresh Python process.

A fresh process per case isolates its peak memory (the peak RSS of a process cannot be lowered
below what an earlier case left) and DeepSpeed's global state (one engine and process group per
process). Used by ``benchmarks/bench_train.py`` (its default: one subprocess per case) and
``benchmarks/bench_memory.py``. The child is this module (``python -m perf.isolated
CASE_JSON``), which prints one ``RESULT <json>`` line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict

from perf.train_step import Case, has_cuda, run_case

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

__all__ = ["run_child", "run_isolated"]


def _subprocess_env() -> dict:
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu" if not has_cuda() else "cuda")
    # Where tools/setup_env.sh builds DeepSpeed's CPU ops: under ARCSCALE_CACHE, as the venv.
    cache = env.get("ARCSCALE_CACHE", os.path.expanduser("~/.cache/arcscale"))
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(cache, "torch_extensions"))
    # A fixed mmap threshold makes glibc return large freed blocks to the OS, so RSS follows
    # live tensors instead of keeping every freed buffer in the heap.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_isolated(case: Case, timeout_s: float = 1800) -> dict:
    """Runs `case` in a fresh Python process (see module docstring) and returns its result.

    On CPU the subprocess also reports ``peak_mb``: the peak RSS over the whole case, including
    DeepSpeed initialization. A failed case returns ``{"error": message}`` (never dropped).
    """
    cmd = [sys.executable, "-m", "perf.isolated", json.dumps(asdict(case))]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout_s, env=_subprocess_env()
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}


def run_child(case_json: str) -> int:
    """Subprocess side of ``run_isolated``: run one case, print ``RESULT <json>``."""
    result = run_case(Case(**json.loads(case_json)))
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_child(sys.argv[1]))
