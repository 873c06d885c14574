"""benchmarks/gpu_check.py in its CPU mode (tiny sizes, gloo): the one-shot GPU check must run
end to end here, so the day a GPU is lent it only has to be started."""

import json
import os
import sys

from benchmarks.gpu_check import ROWS
from tests.helpers.launch import REPO, run_cmd


def test_gpu_check_cpu_mode_writes_every_row(tmp_path):
    out = tmp_path / "gpu_check.json"
    script = os.path.join(REPO, "benchmarks", "gpu_check.py")
    proc = run_cmd([sys.executable, script, "--cpu", "--out", out], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "cpu" and report["ok"] is True
    assert set(report["rows"]) == set(ROWS)
    rows = report["rows"]
    assert rows["bn_stats_fp32"]["status"] == "ok"
    assert rows["bn_stats_fp32"]["running_stat_dtypes"] == ["torch.float32"]
    assert rows["bn_stats_fp32"]["param_dtype"] == "torch.bfloat16"
    for name in ("r50_bf16", "r50_plain_pytorch", "vit_b_bf16"):
        assert rows[name]["status"] == "ok" and rows[name]["samples_per_s"] > 0
    assert rows["r50_bf16"]["predicted_gib"] > 0 and rows["r50_bf16"]["ratio_over_plain"] > 0
    assert rows["host_syncs"]["status"] == "skipped"  # CUDA only
    assert rows["dali_mixed"]["status"] == "skipped" and rows["dali_mixed"]["images_per_s"] > 0
    for name in ROWS:
        assert f"| {name} |" in proc.stdout
