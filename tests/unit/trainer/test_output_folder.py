"""`output` is checked before the run log opens in it (#32 items 11, 16): through `main`, every
unusable folder is one stderr line and exit 2; a non-empty folder that is not a run, and the
filesystem root, are refused."""

import os

import pytest

SYNTHETIC = "data: {kind: synthetic, num_image: 64, num_classes: 8}\n"


@pytest.fixture
def cfg_file(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(SYNTHETIC)
    return str(path)


def _bad_outputs(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    data = tmp_path / "somebodys_data"
    data.mkdir()
    (data / "photo.jpg").write_bytes(b"\xff\xd8")
    return {
        "a file": (str(a_file), "exists and is not a folder"),
        "under a file": (str(a_file / "run"), "cannot write to"),
        "empty": ("", "output: empty"),
        "too long": (str(tmp_path / ("x" * 300)), "cannot write to"),
        "root": ("/", "is the filesystem root"),
        "foreign": (str(data), "holds no arcscale run"),
    }


def test_unusable_output_is_one_line_exit2_through_main(cfg_file, tmp_path, capsys, monkeypatch):
    from trainer.train import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    before = sorted(os.listdir("/"))
    for name, (output, needle) in _bad_outputs(tmp_path).items():
        assert main([cfg_file, f"output={output}", "schedule.max_steps=1"]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("arcscale: config error: output"), (name, err)
        assert needle in err[0], (name, err)
    assert sorted(os.listdir("/")) == before  # nothing written into the root
    assert sorted(os.listdir(tmp_path / "somebodys_data")) == ["photo.jpg"]


def test_foreign_folder_is_accepted_with_overwrite_and_a_run_folder_without(tmp_path):
    from trainer.checkpoint import prepare_output_folder

    data = tmp_path / "d"
    data.mkdir()
    (data / "notes.txt").write_text("x")
    prepare_output_folder(str(data), overwrite=True)
    run = tmp_path / "run"
    run.mkdir()
    (run / "training.log").write_text("a previous attempt")
    prepare_output_folder(str(run))  # a run's folder: resume and refusal rules decide later
