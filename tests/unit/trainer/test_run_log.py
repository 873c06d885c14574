"""training.log (console, native writes, config, versions, world size, errors); tracker names.
The trackers themselves: test_trackers.py."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

from trainer.config import ConfigError, load_config
from trainer.logging_utils import check_trackers, run_log

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


def test_native_writes_reach_the_log(tmp_path):
    """Lines written by native code to descriptors 1 and 2 (NCCL, c10 warnings) are kept."""
    import ctypes

    libc = ctypes.CDLL(None)
    cfg = _cfg(tmp_path)
    with run_log(cfg, ["t"], 0, 2) as path:
        libc.write(1, b"libc write to fd 1\n", 19)
        os.write(2, b"NCCL WARN native fd 2\n")
        libc.fprintf(ctypes.c_void_p.in_dll(libc, "stderr"), b"c10 warning via stdio\n")
    with run_log(cfg, ["t"], 1, 2):
        os.write(2, b"rank one native\n")
        os.write(1, b"rank one stdout stays out\n")
    text = _read(path)
    for line in ("libc write to fd 1", "NCCL WARN native fd 2", "c10 warning via stdio"):
        assert f"\n{line}\n" in text, line
    assert "[rank 1] rank one native\n" in text and "stays out" not in text
    assert os.fstat(1) and os.fstat(2)  # descriptors restored and open


def test_step_line_loss_is_the_interval_mean_as_arcface_torch(tmp_path, capsys):
    """arcface_torch's CallBackLogging prints its AverageMeter (reset at each line): the mean
    of the step losses since the last line, not the last step's."""
    import torch

    from trainer.logging_utils import TrainLogger

    logger = TrainLogger(str(tmp_path), 0, 6, 8, use_tensorboard=False, progress_bar=False)
    for step, loss in enumerate([1.0, 2.0, 6.0, float("nan"), 5.0, 7.0], 1):
        finite = torch.tensor(loss) if loss == loss else None  # a non-finite step: no value
        logger.step(step, 0, {"loss": loss, "lr": 0.1}, frequent=3, loss=finite)
    logger.close()
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("Step ")]
    assert [x.split(" Loss ")[1].split()[0] for x in lines] == ["3.0000", "6.0000"]


def test_tracker_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="logging.trackers: unknown tracker 'nope'"):
        check_trackers(_cfg(tmp_path, "logging.trackers=[nope]"))
    with pytest.raises(ConfigError, match="logging.trackers: must be distinct"):
        _cfg(tmp_path, "logging.trackers=[wandb, wandb]")
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ConfigError, match=r"'wandb' package, which is not installed"):
            check_trackers(_cfg(tmp_path, "logging.trackers=[wandb]"))


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
