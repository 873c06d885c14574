"""training.log (console, config, versions, world size, errors) and Accelerate trackers."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

from trainer.config import ConfigError, load_config
from trainer.logging_utils import TrainLogger, check_trackers, open_trackers, run_log

SYNTH = ["data.kind=synthetic", "data.num_classes=10", "data.num_image=64", "model.network=mbf"]


def _read(path):
    with open(path) as f:
        return f.read()


def _cfg(tmp_path, *more):
    return load_config(None, [*SYNTH, f"output={tmp_path / 'run'}", *more])


def test_rank0_log_keeps_header_console_and_traceback(tmp_path, capsys):
    cfg = _cfg(tmp_path, "optim.lr=0.05")
    with pytest.raises(RuntimeError), run_log(cfg, ["trainer.train", "x.yaml"], 0, 4) as path:
        print("Step 1/2 Epoch 0 Loss 9.0")
        print("a warning", file=sys.stderr)
        raise RuntimeError("boom in the loop")
    text = _read(path)
    assert path == os.path.join(cfg.output, "training.log")
    assert "command: trainer.train x.yaml" in text and "world size: 4" in text
    assert "versions: python " in text and "torch " in text and "deepspeed " in text
    assert "    lr: 0.05" in text and "    network: mbf" in text  # the config, as YAML
    assert "Step 1/2 Epoch 0 Loss 9.0\na warning\n" in text
    assert "[rank 0] Traceback" in text and "RuntimeError: boom in the loop" in text
    out = capsys.readouterr()  # the console still shows everything
    assert "Step 1/2" in out.out and "a warning" in out.err
    assert sys.stdout is not None and not hasattr(sys.stdout, "log")  # streams restored


def test_stream_kept_after_the_run_only_reaches_the_terminal(tmp_path, capsys):
    import logging

    with run_log(_cfg(tmp_path), ["t"], 0, 1) as path:
        handler = logging.StreamHandler(sys.stdout)  # e.g. a library logger made during the run
    handler.stream.write("after the run\n")
    handler.stream.flush()
    assert "after the run" in capsys.readouterr().out and "after the run" not in _read(path)


def test_other_ranks_add_only_prefixed_stderr(tmp_path):
    cfg = _cfg(tmp_path)
    with run_log(cfg, ["t"], 0, 2) as path:
        print("rank zero line")
    with run_log(cfg, ["t"], 1, 2):
        print("not logged")
        sys.stderr.write("first\nsecond ")
        sys.stderr.write("part\n")
    text = _read(path)
    assert text.count("===== ") == 1 and "rank zero line" in text and "not logged" not in text
    assert "[rank 1] first\n[rank 1] second part\n" in text


def test_tracker_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="logging.trackers: unknown tracker 'nope'"):
        check_trackers(_cfg(tmp_path, "logging.trackers=[nope]"))
    with pytest.raises(ConfigError, match="logging.trackers: must be distinct"):
        _cfg(tmp_path, "logging.trackers=[wandb, wandb]")
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ConfigError, match=r"'wandb' package, which is not installed"):
            check_trackers(_cfg(tmp_path, "logging.trackers=[wandb]"))


def test_registered_tracker_gets_config_and_scalars(tmp_path):
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, GeneralTracker

    seen: dict = {"logs": []}

    class Recorder(GeneralTracker):
        name = "recorder_test"
        requires_logging_directory = False

        def __init__(self, run_name):
            super().__init__()
            seen["run_name"] = run_name

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            seen["config"] = values

        def log(self, values, step=None, **kwargs):
            seen["logs"].append((step, values))

        def finish(self):
            seen["finished"] = True

    LOGGER_TYPE_TO_CLASS["recorder_test"] = Recorder
    try:
        cfg = _cfg(tmp_path, "logging.trackers=[recorder_test]")
        logger = TrainLogger(cfg.output, 0, 4, 32, use_tensorboard=False, progress_bar=False)
        logger.trackers = open_trackers(cfg)
        for step in range(1, 5):
            logger.step(step, 0, lambda: {"loss": 3.0, "lr": 0.1, "grad_norm": 2.0}, frequent=2)
        logger.close()
    finally:
        del LOGGER_TYPE_TO_CLASS["recorder_test"]
    assert seen["run_name"] == "run" and seen["finished"]
    assert seen["config"]["optim.lr"] == 0.1 and seen["config"]["model.network"] == "mbf"
    assert [s for s, _ in seen["logs"]] == [2, 4]
    assert seen["logs"][0][1]["train/loss"] == 3.0 and "train/samples_per_sec" in seen["logs"][0][1]


def test_entry_point_logs_run_and_its_error(tmp_path, monkeypatch, capsys):
    """`trainer.train.main` keeps the run's console and, for a failed run, its error line."""
    from trainer import train as entry

    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)

    def fake_train(cfg, settings, ds_config, faults=None):
        print("Step 1/1 Epoch 0 Loss 12.3456 LR 0.100000")
        raise entry.TrainingDiverged("loss non-finite for 20 consecutive steps")

    monkeypatch.setattr(entry, "train", fake_train)
    out = tmp_path / "run"
    assert entry.main(["configs/synthetic_tiny.yaml", *SYNTH[:3], f"output={out}"]) == 3
    text = (out / "training.log").read_text()
    assert "command: trainer.train configs/synthetic_tiny.yaml" in text
    assert "Step 1/1 Epoch 0 Loss 12.3456" in text
    assert text.endswith("arcscale: training stopped: loss non-finite for 20 consecutive steps\n")
    assert entry.main(["configs/synthetic_tiny.yaml", f"output={out}", "logging.trackers=[x]"]) == 2
    assert (
        "arcscale: config error: logging.trackers: unknown tracker 'x'" in capsys.readouterr().err
    )
    assert (out / "training.log").read_text().count("===== ") == 2
