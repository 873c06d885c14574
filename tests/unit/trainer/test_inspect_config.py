"""Look before you launch (issue 31 item 10): `--print-config` prints the fully resolved config
and exits 0 without a process group; `--dry-run` adds meta-device parameter counts and the
memory plan; `--diff` lists what two resolved configs differ in."""

import os

import pytest
import torch.distributed as dist
import yaml

from tests.helpers.paths import REPO
from trainer import train as entry

TINY = os.path.join(REPO, "configs", "synthetic_tiny.yaml")


def _run(capsys, *argv):
    code = entry.main([*argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_print_config_resolves_presets_aliases_auto_batch_and_schedule(tmp_path, capsys):
    out_dir = tmp_path / "never_made"
    argv = [TINY, f"output={out_dir}", "compat=arcface_torch", "eval.every_steps=7"]
    code, out, err = _run(
        capsys, *argv, "optim.gradient_acc=2", "--print-config", "--world-size", "4"
    )
    assert code == 0, err
    r = yaml.safe_load(out)
    assert r["config"]["schedule"]["power"] == 1.0  # the compat preset, applied
    assert r["config"]["optim"]["head_decay"] == "dense"
    assert r["config"]["eval"]["verbose"] == 7  # the alias, resolved to the saved name
    ds = r["ds_config"]  # "auto" filled from the config
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 5.0 and "auto" not in str(ds)
    assert r["batch"] == {"per_rank": 16, "gradient_acc": 2, "world_size": 4, "global": 128}
    assert r["steps"]["steps_per_epoch"] == 2048 // 128 and r["steps"]["total_steps"] == 20
    assert r["lr_schedule"]["lr_at_step"][0] == 0.1 and r["lr_schedule"]["lr_at_step"][19] > 0
    assert not (dist.is_available() and dist.is_initialized())  # no process group
    assert not out_dir.exists()  # nothing written


def test_print_config_bad_input_is_exit_2(capsys):
    code, out, err = _run(capsys, TINY, "optim.lr=-1", "--print-config")
    assert code == 2 and out == "" and err.startswith("arcscale: config error:")
    assert "optim.lr" in err


def test_dry_run_counts_meta_parameters_and_plans_memory(tmp_path, capsys):
    import models

    code, out, err = _run(
        capsys, TINY, f"output={tmp_path / 'x'}", "--dry-run", "--world-size", "2"
    )
    assert code == 0, err
    dry = yaml.safe_load(out)["dry_run"]
    net = models.create("r18", embedding_size=64, base_width=8)  # what the run would build
    assert dry["backbone_params"] == sum(p.numel() for p in net.parameters())
    assert dry["head"]["params_total"] == 101 * 64
    assert dry["head"]["rows_per_rank"] == 51 and dry["head"]["params_per_rank"] == 51 * 64
    assert dry["head"]["sampled_per_rank"] == 25  # int(0.5 * 51)
    plan = dry["memory_plan_gib"]
    assert plan["device_peak"] > 0 and plan["device_peak"] >= max(plan["device_items"].values())


def test_diff_lists_the_changed_fields(tmp_path, capsys):
    other = tmp_path / "other.yaml"
    with open(TINY) as f:
        text = f.read()
    other.write_text(text.replace("lr: 0.1", "lr: 0.05").replace("batch_size: 16", "batch_size: 8"))
    code, out, err = _run(capsys, TINY, f"output={tmp_path}/o", "--diff", str(other))
    assert code == 0, err
    lines = out.splitlines()
    assert "config.optim.lr: 0.1 -> 0.05" in lines
    assert (
        "ds_config.train_micro_batch_size_per_gpu: 16 -> 8" in lines
        and "batch.global: 16 -> 8" in lines
    )
    assert not any(line.startswith("config.model") for line in lines)


@pytest.fixture(autouse=True)
def _no_launcher(monkeypatch):
    for name in (
        "WORLD_SIZE",
        "RANK",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE",
        "ACCELERATE_CONFIG_DS_FIELDS",
    ):
        monkeypatch.delenv(name, raising=False)
