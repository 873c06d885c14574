"""Hostile checkpoints and careless runs (issue 19: items 2, 5-8, 10 and 12 of the run folder).

One real single-process run (`python -m trainer.train` without a launcher, world size 1) makes a
checkpoint; the other cases plant payloads or mistakes in copies of it and check that nothing runs,
nothing is lost and every mistake is one line with exit code 2. The checks that need no run:
tests/unit/trainer/test_hostile_checkpoints.py.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from data.verification_bin import write_bin
from tests.helpers.hostile import Payload
from tests.helpers.launch import run_cmd, tiny_overrides, train_cmd
from tests.helpers.lfw_rec import LFW16_CLASSES
from trainer import checkpoint as ckpt
from trainer.config import ConfigError, load_config

CONFIG = "configs/synthetic_tiny.yaml"


def _train(out, data, *more, timeout=600):
    """`python -m trainer.train` with no launcher variables: must run as world size 1."""
    ov = [
        *tiny_overrides(out, data, LFW16_CLASSES, 2),
        "engine.precision=fp32",
        "checkpoint.every=1",
    ]
    return run_cmd(train_cmd(CONFIG, [*ov, *more]), timeout=timeout)


def _small_bin(path, lfw_rec):
    """A 20-pair verification .bin from the first 40 faces of the training .rec."""
    from data.datasets import RecordDataset
    from data.recordio import unpack

    ds = RecordDataset(os.path.join(lfw_rec, "train.rec"))
    images = [unpack(ds._read(i))[1] for i in range(40)]
    write_bin(str(path), images, [i % 2 == 0 for i in range(20)])
    return str(path)


@pytest.fixture(scope="module")
def trained(lfw16, tmp_path_factory):
    """A 2-step run, a checkpoint per step, a verification every step: (run dir, data, stdout)."""
    tmp = tmp_path_factory.mktemp("hostile_ckpt")
    data = lfw16
    out = str(tmp / "run")
    val = _small_bin(tmp / "pairs20.bin", data)
    proc = _train(out, data, f"eval.val_targets=[{val}]", "eval.verbose=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, data, proc.stdout


def test_bare_python_runs_as_world_size_1_and_saves_before_evaluating(trained):
    out, _, stdout = trained
    assert "running as a single process (world size 1)" in stdout
    assert "world size 1" in stdout
    saved = stdout.index("[checkpoint] saved")
    evaluated = stdout.index("[pairs20][1]")
    assert saved < evaluated, "step 1 must be saved before it is evaluated"
    assert os.path.isfile(os.path.join(out, "backbone.pt"))


def test_checkpoint_files_load_with_weights_only(trained):
    step = ckpt.latest_checkpoint(trained[0])
    files = [os.path.join(d, f) for d, _, fs in os.walk(step) for f in fs if f.endswith(".pt")]
    assert any("rng_rank0" in f for f in files) and any("optim_states" in f for f in files)
    with ckpt.weights_only_loads():
        for path in files:
            torch.load(path, map_location="cpu")  # raises on anything but the allow-list


def _plant(path, marker):
    """Rewrites a checkpoint file with the same content plus a pickled payload."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(state, dict):
        state["extra"] = Payload(marker)
    else:
        state = {"original": state, "extra": Payload(marker)}
    torch.save(state, path)


@pytest.mark.parametrize("target", ["optim_states", "rng_rank0"])
def test_payload_in_checkpoint_never_runs(trained, tmp_path, target):
    out, data, _ = trained
    run = tmp_path / "run"
    shutil.copytree(out, run)
    step = ckpt.latest_checkpoint(str(run))
    files = [os.path.join(d, f) for d, _, fs in os.walk(step) for f in fs if target in f]
    assert files
    marker = tmp_path / "PWNED"
    for path in files:
        _plant(path, marker)
    proc = _train(str(run), data, "checkpoint.resume=true", "schedule.max_steps=3")
    assert not marker.exists(), "a payload in a checkpoint ran"
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "refused to load" in last and target in last


def test_payload_in_engine_file_refused_by_deepspeed_loader(trained, tmp_path):
    """DeepSpeed's own checkpoint engine loads with weights_only=False: inside
    `weights_only_loads` it refuses the payload (model states file, every ZeRO stage writes it)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    step = ckpt.latest_checkpoint(trained[0])
    model = next(
        os.path.join(d, f) for d, _, fs in os.walk(step) for f in fs if "model_states" in f
    )
    planted = tmp_path / "model_states.pt"
    shutil.copy(model, planted)
    marker = tmp_path / "PWNED"
    _plant(planted, marker)
    with ckpt.weights_only_loads(), pytest.raises(ConfigError, match="refused to load"):
        TorchCheckpointEngine().load(str(planted), map_location="cpu")
    assert not marker.exists()


def test_fresh_run_refuses_another_runs_folder_then_overwrite(trained, tmp_path):
    out, data, _ = trained
    run = tmp_path / "run"
    shutil.copytree(out, run)
    proc = _train(str(run), data)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert "holds another run's checkpoints" in lines[-1] and "checkpoint.overwrite" in lines[-1]
    assert sorted(os.listdir(run / "checkpoints")) == sorted(os.listdir(f"{out}/checkpoints"))
    cfg = load_config(CONFIG, [f"output={run}", "checkpoint.overwrite=true"])
    ckpt.preflight_output(cfg)
    assert ckpt.foreign_checkpoints(str(run / "checkpoints")) == []


def test_explicit_resume_path_must_be_a_checkpoint(trained, tmp_path):
    out = trained[0]
    for bad in (tmp_path / "nothing", tmp_path):
        cfg = load_config(CONFIG, [f"output={tmp_path / 'o'}", f"checkpoint.resume={bad}"])
        with pytest.raises(ConfigError, match=f"checkpoint.resume: {bad}"):
            ckpt.preflight_output(cfg)
    # a run folder whose `latest` names a deleted step and no complete checkpoint
    run = tmp_path / "run"
    shutil.copytree(out, run)
    for name in os.listdir(run / "checkpoints"):
        if name.startswith("step_"):
            shutil.rmtree(run / "checkpoints" / name)
    cfg = load_config(CONFIG, [f"output={tmp_path / 'o2'}", f"checkpoint.resume={run}"])
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        ckpt.preflight_output(cfg)
    # resume=true with nothing there starts fresh (the loop logs it)
    cfg = load_config(CONFIG, [f"output={tmp_path / 'o3'}", "checkpoint.resume=true"])
    ckpt.preflight_output(cfg)
