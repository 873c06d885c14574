"""Margin losses by name: config fields and their errors, the memory contract of the CE with a
re-weighting loss, state updated by training forwards only, checkpoint errors."""

from __future__ import annotations

import pytest
import torch

from heads import (
    LOSSES,
    PartialFC,
    build_margin,
    load_head,
    margin_softmax_cross_entropy,
    save_head,
)
from heads.comm import Topology
from trainer.config import ConfigError, load_config

CONFIG = "configs/synthetic_tiny.yaml"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["head.loss=sphereface2"], "head.loss"),
        (["head.loss=adaface", "head.loss_kwargs={q: 1}"], "head.loss_kwargs"),
        (["head.loss=magface", "head.loss_kwargs={l_a: 50, u_a: 40}"], "head.loss_kwargs"),
        (["head.loss=adaface", "head.margin_list=[1.0, 0.0, 0.4]"], "head.margin_list"),
        (["head.margin_gradient=approximate"], "head.margin_gradient"),
        (["head.clamping=yes"], "head.clamping"),
    ],
)
def test_bad_loss_fields_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=rf"{CONFIG} \+ command line: {field}"):
        load_config(CONFIG, overrides)


def test_every_registered_loss_loads_from_the_config_and_defaults_stay_combined():
    cfg = load_config(CONFIG)
    assert (cfg.head.loss, cfg.head.margin_gradient, cfg.head.clamping) == (
        "combined",
        "exact",
        "none",
    )
    for name in LOSSES:
        cfg = load_config(CONFIG, [f"head.loss={name}"])
        assert cfg.head.loss == name
    cfg = load_config(CONFIG, ["head.loss=elasticface_cos", "head.loss_kwargs={std: 0.02}"])
    assert build_margin(cfg.head.loss, loss_kwargs=cfg.head.loss_kwargs).std == 0.02


@pytest.mark.parametrize("name", ["curricularface", "arcface"])
def test_ce_returns_its_gradient_in_the_cosine_buffer(name):
    """One (N, K) buffer: the gradient handed back for ``cos`` is ``cos``'s own storage, also
    for a loss that re-weights non-target logits (block-wise path)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(6, 40, generator=g) * 2 - 1).requires_grad_(True)
    cos = x * 1.0
    ptr = cos.data_ptr()
    seen = []
    cos.register_hook(lambda grad: seen.append(grad.data_ptr()))
    labels = torch.tensor([0, 5, 9, -1, 39, 5])
    loss = margin_softmax_cross_entropy(cos, labels, build_margin(name), Topology(None, 0, 1))
    loss.backward()
    assert seen == [ptr]
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def _forward(head, train):
    head.train(train)
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(8, 16, generator=g) * 10
    with torch.set_grad_enabled(train):
        loss, _ = head(emb.requires_grad_(train), torch.arange(8))
    if train:
        loss.backward()
        head.zero_grad()
    return loss.detach()


def test_state_moves_on_training_forwards_only():
    heads = {n: PartialFC(16, 20, 1.0, build_margin(n)) for n in ("curricularface", "adaface")}
    heads["elastic"] = PartialFC(16, 20, 1.0, build_margin("elasticface_arc", seed=3))
    for head in heads.values():
        before = {k: v.clone() for k, v in head.margin_loss.state_dict().items()}
        _forward(head, False)
        after = head.margin_loss.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        _forward(head, True)
        after = head.margin_loss.state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before)
    # evaluation uses ElasticFace's mean margin: deterministic
    assert torch.equal(_forward(heads["elastic"], False), _forward(heads["elastic"], False))


def test_stateful_loss_refuses_a_checkpoint_without_its_state(tmp_path):
    save_head(str(tmp_path), PartialFC(16, 20, 1.0, build_margin("arcface")))
    head = PartialFC(16, 20, 1.0, build_margin("curricularface"))
    with pytest.raises(ValueError, match=r"shard_0_20.pt: saved margin"):
        load_head(str(tmp_path), head)
