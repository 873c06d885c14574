"""benchmarks/bench_train.py on perf/: the default sweep, the smoke case and the result table
(the smoke run itself: tests/integration/test_bench_train.py)."""

import pytest

from benchmarks import bench_train
from perf.train_step import PHASES, Case


def test_bench_default_sweep_and_smoke_case():
    args = bench_train.parse_args([])
    cases = bench_train.build_cases(args, cuda=False)
    assert len(cases) == 2 * 2 * 3 * 2  # networks x precisions x stages x checkpointing
    assert {c.network for c in cases} == {"mbf", "r18"}
    assert {c.precision for c in cases} == {"bf16", "fp32"}
    gpu = bench_train.build_cases(args, cuda=True)
    assert {c.network for c in gpu} == {"r50", "r100", "vit_b"} and gpu[0].batch_size == 128
    (smoke,) = bench_train.build_cases(bench_train.parse_args(["--smoke"]), cuda=False)
    assert smoke.steps == 2
    with pytest.raises(SystemExit):
        bench_train.build_cases(bench_train.parse_args(["--checkpointing", "maybe"]), False)


def test_bench_table_keeps_failed_cases_and_labels_published():
    case = Case("r18", "fp32", 2)
    ok = {f"{p}_ms": 1.0 for p in PHASES}
    ok.update(samples_per_s=10.0, step_ms=5.0, peak_mb=1.0, steady_peak_mb=1.0)
    table = bench_train.format_table([(case, ok), (case, {"error": "boom"})])
    assert "failed: boom" in table and "10.00" in table
    published = bench_train.format_published()
    assert "NOT measured here" in published and "4,738" in published
