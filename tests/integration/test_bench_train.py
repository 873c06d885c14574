"""benchmarks/bench_train.py --smoke as a script: a positive throughput, phases that add up to
the step, the JSON record."""

import json
import os
import sys

import pytest

from tests.helpers.launch import launch_env, run_cmd


def test_bench_smoke_prints_positive_throughput(tmp_path):
    out = tmp_path / "bench.json"
    # launch_env: a script run by path imports this checkout's library packages (perf/, ...)
    env = dict(launch_env(), DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    cmd = [sys.executable, "benchmarks/bench_train.py", "--smoke", "--in-process", "--json", out]
    proc = run_cmd(cmd, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| r18 base_width=8")]
    assert len(rows) == 1, proc.stdout
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert float(cells[1].replace(",", "")) > 0  # samples/s
    phases = [float(c.replace(",", "")) for c in cells[3:8]]
    step = float(cells[2].replace(",", ""))
    assert all(p >= 0 for p in phases) and sum(phases) == pytest.approx(step, rel=0.02, abs=2)
    assert "NOT measured here" in proc.stdout
    (record,) = json.loads(out.read_text())
    assert record["result"]["steady_peak_mb"] > 0
    assert record["result"]["peak_mb"] >= record["result"]["steady_peak_mb"]
