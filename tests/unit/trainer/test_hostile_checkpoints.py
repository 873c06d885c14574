"""Careless runs on checkpoint folders (issue 19, trainer/checkpoint.py), in this process:
pruning keeps the checkpoint just written, only our temporary names are cleaned, a garbage
meta.json or an unwritable output is one line, `latest` cannot point outside the run. Hostile
payloads in a real run's checkpoint: tests/integration/test_hostile_checkpoints.py.
"""

import json
import os

import pytest

from trainer import checkpoint as ckpt
from trainer.config import ConfigError, load_config

CONFIG = "configs/synthetic_tiny.yaml"


def test_pruning_never_removes_the_checkpoint_just_written(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 5, 100):
        (root / f"step_{step}").mkdir(parents=True)
        (root / f"step_{step}" / "meta.json").write_text("{}")
    ckpt.prune_checkpoints(str(root), keep_last=1, keep=str(root / "step_5"))
    assert sorted(os.listdir(root)) == ["step_5"]


def test_clean_incomplete_removes_only_its_own_temporary_names(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step_7").mkdir(parents=True)
    (root / "step_7" / "weights.bin").write_bytes(b"someone's weights")
    (root / "step_8.tmp").mkdir()
    removed = ckpt.clean_incomplete(str(root), log=lambda *a: None)
    assert removed == [str(root / "step_8.tmp")]
    assert (root / "step_7" / "weights.bin").is_file()


def test_garbage_meta_json_names_the_file(tmp_path):
    step = tmp_path / "step_3"
    step.mkdir()
    for garbage in ("{not json", "[1, 2]", json.dumps({"step": "x", "epoch": 0, "world_size": 1})):
        (step / "meta.json").write_text(garbage)
        with pytest.raises(ConfigError, match=str(step / "meta.json")):
            ckpt.load_meta(str(step))


def test_unwritable_output_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cfg = load_config(CONFIG, [f"output={blocker / 'run'}"])
    with pytest.raises(ConfigError, match="output: cannot write to"):
        ckpt.preflight_output(cfg)


def test_latest_is_confined_to_the_runs_checkpoints(tmp_path):
    from tools.convert_to_onnx import resolve_checkpoint

    elsewhere = tmp_path / "elsewhere" / "step_9"
    elsewhere.mkdir(parents=True)
    (elsewhere / "meta.json").write_text(json.dumps({"step": 9, "epoch": 0, "world_size": 1}))
    (elsewhere / "backbone.pt").write_bytes(b"")
    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    for name in (str(elsewhere), "../../elsewhere/step_9"):
        (root / "latest").write_text(name + "\n")
        assert ckpt.latest_checkpoint(str(tmp_path / "run")) is None
        with pytest.raises(FileNotFoundError, match="which is no complete step_<N> folder"):
            resolve_checkpoint(tmp_path / "run")
