"""Fine-tuning (docs/finetune.md) in this process: `model.pretrained` loading and the freezing
plan. The same under ZeRO-1/2/3 through the real entry point: tests/integration/test_finetune.py."""

import os

import pytest
import torch

import models
from tests.helpers.paths import REPO
from tests.helpers.pretrained import TINY_NET, pretrained_file
from trainer.config import ConfigError, load_config
from trainer.freeze import build_freeze_plan, frozen_prefixes, param_groups
from trainer.pretrained import load_pretrained

CONFIG = os.path.join(REPO, "configs", "lfw_demo_r18.yaml")


def _tiny(**more):
    overrides = [
        "model.network=r18",
        "model.embedding_size=64",
        "model.kwargs={base_width: 8}",
        *(f"{k}={v}" for k, v in more.items()),
    ]
    return load_config(CONFIG, overrides)


def test_load_pretrained_strict_and_not(tmp_path):
    """An arcface_torch-style plain state dict (with or without DDP's `module.` prefix) loads
    exactly; a mismatch is a ConfigError listing the keys, or with `pretrained_strict=false`
    loads the rest and logs them."""
    ref = pretrained_file(tmp_path / "backbone.pth", prefix="module.")
    net = models.create("r18", **TINY_NET)
    assert load_pretrained(_tiny(**{"model.pretrained": tmp_path / "backbone.pth"}), net) == len(
        ref
    )
    for k, v in net.state_dict().items():
        assert torch.equal(v, ref[k]), k

    bad = dict(ref)
    bad.pop("fc.weight")
    bad["extra.weight"] = torch.zeros(1)
    bad["features.bias"] = torch.zeros(3)
    torch.save(bad, tmp_path / "bad.pth")
    cfg = _tiny(**{"model.pretrained": tmp_path / "bad.pth"})
    with pytest.raises(ConfigError) as err:
        load_pretrained(cfg, models.create("r18", **TINY_NET))
    text = str(err.value)
    assert "model.pretrained" in text and "missing keys (1): fc.weight" in text
    assert "unexpected keys (1): extra.weight" in text and "features.bias: checkpoint (3,)" in text
    lines = []
    cfg = _tiny(**{"model.pretrained": tmp_path / "bad.pth", "model.pretrained_strict": "false"})
    net = models.create("r18", **TINY_NET)
    assert load_pretrained(cfg, net, lines.append) == len(ref) - 2
    assert torch.equal(net.state_dict()["conv1.weight"], ref["conv1.weight"])
    assert any("fc.weight" in line for line in lines)
    with pytest.raises(ConfigError, match="does not exist"):
        load_pretrained(_tiny(**{"model.pretrained": tmp_path / "none.pt"}), net)


def test_freeze_plan_groups_hooks_and_bn():
    """Stage groups name the stem and first stages; while frozen a parameter's gradient is zero,
    its group's lr and decay 0 and its BatchNorm in eval mode; later everything trains with
    `lr * backbone_lr_scale`."""
    cfg = _tiny(
        **{
            "model.freeze_stages": 1,
            "model.freeze_steps": 4,
            "optim.head_warmup_steps": 2,
            "optim.backbone_lr_scale": 0.1,
        }
    )
    net = models.create("r18", **TINY_NET)
    assert frozen_prefixes(net, 1) == ("conv1", "bn1", "prelu", "layer1")
    with pytest.raises(ConfigError, match="model.freeze_stages: IResNet has 4 stages"):
        frozen_prefixes(net, 5)
    groups = param_groups(cfg, net)
    stem = {id(p) for p in groups[0]["params"]}
    assert id(net.conv1.weight) in stem and id(net.layer1[0].conv1.weight) in stem
    assert id(net.layer2[0].conv1.weight) not in stem
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=5e-4)
    plan = build_freeze_plan(cfg, net)
    net.train()
    x = torch.randn(2, 3, 112, 112)
    expect = {0: (0.0, 0.0, False, False), 2: (0.0, 0.01, False, True), 4: (0.01, 0.01, True, True)}
    for step, (lr_stem, lr_rest, stem_trains, rest_trains) in expect.items():
        plan.apply(step, 0.1, opt.param_groups)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([lr_stem, lr_rest])
        assert opt.param_groups[0]["weight_decay"] == (5e-4 if stem_trains else 0.0)
        assert net.layer1[0].bn1.training == stem_trains and net.bn2.training == rest_trains
        net.zero_grad()
        net(x).sum().backward()
        assert bool(net.conv1.weight.grad.abs().sum() > 0) == stem_trains, step
        assert bool(net.layer3[0].conv1.weight.grad.abs().sum() > 0) == rest_trains, step
    net.eval()
    assert not net.bn2.training  # eval still reaches every BatchNorm
