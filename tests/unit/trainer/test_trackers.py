"""Experiment trackers through Accelerate's own path (issue 31 item 3): `log_with`,
`init_trackers(project, config, init_kwargs)` and `accelerator.log`, with the step scalars and
the verification metrics, read back from what W&B (offline) and MLflow (a `file:` store) wrote."""

from __future__ import annotations

import math

import pytest

from tests.helpers.trackers import mlflow_file_run, wandb_offline_run
from trainer.config import load_config
from trainer.logging_utils import TrainLogger, init_trackers, tracking_kwargs, val_scalars
from trainer.run import Run

SYNTH = ["data.kind=synthetic", "data.num_classes=10", "data.num_image=64", "model.network=mbf"]


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)  # later tests build their own DeepSpeed Accelerator


def test_wandb_offline_and_mlflow_file_store_get_config_steps_and_validation(
    tmp_path, monkeypatch, fresh_accelerate_state
):
    pytest.importorskip("wandb", reason="requirements/dev.txt pins wandb")
    pytest.importorskip("mlflow", reason="requirements/dev.txt pins mlflow-skinny")
    from accelerate import Accelerator

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps file: stores opt-in
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_PROJECT", "WANDB_NAME", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_TAGS"):
        monkeypatch.delenv(name, raising=False)
    cfg = load_config(
        None,
        [
            *SYNTH,
            f"output={tmp_path / 'run'}",
            "optim.lr=0.05",
            "logging.trackers=[wandb, mlflow]",
            "logging.project=faces",
            "logging.tags=[r18, demo]",
            f"logging.init_kwargs={{wandb: {{mode: offline, dir: '{tmp_path}'}}}}",
        ],
    )
    accelerator = Accelerator(cpu=True, **tracking_kwargs(cfg))
    logger = TrainLogger(cfg.output, 0, 4, 32, use_tensorboard=False, progress_bar=False)
    init_trackers(accelerator, cfg, logger)
    losses = [4.0, 2.0, 3.0, 1.0]
    for step, loss in enumerate(losses, 1):
        scalars = {"loss": float("nan"), "lr": 0.1, "grad_norm": 2.0}
        logger.step(step, 0, scalars, frequent=2, loss=_tensor(loss))
    val = {"lfw": {"accuracy_mean": 0.75, "accuracy_std": 0.01, "highest_accuracy": 0.8}}
    logger.log_metrics(val_scalars(val), 4)
    logger.close()

    wb = wandb_offline_run(str(tmp_path))
    assert (wb["project"], wb["name"], wb["tags"]) == ("faces", "run", ["r18", "demo"])
    assert wb["config"]["optim.lr"] == 0.05 and wb["config"]["model.network"] == "mbf"
    rows = {row["_step"]: row for row in wb["history"]}
    # the Loss of a logging step is the mean over the interval (arcface_torch's AverageMeter)
    assert rows[2]["train/loss"] == 3.0 and rows[4]["train/loss"] == 2.0
    assert rows[4]["val/lfw/accuracy"] == 0.75 and rows[4]["val/lfw/highest_accuracy"] == 0.8

    ml = mlflow_file_run(str(tmp_path / "mlruns"))
    assert ml["experiment"] == "faces" and ml["tags"]["mlflow.runName"] == "run"
    assert {"r18", "demo"} <= set(ml["tags"]) and ml["params"]["optim.lr"] == "0.05"
    assert ml["metrics"]["train/loss"] == [(2, 3.0), (4, 2.0)]
    assert ml["metrics"]["val/lfw/accuracy"] == [(4, 0.75)]
    assert math.isclose(ml["metrics"]["val/lfw/accuracy_std"][0][1], 0.01)


def _tensor(value):
    import torch

    return torch.tensor(value)


def test_evaluation_metrics_reach_the_trackers_through_the_run(tmp_path):
    """`Run.evaluate` hands the callback's results to the logger (evaluation/ knows no tracker)."""
    sent = []

    class Recorder:  # what the logger calls on the Accelerator
        def log(self, values, step=None):
            sent.append((step, values))

    class Engine:
        module = None

        def eval(self):
            pass

        def train(self):
            pass

    def evaluator(step, forward, module):
        return {"lfw": {"accuracy_mean": 0.9, "accuracy_std": 0.02, "xnorm": 20.0, "roc": []}}

    logger = TrainLogger(str(tmp_path), 0, 10, 8, use_tensorboard=False, progress_bar=False)
    logger.accelerator = Recorder()
    fields = dict.fromkeys(Run.__dataclass_fields__)
    run = Run(**{**fields, "rank": 0, "engine": Engine(), "evaluator": evaluator, "logger": logger})
    run.evaluate(10)
    assert sent == [
        (10, {"val/lfw/accuracy": 0.9, "val/lfw/accuracy_std": 0.02, "val/lfw/xnorm": 20.0})
    ]
