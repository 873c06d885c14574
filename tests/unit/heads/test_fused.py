"""heads/fused.py: the compiled row kernels give the eager head step's result, fall back to it
when compilation fails, and are chosen by `head.kernels`."""

from __future__ import annotations

import pytest
import torch

from heads import CombinedMarginLoss, PartialFC, build_head_optimizer
from heads import fused as fused_mod
from trainer.config import ConfigError, load_config

C, D = 600, 32


def make(fused: bool, sample_rate: float = 0.5):
    head = PartialFC(
        D, C, sample_rate, CombinedMarginLoss(64.0, 1.0, 0.0, 0.4), seed=5, fused=fused
    )
    opt = build_head_optimizer(head, "sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
    return head, opt


def run_steps(head, opt, steps):
    """Steps as the trainer makes them: (lr, loss scale, skip) per step; returns emb grads."""
    grads = []
    for i, (lr, scale, skip) in enumerate(steps):
        g = torch.Generator().manual_seed(100 + i)
        x = torch.randn(24, D, generator=g, requires_grad=True)
        y = torch.randint(0, C, (24,), generator=g)
        opt.lr = lr
        loss, _ = head(x, y)
        (loss * scale).backward()
        finite = opt.unscale_(scale, blocking=False)
        opt.step(finite & torch.tensor(not skip))
        opt.zero_grad()
        grads.append(x.grad.clone())
    return grads


def test_fused_step_equals_eager_step_over_steps_with_scaling_and_a_skipped_step():
    steps = [(0.1, 1.0, False), (0.08, 1024.0, False), (0.06, 1.0, True), (0.05, 1.0, False)]
    head_f, opt_f = make(True)
    head_e, opt_e = make(False)
    grads_f = run_steps(head_f, opt_f, steps)
    grads_e = run_steps(head_e, opt_e, steps)
    assert not fused_mod._SGD.failed and not fused_mod._RADIAL.failed  # the compiled path ran
    for gf, ge in zip(grads_f, grads_e):
        torch.testing.assert_close(gf, ge, rtol=1e-4, atol=1e-4)  # s=64 amplifies ulps
    # Same update up to rounding (fused multiply-adds): the difference is tiny next to the update.
    init, _ = make(False)
    wf, we, w0 = head_f.weight.detach(), head_e.weight.detach(), init.weight.detach()
    assert float((wf - we).norm()) <= 1e-4 * float((we - w0).norm())
    mf, me = opt_f.state["momentum_buffer"], opt_e.state["momentum_buffer"]
    assert float((mf - me).norm()) <= 1e-4 * float(me.norm())
    # The weights moved, and only on rows some step sampled (others keep their initial value).
    moved = (wf != w0).any(dim=1)
    assert 0 < int(moved.sum()) < C
    assert bool((mf[~moved] == 0).all())


def test_skipped_step_changes_nothing_on_the_fused_path():
    head, opt = make(True)
    run_steps(head, opt, [(0.1, 1.0, False)])
    w0, m0 = head.weight.detach().clone(), opt.state["momentum_buffer"].clone()
    run_steps(head, opt, [(0.1, 1.0, True)])
    assert torch.equal(head.weight, w0)
    assert torch.equal(opt.state["momentum_buffer"], m0)


def test_radial_coef_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    a, w = torch.randn(50, D, generator=g), torch.randn(50, D, generator=g)
    inv = 1 / w.norm(dim=1)
    coef, probe = fused_mod.radial_coef(a, w, inv)
    want = (a * w).sum(1) / w.norm(dim=1) ** 2
    torch.testing.assert_close(coef, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probe, want.sum(), rtol=1e-5, atol=1e-5)


def test_failed_compile_warns_once_and_runs_the_eager_math(monkeypatch):
    def broken_compile(fn, **kwargs):
        def call(*args):
            raise RuntimeError("no compiler here")

        return call

    monkeypatch.setattr(fused_mod.torch, "compile", broken_compile)
    kernel = fused_mod._Kernel(fused_mod._radial_coef_math)
    a, w = torch.randn(4, 3), torch.randn(4, 3)
    inv = torch.ones(4)
    with pytest.warns(RuntimeWarning, match="torch.compile of _radial_coef_math failed"):
        coef, _ = kernel(a, w, inv)
    assert kernel.failed
    torch.testing.assert_close(coef, (a * w).sum(1))
    coef2, _ = kernel(a, 2 * w, inv)  # no second warning: pytest would not catch it here
    torch.testing.assert_close(coef2, 2 * (a * w).sum(1))


def test_resolve_fused_and_config_field(tmp_path):
    assert fused_mod.resolve_fused("auto", "cpu") is False
    assert fused_mod.resolve_fused("auto", "cuda") is True
    assert fused_mod.resolve_fused("compiled", "cpu") is True
    assert fused_mod.resolve_fused("eager", "cuda") is False
    with pytest.raises(ValueError, match="kernels must be one of"):
        fused_mod.resolve_fused("yes", "cpu")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {kind: synthetic, num_classes: 10, num_image: 10}\n")
    assert load_config(str(cfg), ["head.kernels=compiled"]).head.kernels == "compiled"
    with pytest.raises(ConfigError, match="head.kernels"):
        load_config(str(cfg), ["head.kernels=on"])
