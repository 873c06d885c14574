"""Fine-tuning (docs/finetune.md): `model.pretrained` loading, and the freezing controls under
ZeRO-1/2/3 through the real entry point (2 CPU processes, real LFW faces)."""

import os

import pytest
import torch

import models
from tests.launch import REPO, accelerate, check, losses
from tests.test_train_e2e import NUM_SMALL, _overrides, lfw_data  # noqa: F401 (fixture)
from trainer.config import ConfigError, load_config
from trainer.freeze import build_freeze_plan, frozen_prefixes, param_groups
from trainer.pretrained import load_pretrained

CONFIG = os.path.join(REPO, "configs", "lfw_demo_r18.yaml")
TINY_NET = {"embedding_size": 64, "base_width": 8}


def _tiny(**more):
    overrides = [
        "model.network=r18",
        "model.embedding_size=64",
        "model.kwargs={base_width: 8}",
        *(f"{k}={v}" for k, v in more.items()),
    ]
    return load_config(CONFIG, overrides)


def _pretrained_file(path, seed=0, prefix=""):
    """A trained-looking r18: random weights and BatchNorm statistics away from (0, 1)."""
    torch.manual_seed(seed)
    net = models.create("r18", **TINY_NET)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if name.endswith(("running_mean", "running_var")):
                t.copy_(torch.rand_like(t) + 0.5)
    state = {prefix + k: v for k, v in net.state_dict().items()}
    torch.save(state, path)
    return net.state_dict()


def test_load_pretrained_strict_and_not(tmp_path):
    """An arcface_torch-style plain state dict (with or without DDP's `module.` prefix) loads
    exactly; a mismatch is a ConfigError listing the keys, or with `pretrained_strict=false`
    loads the rest and logs them."""
    ref = _pretrained_file(tmp_path / "backbone.pth", prefix="module.")
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


def _frozen_equal(state, ref, prefixes):
    return all(torch.equal(v, ref[k]) for k, v in state.items() if k.split(".")[0] in prefixes)


@pytest.mark.slow
def test_finetune_under_zero_stages(lfw_data, tmp_path):  # noqa: F811 (fixture)
    """From an arcface_torch-style `backbone.pth`, head warm-up 2 steps, stem + layer1 frozen for
    4 steps, backbone lr x0.5, under ZeRO-1/2/3: the saved backbone equals the pretrained one
    after the warm-up, stem and layer1 (weights and BatchNorm statistics) still do after step 4
    while later stages moved, and step 5 moves the stem. `model.freeze_bn` (ZeRO-2) keeps every
    running statistic. Resume (ZeRO-2) continues the fine-tune run's loss curve."""
    ref = _pretrained_file(tmp_path / "backbone.pth", seed=1)
    stem = ("conv1", "bn1", "prelu", "layer1")
    base = [
        f"model.pretrained={tmp_path / 'backbone.pth'}",
        "optim.head_warmup_steps=2",
        "model.freeze_stages=1",
        "model.freeze_steps=4",
        "optim.backbone_lr_scale=0.5",
        "engine.precision=fp32",
        "checkpoint.every=1",
        "checkpoint.keep_last=5",
        "optim.lr=0.05",
    ]
    curves = {}
    for stage in (1, 2, 3):
        out = tmp_path / f"z{stage}"
        more = ["model.freeze_bn=true"] if stage == 2 else []
        ov = _overrides(out, lfw_data, 5, *base, *more)
        stdout = check(accelerate(CONFIG, ov, f"accelerate_configs/cpu_2proc_zero{stage}.yaml"))
        assert f"ZeRO-{stage}" in stdout and "pretrained backbone: " in stdout
        curves[stage] = losses(stdout)
        assert len(curves[stage]) == 5

        def saved(step, out=out):
            path = out / "checkpoints" / f"step_{step}" / "backbone.pt"
            return torch.load(path, weights_only=True)

        s2, s4, s5 = saved(2), saved(4), saved(5)
        assert all(torch.equal(v, ref[k]) for k, v in s2.items()), stage
        assert _frozen_equal(s4, ref, stem), stage
        assert not torch.equal(s4["layer3.0.conv1.weight"], ref["layer3.0.conv1.weight"])
        assert not torch.equal(s5["conv1.weight"], ref["conv1.weight"])
        stats = [k for k in s5 if k.endswith("running_mean")]
        kept = [torch.equal(s5[k], ref[k]) for k in stats]
        assert all(kept) if stage == 2 else not any(kept), stage
        if stage == 2:
            s5_zero2 = s5
    step3 = tmp_path / "z2" / "checkpoints" / "step_3"
    ov = _overrides(tmp_path / "resumed", lfw_data, 5, *base, "model.freeze_bn=true")
    ov.append(f"checkpoint.resume={step3}")
    resumed = check(accelerate(CONFIG, ov, "accelerate_configs/cpu_2proc_zero2.yaml"))
    assert "resumed from" in resumed
    got = losses(resumed)
    assert sorted(got) == [4, 5]
    for step in (4, 5):
        assert got[step] == pytest.approx(curves[2][step], abs=1e-4), (got, curves[2])
    again = torch.load(tmp_path / "resumed" / "checkpoints" / "step_5" / "backbone.pt")
    assert torch.allclose(again["layer3.0.conv1.weight"], s5_zero2["layer3.0.conv1.weight"])


def test_finetune_split_refuses_overlapping_folds(tmp_path):
    """The fine-tuning split must stay identity-disjoint from the held-out folds."""
    from tools.prepare_lfw import build_finetune_split

    with pytest.raises(ValueError, match="overlap"):
        build_finetune_split("unused", str(tmp_path), [1, 2, 3], [3, 4], {})
