"""The README's main job, shortened: tools/run_demo.sh on the real LFW faces with 30 steps.

Same pipeline as the full demo (prepare LFW, 2-process DeepSpeed training with Partial FC, ONNX
export with parity check, ONNX verification, plots); only the step count differs.
"""

import json
import os
import re

from tests.helpers.launch import check, free_port, launch_env, losses, run_cmd


def test_short_demo_trains_exports_and_evaluates(lfw_root, lfw_demo, tmp_path):
    out = tmp_path / "demo"
    env = launch_env()
    env.update(DEMO_OUT=str(out), ARCSCALE_LFW=lfw_root, DEMO_SKIP_UNTRAINED="1")
    env["DEMO_DATA"] = lfw_demo  # the shared test copy: the checkout's work_dirs/ stay untouched
    env["DEMO_PORT"] = str(free_port())
    # The CI version recommended in tools/run_demo.sh: 30 steps, no in-training evaluation (the
    # ONNX model is still evaluated on the held-out pairs).
    overrides = [
        "schedule.max_steps=30",
        "data.batch_size=32",
        "eval.val_targets=[]",
        "logging.frequent=5",
    ]
    cmd = ["bash", "tools/run_demo.sh", *overrides]
    stdout = check(run_cmd(cmd, env=env, timeout=1500))

    curve = losses(stdout)
    assert sorted(curve) == [5, 10, 15, 20, 25, 30], curve
    assert curve[25] + curve[30] < curve[5] + curve[10], curve  # the loss falls

    parity = re.search(r"max\|diff\| (\S+) <= 1e-04", stdout)
    assert parity and float(parity.group(1)) <= 1e-4, stdout[-3000:]
    assert (out / "backbone.onnx").is_file()

    results = json.loads((out / "eval" / "results.json").read_text())
    text = json.dumps(results)
    assert "lfw_heldout" in text
    for png in (out / "eval" / "roc.png", out / "curves.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert os.path.getsize(out / "curves.png") > 10_000
