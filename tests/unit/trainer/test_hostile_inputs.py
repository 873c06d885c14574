"""Hostile configs and careless runs (issue 19): YAML alias bombs, bad values, unparsable
overrides, and bad data or eval files that `trainer.train.main` refuses with one line and exit
code 2 before any process group. docs/reliability.md maps each case to its test. No launches:
the trainer's checks are called in this process.
"""

import re

import pytest

from data.verification_bin import write_bin
from tests.helpers.hostile import flat_jpeg, make_rec

# --- 4, 9, 10. configs: alias bombs, bad values, unparsable overrides -------------------------

SYNTHETIC = "data: {kind: synthetic, num_image: 64, num_classes: 8}\n"


@pytest.fixture
def cfg_file(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(SYNTHETIC + f"output: {tmp_path / 'run'}\n")  # never work_dirs/ of the checkout
    return str(path)


def _config_error(path, overrides=()):
    from trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


def _laughs(levels):
    """Nested anchors: level k repeats level k-1 nine times (9**levels strings in all)."""
    out = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for prev, name in zip("abcdefgh", "bcdefghi"[: levels - 1]):
        out.append(f"{name}: &{name} [{','.join([f'*{prev}'] * 9)}]")
    return out


@pytest.mark.parametrize("where", ["file", "override"])
def test_deep_nesting_non_utf8_and_huge_values_are_one_short_line(tmp_path, cfg_file, where):
    """Issue 32 item 12: 500+ nesting levels raised RecursionError, a non-UTF-8 file a
    UnicodeDecodeError outside the try, and a 1 MB value came back whole in the error."""
    deep = "[" * 600 + "]" * 600
    huge = "x" * 10**6
    if where == "file":
        nested = tmp_path / "deep.yaml"
        nested.write_text(SYNTHETIC + f"model: {{kwargs: {{a: {deep}}}}}\n")
        assert "nested" in _config_error(str(nested))
        latin1 = tmp_path / "latin1.yaml"
        latin1.write_bytes(SYNTHETIC.encode() + "output: /tmp/caf\xe9\n".encode("latin-1"))
        msg = _config_error(str(latin1))
        assert "latin1.yaml: not UTF-8 text (invalid continuation byte" in msg
        big = tmp_path / "big.yaml"
        big.write_text(SYNTHETIC + f"model: {{network: {huge}}}\n")
        msg = _config_error(str(big))
    else:
        assert "nested" in _config_error(cfg_file, [f"model.kwargs={deep}"])
        msg = _config_error(cfg_file, [f"model.network={huge}"])
    assert re.search(r"x{10}\.\.\.\(100000\d characters\)", msg) and len(msg) < 2200, len(msg)


def test_yaml_alias_bomb_is_refused(tmp_path, cfg_file):
    bomb = "model:\n  kwargs:\n    " + "\n    ".join(_laughs(9)) + "\n" + SYNTHETIC
    assert len(bomb) < 500
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb)
    msg = _config_error(str(path))
    assert msg.startswith(f"{path}: YAML anchors/aliases expand to more than"), msg
    override = "model.kwargs={" + ", ".join(_laughs(7)) + "}"
    assert "aliases expand" in _config_error(cfg_file, [override])


@pytest.mark.parametrize(
    "override, field",
    [
        ("optim.lr=.nan", "optim.lr"),
        ("optim.lr=.inf", "optim.lr"),
        ("schedule.power=0", "schedule.power"),
        ("schedule.power=-2", "schedule.power"),
        ("head.scale=0", "head.scale"),
        ("head.scale=-64", "head.scale"),
        ("optim.clip_grad=-1", "optim.clip_grad"),
        ("head.margin_list=[0.0,0.5,0.0]", "m1"),
        ("head.margin_list=[1.0,-0.5,0.0]", "m2"),
        ("head.margin_list=[1.0,4.0,0.0]", "m2"),
        ("head.margin_list=[1.0,0.0,-0.4]", "m3"),
        ("head.margin_list=[1.0,0.0,1.5]", "m3"),
        ("head.margin_list=[1.0,.nan,0.0]", "head.margin_list"),
        ("schedule.max_steps=-5", "schedule.max_steps"),
        ("optim.momentum=-0.9", "optim.momentum"),
        ("optim.weight_decay=-5e-4", "optim.weight_decay"),
        ("model.network=r51", "model.network"),
        ("model.kwargs={bogus: 1}", "model.kwargs.bogus"),
        ("model.kwargs={embed_dim: 64}", "model.kwargs.embed_dim"),  # a ViT keyword on r50
    ],
)
def test_bad_values_fail_at_load(cfg_file, override, field):
    assert field in _config_error(cfg_file, [override])


def test_bad_value_exits_2_with_one_line_before_any_process_group(cfg_file, tmp_path, capsys):
    import torch.distributed as dist

    from trainer.train import main

    small = [f"output={tmp_path / 'out'}", "model.network=mbf", "schedule.max_steps=1"]
    assert main([cfg_file, "optim.lr=.nan", *small]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "optim.lr" in err[0] and "finite" in err[0], err
    assert not dist.is_initialized()


def test_unparsable_override_and_mixed_key_types(cfg_file, tmp_path):
    msg = _config_error(cfg_file, ["optim.lr=[0.1"])
    assert msg.startswith("command line: 'optim.lr=[0.1': invalid YAML"), msg
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text(SYNTHETIC + "optim: {1: 2, lr: 0.1}\n")
    msg = _config_error(str(mixed))
    assert "mixed.yaml" in msg and "key 1 in 'optim'" in msg, msg


# --- 7, 10. data and eval files, found by the entry point before any process group -----------


def _one_line_exit2(capsys, argv, needle):
    from trainer.train import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("arcscale: config error:"), err
    assert needle in err[0], err
    return err[0]


def test_garbage_property_file_is_one_line(tmp_path, cfg_file, capsys):
    data = make_rec(tmp_path / "rec")
    (tmp_path / "rec" / "property").write_bytes(b"\x00\xffgarbage")
    argv = [cfg_file, "data.kind=rec", f"data.rec={data}", "data.num_classes=4"]
    _one_line_exit2(capsys, argv, "property: expected 'num_classes,height,width'")


def test_eval_bin_with_fewer_pairs_than_folds_fails_at_startup(tmp_path, cfg_file, capsys):
    small = tmp_path / "tiny.bin"
    write_bin(small, [flat_jpeg(112)] * 6, [True, False, True])
    argv = [cfg_file, f"eval.val_targets=[{small}]"]
    _one_line_exit2(capsys, argv, "tiny.bin holds 3 pairs, the 10-fold evaluation needs")


def test_two_eval_targets_with_one_name_are_refused(tmp_path, cfg_file, capsys):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        write_bin(tmp_path / sub / "lfw.bin", [flat_jpeg(112)] * 20, [True, False] * 5)
    targets = f"eval.val_targets=[{tmp_path}/a/lfw.bin,{tmp_path}/b/lfw.bin]"
    _one_line_exit2(capsys, [cfg_file, targets], "have the same name 'lfw'")


def test_pretrained_that_expands_past_the_network_is_refused(tmp_path):
    """Issue 32 item 9: a 0.5 MB .pt given as model.pretrained added 516 MB of RSS (measured
    after the fix: refused with +0.1 MB); the zip's member sizes are checked against the
    network's before anything is inflated."""
    import zipfile

    import torch

    import models
    from trainer.config import ConfigError, load_config
    from trainer.pretrained import load_pretrained

    model = models.create("r18", embedding_size=64, base_width=8)
    path = tmp_path / "backbone.pt"
    torch.save({**model.state_dict(), "extra": torch.zeros(2**23)}, path)
    with zipfile.ZipFile(path) as src:
        members = [(info.filename, src.read(info)) for info in src.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for name, data in members:
            dst.writestr(name, data)
    overrides = [f"output={tmp_path / 'run'}", "data.kind=synthetic", "data.num_classes=8",
                 "data.num_image=64",
                 "model.embedding_size=64",
                 "model.kwargs={base_width: 8}", f"model.pretrained={path}",
                 "model.pretrained_strict=false"]  # fmt: skip
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError, match="backbone.pt: refused: its members expand to"):
        load_pretrained(cfg, model, log=lambda line: None)
