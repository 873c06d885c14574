"""benchmarks/gpu_check.py in its CPU mode (tiny sizes, gloo): the one-shot GPU check must run
end to end here, so the day a GPU is lent it only has to be started. Three of its six cases run
(the default recipe's checks, r50 against plain PyTorch with the same head, the real input path
with DALI's CPU decoder); the recipe cases share their code with r50 (``speed_row``)."""

import json
import os
import sys

from benchmarks.gpu_check import ROWS, SCHEMA, report, table
from perf.gpu_cases import CASES
from tests.helpers.launch import REPO, run_cmd

RUN = ["default", "r50", "input"]


def test_gpu_check_cpu_mode_writes_table_and_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    script = os.path.join(REPO, "benchmarks", "gpu_check.py")
    cmd = [sys.executable, script, "--cpu", "--cases", ",".join(RUN), "--out", out]
    proc = run_cmd(cmd, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert set(doc) == SCHEMA and doc["mode"] == "cpu" and doc["ok"] is True
    rows = doc["rows"]
    assert list(rows) == [r for r in ROWS if any(r in CASES[c][1] for c in RUN)]
    assert rows["bn_stats_fp32"]["running_stat_dtypes"] == ["torch.float32"]
    assert rows["bn_stats_fp32"]["param_dtype"] == "torch.bfloat16"
    for name in ("host_syncs", "head_kernels", "cudnn_benchmark"):
        assert rows[name]["status"] == "skipped"  # CUDA only
    for name in ("r50_bf16_zero2", "r50_plain_pytorch", "input_cpu_loader", "input_dali"):
        assert rows[name]["status"] == "ok" and rows[name]["samples_per_s"] > 0
    assert rows["r50_bf16_zero2"]["ratio_over_plain"] > 0
    assert rows["r50_bf16_zero2"]["syncs"]["status"] == "skipped"
    assert "PartialFC" in rows["r50_plain_pytorch"]["what"]  # like with like: the same head
    assert rows["input_dali"]["loader"] == "DaliLoader" and rows["input_dali"]["decode"] == "cpu"
    for name in rows:
        assert f"| {name} |" in proc.stdout


def test_report_fails_on_a_failed_or_missing_row():
    rows = {r: {"status": "ok"} for r in CASES["fp16"][1]}
    assert report("gpu", "H100", 1.0, rows, ["fp16"])["ok"] is True
    failed = report(
        "gpu", "H100", 1.0, {"r50_fp16_zero1": {"status": "FAIL", "why": "x"}}, ["fp16"]
    )
    assert failed["ok"] is False and "| r50_fp16_zero1 | FAIL | x |" in table(failed)
    missing = report("gpu", "H100", 1.0, {}, ["vit_l"])
    assert missing["ok"] is False and missing["rows"]["vit_l_zero3_ckpt"]["why"] == "row missing"
