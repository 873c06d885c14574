"""The README's main job, shortened: tools/run_demo.sh on the real LFW faces with 30 steps.

Same pipeline as the full demo (prepare LFW, 2-process DeepSpeed training with Partial FC, ONNX
export with parity check, ONNX verification, plots); only the step count differs.
"""

import json
import os
import re
import subprocess

import pytest

from tests.launch import REPO, check, launch_env, losses

pytestmark = pytest.mark.slow


def test_short_demo_trains_exports_and_evaluates(lfw_root, tmp_path):
    out = tmp_path / "demo"
    env = launch_env()
    env.update(DEMO_OUT=str(out), ARCSCALE_LFW=lfw_root, DEMO_SKIP_UNTRAINED="1")
    cmd = ["bash", "tools/run_demo.sh", "schedule.max_steps=30", "eval.verbose=1000"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    stdout = check(proc)

    curve = losses(stdout)
    assert sorted(curve) == [10, 20, 30], curve
    assert curve[30] < curve[10], curve  # the loss falls

    parity = re.search(r"max\|diff\| (\S+) <= 1e-04", stdout)
    assert parity and float(parity.group(1)) <= 1e-4, stdout[-3000:]
    assert (out / "backbone.onnx").is_file()

    results = json.loads((out / "eval" / "results.json").read_text())
    text = json.dumps(results)
    assert "lfw_heldout" in text
    for png in (out / "eval" / "roc.png", out / "curves.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert os.path.getsize(out / "curves.png") > 10_000
