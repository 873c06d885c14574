"""A real run (one process, world size 1) sends its step scalars and its verification metrics
to an Accelerate tracker (issue 31 item 3): MLflow to a local `file:` store, read back from the
files; `training.log` holds arcface_torch's `Accuracy-Highest` line. One launch, ~30 s."""

import os

import pytest

from tests.helpers.launch import REPO, check, launch_env, run_cmd, train_cmd
from tests.helpers.tiny_eval import write_tiny_bin
from tests.helpers.trackers import mlflow_file_run

pytest.importorskip("mlflow", reason="requirements/dev.txt pins mlflow-skinny")


def test_run_logs_steps_and_validation_to_mlflow(tmp_path):
    bin_path = tmp_path / "tiny.bin"
    write_tiny_bin(str(bin_path), 20)
    out = tmp_path / "run"
    overrides = [
        f"output={out}",
        "schedule.max_steps=4",
        "logging.frequent=2",
        f"eval.val_targets=[{bin_path}]",
        "eval.batch_size=40",
        "logging.trackers=[mlflow]",
        "logging.project=itest",
        "logging.tags=[tiny]",
    ]
    env = launch_env()
    env.update(MLFLOW_TRACKING_URI=f"file:{tmp_path / 'mlruns'}", MLFLOW_ALLOW_FILE_STORE="true")
    stdout = check(
        run_cmd(train_cmd(os.path.join(REPO, "configs", "synthetic_tiny.yaml"), overrides), env)
    )
    run = mlflow_file_run(str(tmp_path / "mlruns"))
    assert run["experiment"] == "itest" and run["tags"]["mlflow.runName"] == "run"
    assert "tiny" in run["tags"] and run["params"]["data.batch_size"] == "16"
    assert [s for s, _ in run["metrics"]["train/loss"]] == [2, 4]
    ((step, acc),) = run["metrics"]["val/tiny/accuracy"]
    assert step == 4 and 0.0 <= acc <= 1.0
    assert run["metrics"]["val/tiny/highest_accuracy"] == [(4, acc)]
    log = (out / "training.log").read_text()
    assert f"[tiny][4]Accuracy-Highest: {acc:1.5f}" in log and "Accuracy-Highest" in stdout
