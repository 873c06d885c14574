"""`compat: arcface_torch` against arcface_torch's step written from its published formulas.

The reference below is built from the equations of arcface_torch's `partial_fc_v2.py`
(`PartialFC_V2.forward`: `weight[index]` of an `nn.Parameter`, normalized embeddings and rows,
cosines clamped to [-1, 1]), `losses.py` (`CombinedMarginLoss`: ArcFace's `cos(theta + m2)`
written under `torch.no_grad`, so the slope at the target is `s`; CosFace `cos - m3`),
`DistCrossEntropy` (softmax, target probability clamped at 1e-30, gradient `(p - onehot) / B`),
`torch.optim.SGD` over the whole weight (momentum and weight decay on every row every step) and
`lr_scheduler.PolynomialLRWarmup` (power 1): no arcscale head code. Our side is the trainer's
own `build_head` under a config with `compat: arcface_torch`.

Switches covered: head.margin_gradient, head.clamping, optim.head_decay, schedule.power (all
those `trainer.config.COMPAT_PRESETS["arcface_torch"]` sets). The backbone's optimizer is
torch's SGD in both (no switch).
"""

import pytest
import torch

from trainer.config import COMPAT_PRESETS, load_config
from trainer.lr import poly_lr
from trainer.run import build_head

B, C, D, STEPS, TOTAL = 8, 40, 16, 6, 10


def _polynomial_lr_warmup(base: float, warmup: int, total: int, steps: int, power: float = 1.0):
    """arcface_torch's PolynomialLRWarmup as it runs: lr of each optimizer step 0..steps-1
    (its `get_lr` recursion, applied once per `scheduler.step()`)."""
    lrs, lr = [], base
    for last in range(steps):
        if last == 0 or last > total:
            pass  # get_lr returns the group's current lr
        elif last <= warmup:
            lr = base * last / warmup
        else:
            w, t = warmup, total
            lr *= ((1.0 - (last - w) / (t - w)) / (1.0 - (last - 1 - w) / (t - w))) ** power
        lrs.append(lr)
    return lrs


def _reference_step(weight, buf, x, labels, index, lr, s, margin, wd, momentum):
    """One arcface_torch step on a single process. Returns (weight, buf, loss, dL/dx)."""
    m1, m2, m3 = margin
    rows = torch.arange(x.shape[0])
    target = torch.searchsorted(index, labels)  # labels inside the sorted sampled rows
    w = weight[index]
    xn, wn = x.norm(dim=1, keepdim=True), w.norm(dim=1, keepdim=True)
    e, u = x / xn, w / wn
    cos = (e @ u.T).clamp(-1.0, 1.0)
    z = cos.clone()
    if m1 == 1.0 and m3 == 0.0:  # ArcFace, edited under no_grad
        z[rows, target] = torch.cos(torch.arccos(cos[rows, target]) + m2)
    else:  # CosFace
        z[rows, target] = cos[rows, target] - m3
    p = torch.softmax(s * z, dim=1)
    loss = -p[rows, target].clamp_min(1e-30).log().mean()
    onehot = torch.zeros_like(p)
    onehot[rows, target] = 1.0
    g = s * (p - onehot) / x.shape[0]  # dL/dcos: slope s at every logit
    g = g * (cos.abs() < 1.0)  # the clamp passes gradient inside [-1, 1]
    de, du = g @ u, g.T @ e
    dx = (de - e * (de * e).sum(1, keepdim=True)) / xn
    dw = (du - u * (du * u).sum(1, keepdim=True)) / wn
    grad = torch.zeros_like(weight)
    grad[index] = dw
    d = grad + wd * weight  # torch.optim.SGD: decay on every row of the Parameter
    buf = d.clone() if buf is None else momentum * buf + d
    return weight - lr * buf, buf, loss, dx


WD = 0.05  # large enough that one step of skipped decay (lr * WD * |w|) is far above fp32 noise


def _max_error(cfg, margin):
    """Runs STEPS steps of the trainer's head under `cfg` and of the reference on the same
    inputs (sampling: the rows our head drew); returns the largest relative error of loss and
    embedding gradient and whole head weight (Frobenius norms), over the steps."""
    head, opt = build_head(cfg, torch.device("cpu"), "fp32")
    head.fix_batch_size(B)
    gen = torch.Generator().manual_seed(0)
    weight, buf = head.weight.detach().clone(), None
    ref_lrs = _polynomial_lr_warmup(cfg.optim.lr, 0, TOTAL, STEPS, power=1.0)
    err_loss = err_dx = err_w = 0.0
    for step in range(STEPS):
        lr = poly_lr(step, cfg.optim.lr, TOTAL, 0, cfg.schedule.power)
        x = torch.randn(B, D, generator=gen)
        labels = torch.randint(0, C, (B,), generator=gen)
        leaf = x.clone().requires_grad_(True)
        opt.set_lr(lr)
        loss, _ = head(leaf, labels)
        loss.backward()
        index, _ = head.sparse_grad()
        assert index.numel() == int(cfg.head.sample_rate * C)
        weight, buf, ref_loss, ref_dx = _reference_step(
            weight, buf, x, labels, index, ref_lrs[step], cfg.head.scale, margin, WD, 0.9
        )
        opt.unscale_(loss_scale=1.0)
        opt.step()
        opt.zero_grad()
        if cfg.optim.head_decay == "dense":
            opt.flush()  # rows skipped by sampling: their lazy decay and momentum, now
        err_loss = max(err_loss, abs(loss.item() / ref_loss.item() - 1))
        err_dx = max(err_dx, ((leaf.grad - ref_dx).norm() / ref_dx.norm()).item())
        err_w = max(err_w, ((head.weight.detach() - weight).norm() / weight.norm()).item())
    return err_loss, err_dx, err_w


@pytest.mark.parametrize("sample_rate", [1.0, 0.5])
@pytest.mark.parametrize("margin", [(1.0, 0.5, 0.0), (1.0, 0.0, 0.4)], ids=["arcface", "cosface"])
def test_compat_step_matches_arcface_torch(sample_rate, margin):
    """Six SGD steps (lr 0.1 decaying linearly over 10, momentum 0.9, weight decay 0.05, s 64):
    under `compat: arcface_torch` loss, embedding gradient and the whole head weight (unsampled
    rows brought up to date) match the reference at every step; sample_rate < 1 uses the rows
    our head sampled. The default config does not where a switch matters (its loss: with s 64
    some target probabilities fall below the 1e-30 clamp; its update at sample_rate < 1: dense
    decay; ArcFace: the margin's slope), so the comparison tells them apart. The cosine clamp
    to [-1, 1] is on but not reached by these inputs (tests/unit/heads/test_margin*.py cover it)."""
    overrides = [
        "data.kind=synthetic",
        "data.num_image=100",
        f"data.num_classes={C}",
        f"model.embedding_size={D}",
        f"head.sample_rate={sample_rate}",
        f"head.margin_list=[{margin[0]}, {margin[1]}, {margin[2]}]",
        "head.scale=64",
        "optim.lr=0.1",
        "optim.momentum=0.9",
        f"optim.weight_decay={WD}",
    ]
    cfg = load_config(None, ["compat=arcface_torch", *overrides])
    for dotted, value in COMPAT_PRESETS["arcface_torch"].items():
        section, name = dotted.split(".")
        assert getattr(getattr(cfg, section), name) == value, dotted
    for step, lr in enumerate(_polynomial_lr_warmup(0.1, 0, TOTAL, STEPS)):
        assert poly_lr(step, 0.1, TOTAL, 0, cfg.schedule.power) == pytest.approx(lr, rel=1e-12)
    err_loss, err_dx, err_w = _max_error(cfg, margin)
    assert err_loss < 1e-5 and err_dx < 1e-5 and err_w < 1e-5, (err_loss, err_dx, err_w)
    ours = _max_error(load_config(None, [*overrides, "schedule.power=1"]), margin)
    assert ours[0] > 1e-3, ours  # the 1e-30 clamp: the default reports the unclamped loss
    if sample_rate == 1.0 and margin[1] == 0.0:  # CosFace, every row sampled: same update
        assert ours[1] < 1e-5 and ours[2] < 1e-5, ours
    else:
        assert ours[2] > 1e-3, ours  # far outside the tolerance above
