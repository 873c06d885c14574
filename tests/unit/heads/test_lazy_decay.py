"""Dense (arcface_torch) head weight decay and momentum, applied lazily, against a dense SGD."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from heads import CombinedMarginLoss, PartialFC, build_head_optimizer
from heads.lazy_decay import LazyDenseDecay
from tests.helpers.head_steps import step_heads

LR = [0.2, 0.15, 0.1, 0.1, 0.05, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.01]
MOMENTUM, WD = 0.9, 0.05  # a large decay, so a missed step shows


def test_lazy_rows_equal_stepwise_dense_sgd_with_flushes_and_skipped_steps():
    torch.manual_seed(0)
    n, d = 40, 6
    w0, b0 = torch.randn(n, d, dtype=torch.float64), torch.randn(n, d, dtype=torch.float64)
    ref_w, ref_b = w0.clone(), b0.clone()
    w, b = w0.float(), b0.float()
    lazy = LazyDenseDecay(n, torch.device("cpu"), flush_every=3)
    g = torch.Generator().manual_seed(1)
    for t, lr in enumerate(LR):
        rows = torch.randperm(n, generator=g)[:7].sort().values
        ok = torch.tensor(t != 4)  # step 4 is skipped (fp16 overflow): no row moves
        lazy.catch_up(rows, w, b)
        torch.testing.assert_close(w[rows].double(), ref_w[rows], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b[rows].double(), ref_b[rows], rtol=1e-5, atol=1e-5)
        grad = torch.zeros(n, d, dtype=torch.float64)
        grad[rows] = torch.randn(rows.numel(), d, generator=g, dtype=torch.float64)
        if bool(ok):  # reference: torch.optim.SGD's rule on every row, dense gradient
            ref_b = MOMENTUM * ref_b + grad + WD * ref_w
            ref_w = ref_w - lr * ref_b
            db = MOMENTUM * b[rows] + grad[rows].float() + WD * w[rows]
            b[rows] = db
            w[rows] = w[rows] - lr * db
        lazy.advance(rows, lr, MOMENTUM, WD, ok, w, b)
    lazy.flush(w, b)
    torch.testing.assert_close(w.double(), ref_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.double(), ref_b, rtol=1e-5, atol=1e-5)
    assert lazy.steps == 0 and int(lazy.slot.max()) == 0


def _reference_step(weight, buf, index, emb, labels, lr, s=64.0, m3=0.4):
    """arcface_torch's step from the formulas: CosFace logits on weight[index], cross-entropy,
    torch.optim.SGD (momentum, weight decay) over the whole parameter."""
    weight = weight.detach().requires_grad_(True)
    sub = weight[index]
    cos = F.normalize(emb) @ F.normalize(sub).t()
    pos = torch.searchsorted(index, labels)
    logits = cos * s
    logits = logits.scatter(1, pos[:, None], (cos.gather(1, pos[:, None]) - m3) * s)
    F.cross_entropy(logits, pos).backward()
    with torch.no_grad():
        buf = MOMENTUM * buf + weight.grad + WD * weight
        return (weight - lr * buf).detach(), buf


def test_head_optimizer_dense_decay_matches_dense_sgd_over_steps():
    torch.manual_seed(0)
    num_classes, dim, n = 60, 16, 8
    head = PartialFC(dim, num_classes, 0.25, CombinedMarginLoss(64.0, 1.0, 0.0, 0.4), seed=3)
    opt = build_head_optimizer(
        head, "sgd", lr=LR[0], momentum=MOMENTUM, weight_decay=WD, dense_decay=True
    )
    sparse_head = PartialFC(dim, num_classes, 0.25, CombinedMarginLoss(64.0, 1.0, 0.0, 0.4), seed=3)
    sparse_opt = build_head_optimizer(sparse_head, "sgd", momentum=MOMENTUM, weight_decay=WD)
    ref_w, ref_b = head.weight.detach().clone(), torch.zeros(num_classes, dim)
    g = torch.Generator().manual_seed(5)
    for lr in LR:
        emb = torch.randn(n, dim, generator=g)
        labels = torch.randint(0, num_classes, (n,), generator=g)
        step_heads([(head, opt), (sparse_head, sparse_opt)], emb, labels, lr)
        index = head.sampled_index
        assert index.numel() < num_classes  # sampling really leaves rows out
        ref_w, ref_b = _reference_step(ref_w, ref_b, index, emb, labels, lr)
        torch.testing.assert_close(head.weight[index], ref_w[index], rtol=1e-4, atol=1e-6)
    sd = opt.state_dict()  # flushes: every row is current, as a checkpoint must see it
    torch.testing.assert_close(head.weight.detach(), ref_w, rtol=1e-4, atol=1e-6)
    # Buffers reach ~1e2 (s = 64); fp32 rounding of the gradient alone gives ~1e-4 here, the
    # same as with sample_rate 1.0, where no row lags.
    torch.testing.assert_close(sd["state"]["momentum_buffer"], ref_b, rtol=1e-4, atol=1e-3)
    # The default (sampled rows only) leaves the never-sampled rows where they started.
    never = (sparse_opt.state["momentum_buffer"].abs().sum(1) == 0).nonzero().flatten()
    assert never.numel() > 0
    init = PartialFC(dim, num_classes, 0.25, seed=3).weight
    torch.testing.assert_close(sparse_head.weight[never], init[never], rtol=0, atol=0)
    assert not torch.allclose(head.weight[never], init[never])


def test_dense_decay_is_sgd_only():
    head = PartialFC(8, 10, 0.5)
    with pytest.raises(ValueError, match="SGD-only"):
        build_head_optimizer(head, "adamw", dense_decay=True)
