"""Config faults through `trainer.train.main` in this process: each bad config is one stderr
line starting `arcscale: config error:` and exit code 2 (docs/reliability.md). The same through
`python -m trainer.train` and `accelerate launch`: tests/integration/test_faults.py.
"""

from tests.helpers.faults import CONFIG, NUM, bad_configs


def test_config_faults_one_line_exit2(lfw16, tmp_path, capsys, monkeypatch):
    from trainer.train import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for name, (overrides, needle) in bad_configs(lfw16, tmp_path).items():
        assert main([CONFIG, *overrides]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("arcscale: config error:"), (name, err)
        assert needle in err[0], (name, err)
    monkeypatch.setenv("ARCSCALE_FAULT_NAN_LOSS", "five")
    good = [f"output={tmp_path / 'out'}", f"data.rec={lfw16}", f"data.num_classes={NUM}"]
    good.append("eval.val_targets=[]")
    assert main([CONFIG, *good]) == 2
    assert "ARCSCALE_FAULT_NAN_LOSS" in capsys.readouterr().err
