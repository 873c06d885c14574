"""Performance tools: the training benchmark (benchmarks/bench_train.py on perf/) and the memory
planner (trainer/memory_plan.py, tools/plan_memory.py). Smoke runs at tiny sizes, and the
planner's scaling laws."""

import os
import re
import subprocess
import sys

import pytest

from benchmarks import bench_train
from perf.train_step import PHASES, Case
from tools import plan_memory
from trainer import memory_plan

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(network="r18", model_kwargs={"base_width": 8}, embedding_size=64)
# A fixed activation profile keeps the scaling tests free of model runs.
PROFILE = {"params": 10_000_000, "float_bytes": 4e6, "other_bytes": 1e5, "largest_float_bytes": 5e5}


def _plan(**kw):
    args = dict(
        network="r100",
        embedding_size=512,
        num_classes=1_000_000,
        sample_rate=0.3,
        batch_size=64,
        world_size=8,
        zero_stage=2,
        precision="bf16",
        profile=PROFILE,
    )
    args.update(kw)
    return memory_plan.plan(**args)


def _head_bytes(result):
    return sum(b for name, b in result["device"].items() if name.startswith("head"))


# -- bench_train ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_bench_smoke_prints_positive_throughput(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    # a script run by path imports this checkout's library packages (perf/, evaluation/ ...)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_train.py", "--smoke", "--in-process", "--json", out],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| r18 base_width=8")]
    assert len(rows) == 1, proc.stdout
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert float(cells[1].replace(",", "")) > 0  # samples/s
    phases = [float(c.replace(",", "")) for c in cells[3:8]]
    step = float(cells[2].replace(",", ""))
    assert all(p >= 0 for p in phases) and sum(phases) == pytest.approx(step, rel=0.02, abs=2)
    assert "NOT measured here" in proc.stdout
    import json

    (record,) = json.loads(out.read_text())
    assert record["result"]["steady_peak_mb"] > 0
    assert record["result"]["peak_mb"] >= record["result"]["steady_peak_mb"]


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


# -- plan_memory: scaling laws ------------------------------------------------------------------
def test_zero2_optimizer_state_halves_when_world_doubles():
    name = "optimizer state (sgd)"
    a, b = _plan(world_size=4)["device"][name], _plan(world_size=8)["device"][name]
    assert a == pytest.approx(2 * b, rel=1e-6)
    # ZeRO-2 also partitions gradients, ZeRO-1 does not
    g = "backbone gradients (bf16)"
    assert _plan(world_size=4)["device"][g] == pytest.approx(2 * _plan(world_size=8)["device"][g])
    z1 = _plan(world_size=4, zero_stage=1)["device"][g]
    assert z1 == _plan(world_size=8, zero_stage=1)["device"][g]


def test_zero3_partitions_weights_and_offload_moves_state_to_host():
    w = "backbone weights (bf16)"
    assert _plan(zero_stage=3)["device"][w] * 8 == pytest.approx(_plan()["device"][w], rel=1e-6)
    off = _plan(offload=True)
    assert "optimizer state (sgd)" in off["host"] and "optimizer state (sgd)" not in off["device"]
    assert off["device_total"] < _plan()["device_total"]
    adamw = _plan(optimizer="adamw")["device"]["optimizer state (adamw)"]
    assert adamw == pytest.approx(2 * _plan()["device"]["optimizer state (sgd)"], rel=1e-6)


def test_head_memory_linear_in_classes():
    heads = [_head_bytes(_plan(num_classes=c)) for c in (8_000_000, 16_000_000, 24_000_000)]
    assert heads[1] - heads[0] == pytest.approx(heads[2] - heads[1], rel=1e-4)
    assert heads[1] - heads[0] > 0


def test_logits_linear_in_sample_rate():
    name = "logits + softmax buffer (fp32)"
    emb = 2 * 4 * 64 * 8 * 512  # gathered embeddings, independent of the sample rate
    a, b = (_plan(sample_rate=r)["device"][name] - emb for r in (0.2, 0.4))
    assert b == pytest.approx(2 * a, rel=1e-4)


def test_max_classes_grows_with_memory_and_is_tight():
    small = _plan(device_memory_gb=16)["max_num_classes"]
    large = _plan(device_memory_gb=32)["max_num_classes"]
    assert 0 < small < large
    fits = _plan(num_classes=large, device_memory_gb=32)
    assert fits["device_total"] <= 32 * 2**30
    assert _plan(num_classes=large + 8 * 1000)["device_total"] > 32 * 2**30
    assert _plan(device_memory_gb=1e-3)["max_num_classes"] == 0


def test_subcenters_count_rows_per_class():
    plain, sub = _plan(num_classes=3_000_000), _plan(num_classes=1_000_000, num_subcenters=3)
    assert sub["sampled_per_rank"] * 3 == plain["sampled_per_rank"]  # K counts classes
    for name in ("head centers (fp32)", "head optimizer state (sgd)",
                 "head sampled rows + gradient", "head step (gathered rows)"):  # fmt: skip
        assert sub["device"][name] == plain["device"][name], name  # same rows
    logits = "logits + softmax buffer (fp32)"
    one = _plan(num_classes=1_000_000)
    n, k = 64 * 8, one["sampled_per_rank"]
    assert sub["device"][logits] - one["device"][logits] == 4 * n * k * 3 + n * k
    per_class = [_plan(device_memory_gb=32, num_subcenters=s)["max_num_classes"] for s in (1, 3)]
    # a sub-center class costs 3 rows but its softmax buffers are one column: under 3 classes
    assert 1 / 3 < per_class[1] / per_class[0] < 0.36


@pytest.mark.parametrize(
    "bad",
    [dict(zero_stage=4), dict(precision="fp8"), dict(sample_rate=0.0), dict(world_size=0),
     dict(num_subcenters=0)],
)  # fmt: skip
def test_plan_rejects_bad_arguments(bad):
    field = next(iter(bad))
    with pytest.raises(ValueError, match=field):
        _plan(**bad)


# -- plan_memory: measurement and command line --------------------------------------------------
def test_activation_profile_linear_in_batch_and_reduced_by_checkpointing():
    two = memory_plan.measure_activations(**TINY, batch=2)
    four = memory_plan.measure_activations(**TINY, batch=4)
    ckpt = memory_plan.measure_activations(**TINY, grad_checkpointing=True, batch=2)
    assert two["float_bytes"] > 0
    assert four["float_bytes"] == pytest.approx(two["float_bytes"], rel=0.05)
    assert ckpt["float_bytes"] < 0.7 * two["float_bytes"]
    assert ckpt["params"] == two["params"] > 0


def test_cli_prints_breakdown_and_max_classes(capsys):
    rc = plan_memory.main(
        ["--network", "r18", "--model-kwargs", '{"base_width": 8}', "--embedding-size", "64",
         "--num-classes", "100000", "--batch-size", "4", "--world-size", "2",
         "--device-memory-gb", "2"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    assert "| **peak per device**" in out
    found = re.search(r"Largest num_classes fitting 2 GiB per device: ([\d,]+)", out)
    assert found and int(found.group(1).replace(",", "")) > 100000
    assert plan_memory.main(["--network", "r18", "--sample-rate", "2"]) == 2
    assert plan_memory.main(
        ["--network", "r18", "--model-kwargs", '{"base_width": 8}', "--num-subcenters", "3"]
    ) == 0  # fmt: skip
    assert "3 sub-centers per class" in capsys.readouterr().out
