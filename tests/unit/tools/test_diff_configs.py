"""tools/diff_configs.py: two config files, or a config file and a finished run folder."""

import json
import os

from tests.helpers.paths import REPO
from tools.diff_configs import main

TINY = os.path.join(REPO, "configs", "synthetic_tiny.yaml")


def test_config_files_and_run_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main([TINY, TINY]) == 0
    assert capsys.readouterr().out.startswith(f"# {TINY} -> {TINY}: 0 differences")
    assert main([TINY, TINY, "--b", "optim.clip_grad=1.5", "--b", "compat=arcface_torch"]) == 1
    lines = capsys.readouterr().out.splitlines()[1:]
    assert "config.optim.clip_grad: 5.0 -> 1.5" in lines
    assert "ds_config.gradient_clipping: 5.0 -> 1.5" in lines
    assert "config.schedule.power: 2.0 -> 1.0" in lines  # the preset, resolved
    # A run folder: the config.yaml and ds_config.json the trainer wrote there.
    run = tmp_path / "run"
    run.mkdir()
    with open(TINY) as f:
        (run / "config.yaml").write_text(f.read().replace("lr: 0.1", "lr: 0.2"))
    (run / "ds_config.json").write_text(json.dumps({"gradient_clipping": 5.0, "x": 1}))
    assert main([TINY, str(run)]) == 1
    lines = capsys.readouterr().out.splitlines()[1:]
    assert "config.optim.lr: 0.1 -> 0.2" in lines and "ds_config.x: '<unset>' -> 1" in lines
    assert main([TINY, str(tmp_path)]) == 2
    assert "no config.yaml" in capsys.readouterr().err
