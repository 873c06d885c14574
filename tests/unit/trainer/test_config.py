"""Config loading, validation, derived values, DeepSpeed config filling and the LR schedule."""

import os

import pytest
import yaml

from tests.helpers.paths import REPO
from trainer.config import ConfigError, load_config, resolve, save_config
from trainer.engine import EngineSettings, build_ds_config, resolve_engine_settings
from trainer.lr import poly_lr

CONFIGS = sorted(
    os.path.join(REPO, "configs", f) for f in os.listdir(os.path.join(REPO, "configs"))
)


def _write(tmp_path, data, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.data.num_classes > 0
    assert cfg.model.network


def test_overrides_and_types(tmp_path):
    path = _write(tmp_path, {"data": {"kind": "synthetic", "num_classes": 10, "num_image": 64}})
    cfg = load_config(path, ["optim.lr=0.05", "head.margin_list=[1.0,0.0,0.4]", "seed=7"])
    assert cfg.optim.lr == 0.05
    assert cfg.head.margin_list == (1.0, 0.0, 0.4)
    assert cfg.seed == 7
    # arcface_torch defaults
    assert (cfg.optim.momentum, cfg.optim.weight_decay, cfg.head.scale) == (0.9, 5e-4, 64.0)
    assert cfg.model.embedding_size == 512 and cfg.logging.frequent == 10
    # YAML 1.1 reads 5e-4 (no dot) as a string; float fields take it as the number it spells
    cfg = load_config(path, ["optim.weight_decay=1e-4", "engine.sync_bn=true"])
    assert cfg.optim.weight_decay == 1e-4 and cfg.engine.sync_bn is True


@pytest.mark.parametrize(
    "data, overrides, needle",
    [
        ({"optim": {"lrr": 1}}, [], "unknown key 'optim.lrr'"),
        ({"bogus": 1}, [], "unknown key 'bogus'"),
        ({}, ["data.batch_size=abc"], "data.batch_size: expected an integer"),
        ({}, ["optim.lr=fast"], "optim.lr: expected a number"),
        ({}, ["data.batch_size=0"], "data.batch_size: must be > 0"),
        ({}, ["head.sample_rate=1.5"], "head.sample_rate"),
        ({}, ["engine.precision=fp8"], "engine.precision"),
        ({}, ["optim.optimizer=lamb"], "optim.optimizer"),
        ({}, ["data.kind=rec", "data.rec="], "data.rec: required"),
        ({}, ["head.margin_list=[1.0]"], "head.margin_list"),
        ({}, ["checkpoint.resume=3"], "checkpoint.resume"),
        ({}, ["optim.lr"], "key=value"),
    ],
)
def test_bad_values_name_file_and_field(tmp_path, data, overrides, needle):
    base = {"data": {"kind": "synthetic", "num_classes": 10, "num_image": 64}, **data}
    path = _write(tmp_path, base)
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    assert needle in str(err.value)
    where = "command line" if needle == "key=value" else "exp.yaml"
    assert where in str(err.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(str(bad))


def test_resolved_values_and_saved_config(tmp_path):
    path = _write(
        tmp_path,
        {
            "data": {"kind": "synthetic", "num_classes": 10, "num_image": 1000, "batch_size": 8},
            "optim": {"gradient_acc": 2},
            "schedule": {"num_epoch": 3, "warmup_epoch": 1},
        },
    )
    cfg = load_config(path)
    res = resolve(cfg, world_size=4, num_image=1000)
    assert res.global_batch == 64
    assert res.steps_per_epoch == 1000 // 64
    assert res.total_steps == 3 * (1000 // 64)
    assert res.warmup_steps == 1000 // 64
    out = tmp_path / "config.yaml"
    save_config(cfg, str(out), res.__dict__)
    again = load_config(str(out))
    assert again == cfg
    with pytest.raises(ConfigError, match="exceeds"):
        resolve(cfg, world_size=4, num_image=10)


def test_engine_precedence_and_ds_config(tmp_path):
    path = _write(tmp_path, {"data": {"kind": "synthetic", "num_classes": 10, "num_image": 64}})
    cfg = load_config(path, ["data.batch_size=12", "optim.gradient_acc=3", "optim.clip_grad=2.5"])
    # Accelerate launch config decides when the experiment config leaves it open.
    env = {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3", "ACCELERATE_MIXED_PRECISION": "no"}
    s = resolve_engine_settings(cfg, env)
    assert (s.zero_stage, s.precision) == (3, "bf16")  # Accelerate's "no" = unset: the JSON's
    # ... the experiment config wins over it.
    cfg2 = load_config(path, ["engine.zero_stage=1", "engine.precision=bf16"])
    s2 = resolve_engine_settings(cfg2, env)
    assert (s2.zero_stage, s2.precision) == (1, "bf16")
    # Nothing set anywhere: the default JSON (ZeRO-2 bf16).
    s3 = resolve_engine_settings(cfg, {})
    assert (s3.zero_stage, s3.precision) == (2, "bf16")

    ds = build_ds_config(cfg, EngineSettings(3, "fp16", "ds_configs/zero2_bf16.json"))
    assert ds["train_micro_batch_size_per_gpu"] == 12
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["gradient_clipping"] == 2.5
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["fp16"]["enabled"] is True and ds["bf16"]["enabled"] is False
    assert "buffer_dtype" not in ds["data_types"]  # BatchNorm running stats stay fp32
    ds32 = build_ds_config(cfg, EngineSettings(1, "fp32", "ds_configs/zero3_bf16.json"))
    assert "buffer_dtype" not in ds32.get("data_types", {})
    assert not any(k.startswith("stage3_") for k in ds32["zero_optimization"])
    with pytest.raises(ConfigError, match="not found"):
        resolve_engine_settings(load_config(path, ["engine.ds_config=nope.json"]), {})


def test_poly_lr_matches_formula():
    base, total, warm = 0.1, 100, 10
    assert poly_lr(0, base, total, warm) == 0.0
    assert poly_lr(5, base, total, warm) == pytest.approx(0.05)
    assert poly_lr(10, base, total, warm) == pytest.approx(base)
    assert poly_lr(55, base, total, warm) == pytest.approx(base * (1 - 45 / 90) ** 2)
    assert poly_lr(100, base, total, warm) == 0.0
    assert poly_lr(3, base, total, 0) == pytest.approx(base * (1 - 3 / 100) ** 2)


def test_clear_aliases_for_arcface_torch_names(tmp_path):
    data = {"path": "/d", "batch_size": 8, "num_classes": 10}
    path = _write(tmp_path, {"eval": {"every_steps": 500}, "data": data})
    cfg = load_config(str(path), ["logging.every_steps=7", "data.path=/e"])
    assert (cfg.eval.verbose, cfg.logging.frequent, cfg.data.rec) == (500, 7, "/e")
    both = _write(tmp_path, {"eval": {"every_steps": 5, "verbose": 6}}, "both.yaml")
    with pytest.raises(ConfigError, match="'eval.every_steps' and 'eval.verbose'"):
        load_config(str(both))


UPSTREAM = "# upstream: insightface recognition/arcface_torch/configs/"


@pytest.mark.parametrize(
    "name",
    [
        "ms1mv2_r50",
        "ms1mv3_r50",
        "ms1mv3_r100",
        "ms1mv3_mbf",
        "glint360k_r50",
        "glint360k_r100",
        "wf4m_r50",
        "wf12m_r100",
        "wf42m_pfc03_r100",
        "wf42m_pfc03_vit_b",
        "wf42m_pfc02_vit_l_zero3",
    ],
)
def test_upstream_recipes_cite_their_source(name):
    """Each upstream recipe names its arcface_torch file and commit on the first line and runs
    under `compat: arcface_torch` (linear decay after warm-up, as PolynomialLRWarmup)."""
    path = os.path.join(REPO, "configs", f"{name}.yaml")
    with open(path) as f:
        first = f.readline()
    assert first.startswith(UPSTREAM) and ".py" in first, first
    cfg = load_config(path)
    assert cfg.compat == "arcface_torch" and cfg.schedule.power == 1.0


def test_compat_preset_fills_unset_fields_only(tmp_path):
    """`compat: arcface_torch` sets the preset's fields the config leaves unset; an explicit
    value (file or command line) wins; an unknown preset is an error naming the field."""
    from trainer.config import COMPAT_PRESETS

    path = _write(tmp_path, {"compat": "arcface_torch", "data": {"kind": "synthetic"}})
    base = ["data.num_image=100", "data.num_classes=10"]
    cfg = load_config(path, base)
    preset = COMPAT_PRESETS["arcface_torch"]
    for dotted, value in preset.items():
        section, name = dotted.split(".")
        assert getattr(getattr(cfg, section), name) == value, dotted
    assert load_config(path, [*base, "schedule.power=2"]).schedule.power == 2.0
    assert load_config(None, base + ["data.kind=synthetic"]).schedule.power == 2.0
    with pytest.raises(ConfigError, match="compat: must be one of"):
        load_config(path, [*base, "compat=arcface"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.backbone_lr_scale=0", "optim.backbone_lr_scale: must be > 0"),
        ("optim.head_warmup_steps=-1", "optim.head_warmup_steps: must be >= 0"),
        ("model.freeze_stages=-1", "model.freeze_stages: must be >= 0"),
        ("model.freeze_steps=5", "model.freeze_steps: needs model.freeze_stages > 0"),
        ("model.pretrained_strict=1", "model.pretrained_strict: expected true/false"),
    ],
)
def test_finetune_fields_validated(override, message):
    base = ["data.kind=synthetic", "data.num_image=100", "data.num_classes=10"]
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(None, [*base, override])


def test_default_output_is_work_dirs_config_name_as_arcface_torch(tmp_path):
    synth = {"data": {"kind": "synthetic", "num_classes": 10, "num_image": 64}}
    path = _write(tmp_path, synth, name="ms1mv3_r50_try.yaml")
    assert load_config(path).output == os.path.join("work_dirs", "ms1mv3_r50_try")
    assert load_config(path, ["output=/tmp/elsewhere"]).output == "/tmp/elsewhere"
    given = _write(tmp_path, {**synth, "output": "runs/a"}, name="b.yaml")
    assert load_config(given).output == "runs/a"
    for shipped in CONFIGS:  # the shipped configs already name their output so
        stem = os.path.splitext(os.path.basename(shipped))[0]
        assert load_config(shipped).output == f"work_dirs/{stem}", shipped
