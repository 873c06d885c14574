"""HeadOptimizer: torch.optim parity, untouched unsampled rows, accumulation, unscale_."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from heads import CombinedMarginLoss, PartialFC, build_head_optimizer
from tests.helpers.distributed import run_distributed

C, D, S = 400, 16, 64.0


def plain_arcface_loss(emb, y, centers):
    cos = F.linear(F.normalize(emb), F.normalize(centers))
    onehot = F.one_hot(y, centers.shape[0]).bool()
    theta = torch.arccos(cos[onehot])
    logits = torch.where(onehot, 0.0, cos * S).masked_scatter(onehot, S * torch.cos(theta + 0.5))
    return F.cross_entropy(logits, y)


def batch(seed, n=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g), torch.randint(0, C, (n,), generator=g)


def make_head(sample_rate):
    torch.manual_seed(0)
    return PartialFC(D, C, sample_rate, CombinedMarginLoss(S, 1.0, 0.5, 0.0), seed=3)


OPTS = {
    "sgd": (dict(lr=0.2, momentum=0.9, weight_decay=5e-4), torch.optim.SGD),
    "adamw": (dict(lr=0.01, weight_decay=0.1, betas=(0.9, 0.99), eps=1e-8), torch.optim.AdamW),
}


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_full_sampling_matches_torch_optim(name):
    """Same gradients in, same weights and state out as torch.optim over 3 steps."""
    kwargs, torch_cls = OPTS[name]
    head = make_head(1.0)
    opt = build_head_optimizer(head, name, **kwargs)
    ref_w = torch.nn.Parameter(head.weight.detach().clone())
    ref_opt = torch_cls([ref_w], **kwargs)
    for step in range(3):
        x, y = batch(step)
        loss, _ = head(x, y)
        (loss * 128.0).backward()
        assert opt.unscale_(loss_scale=128.0) is True
        rows, grad = opt.grad_rows
        assert torch.equal(rows, torch.arange(C))
        ref_w.grad = grad.clone()
        opt.step()
        opt.zero_grad()
        ref_opt.step()
        torch.testing.assert_close(head.weight, ref_w.detach(), rtol=1e-6, atol=1e-7)
    keys = ["momentum_buffer"] if name == "sgd" else ["exp_avg", "exp_avg_sq"]
    for key in keys:
        # atol: the fused d + m*b may round once (FMA) where torch.optim rounds m*b first
        torch.testing.assert_close(opt.state[key], ref_opt.state[ref_w][key], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_unsampled_rows_keep_weight_and_state_bit_identical(name):
    kwargs, torch_cls = OPTS[name]
    head = make_head(0.05)  # 20 of 400 classes per step
    opt = build_head_optimizer(head, name, **kwargs)
    for step in range(3):
        x, y = batch(10 + step)
        before_w = head.weight.detach().clone()
        before_state = {k: v.clone() for k, v in opt.state_dict()["state"].items()}
        loss, stats = head(x, y)
        assert stats["num_sampled"] == 20
        loss.backward()
        assert opt.unscale_() is True
        rows, grad = opt.grad_rows
        assert rows.numel() == 20 and set((y - head.class_start).tolist()) <= set(rows.tolist())
        if step == 0 or name == "adamw":  # a row's first step equals torch.optim on it
            w = torch.nn.Parameter(before_w[rows].clone())
            if name == "adamw" and step > 0:
                fresh = before_state["step"][rows] == 0
                w = torch.nn.Parameter(before_w[rows][fresh].clone())
                rows_first, g_first = rows[fresh], grad[fresh]
            else:
                rows_first, g_first = rows, grad
            ref_opt = torch_cls([w], **kwargs)
            w.grad = g_first.clone()
            ref_opt.step()
        opt.step()
        opt.zero_grad()
        untouched = torch.ones(C, dtype=torch.bool)
        untouched[rows] = False
        assert torch.equal(head.weight[untouched], before_w[untouched])
        assert not torch.equal(head.weight[rows], before_w[rows])
        for key, value in opt.state_dict()["state"].items():
            assert torch.equal(value[untouched], before_state[key][untouched]), key
        if step == 0 or name == "adamw":
            torch.testing.assert_close(head.weight[rows_first], w.detach(), rtol=1e-5, atol=1e-7)
    if name == "adamw":  # per-row step counts: how often each row was sampled
        assert int(opt.state["step"].max()) <= 3 and int(opt.state["step"].sum()) == 60


def test_gradient_accumulation_updates_union_of_sampled_rows():
    head = make_head(0.05)
    opt = build_head_optimizer(head, "sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
    ref_w = torch.nn.Parameter(head.weight.detach().clone())
    scale, accum = 64.0, 2
    sampled = []
    for k in range(accum):
        x, y = batch(20 + k)
        loss, _ = head(x, y)
        (loss * scale / accum).backward()  # engine.backward: loss scale and 1/G
        index = head.sampled_index
        sampled.append(index)
        # reference: full softmax restricted to this micro-batch's sampled classes
        plain_arcface_loss(x, torch.searchsorted(index, y), ref_w[index]).div(accum).backward()
    union = torch.unique(torch.cat(sampled))
    assert union.numel() > sampled[0].numel()  # the micro-batches sampled different rows
    assert opt.unscale_(scale) is True
    rows, grad = opt.grad_rows  # fixed size: a row sampled twice has two identical slots
    assert torch.equal(torch.unique(rows), union) and rows.numel() == 2 * sampled[0].numel()
    # relative to the largest gradient (~1e2 here): the head's fused normalization rounds
    # differently from autograd's F.normalize
    want = ref_w.grad[rows]
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    assert torch.count_nonzero(ref_w.grad[~torch.isin(torch.arange(C), union)]) == 0
    before = head.weight.detach().clone()
    opt.step()
    changed = (head.weight != before).any(dim=1)
    assert torch.equal(torch.nonzero(changed).squeeze(1), union)


@pytest.mark.parametrize("rate,accum", [(1.0, 3), (0.5, 2), (0.05, 3)])
def test_accumulated_gradient_is_fixed_size_and_exact(rate, accum):
    """Several forwards: one slot per sampled row and forward (no data-dependent size: no
    `torch.unique`), each slot the row's total gradient; never `n_r` slots unless each row once
    (at 0.5 x 2 the slots would number n_r: one zero slot is added)."""
    head = make_head(rate)
    for k in range(accum):
        x, y = batch(40 + k)
        head(x, y)[0].backward()
    rows, grad = head.sparse_grad()  # completes each forward's leaf gradient first
    per_forward = [(index, leaf.grad) for index, leaf in head._pending]
    want = torch.zeros(C, D)
    for index, g in per_forward:
        want.index_add_(0, index, g)
    slots = sum(i.numel() for i, _ in per_forward)
    if rate == 1.0:
        assert torch.equal(rows, torch.arange(C))
    else:
        assert rows.numel() == (slots + 1 if slots == C else slots) and rows.numel() != C
        assert torch.equal(rows, rows.sort().values)
    torch.testing.assert_close(grad, want[rows], rtol=1e-6, atol=1e-7)
    assert torch.equal(torch.unique(rows), torch.unique(torch.cat([i for i, _ in per_forward])))


def test_unscale_reports_overflow_and_guards_misuse():
    head = make_head(1.0)
    opt = build_head_optimizer(head, "sgd", lr=0.1)
    x, y = batch(30)
    (head(x, y)[0] * float("inf")).backward()  # an fp16 overflow
    assert opt.unscale_(1024.0) is False
    with pytest.raises(RuntimeError, match="unscale_.*twice"):
        opt.unscale_(1024.0)
    opt.zero_grad()  # the trainer skips the step
    before = head.weight.detach().clone()
    opt.step()  # nothing recorded: no-op
    assert torch.equal(head.weight, before)
    head(x, y)  # a training forward that is never backpropagated
    with pytest.raises(RuntimeError, match="has no gradient"):
        opt.step()
    opt.zero_grad()


def test_lr_state_dict_roundtrip_and_errors():
    head = make_head(1.0)
    opt = build_head_optimizer(head, "adamw", lr=1e-3)
    opt.set_lr(5e-4)
    assert opt.lr == 5e-4
    x, y = batch(40)
    head(x, y)[0].backward()
    opt.step()
    sd = opt.state_dict()
    other = build_head_optimizer(make_head(1.0), "adamw", lr=1.0)
    other.load_state_dict(sd)
    assert other.lr == 5e-4
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(other.state[key], opt.state[key])
    with pytest.raises(ValueError, match="state_dict is for optimizer 'adamw'.*'sgd'"):
        build_head_optimizer(make_head(1.0), "sgd").load_state_dict(sd)
    with pytest.raises(ValueError, match="unknown head optimizer 'lamb'"):
        build_head_optimizer(head, "lamb")


def _overflow_worker(rank, world):
    head = make_head(1.0)
    opt = build_head_optimizer(head, "sgd", lr=0.1)
    x, y = batch(50 + rank, n=4)
    loss = head(x, y)[0]
    (loss * (float("inf") if rank == 1 else 1.0)).backward()
    return opt.unscale_(8.0)


def test_overflow_on_one_rank_is_seen_by_all_ranks():
    assert run_distributed(_overflow_worker, 2) == [False, False]


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_step_gated_on_device_flag_matches_blocking_step_or_changes_nothing(name):
    """step(finite=tensor): true = the plain step; false = weights and state untouched."""
    kwargs = OPTS[name][0]
    results = {}
    for flag in (None, True, False):
        head = make_head(0.2)
        opt = build_head_optimizer(head, name, **kwargs)
        for step in range(2):  # the second step has state to protect
            x, y = batch(60 + step)
            loss, _ = head(x, y)
            (loss * (float("nan") if flag is False and step == 1 else 1.0)).backward()
            finite = opt.unscale_(blocking=False)
            assert finite.dim() == 0 and finite.dtype == torch.bool
            if step == 1 and flag is False:
                assert not finite
                before = (head.weight.clone(), {k: v.clone() for k, v in opt.state.items()})
            opt.step(finite=finite if flag is not None else None)
            opt.zero_grad()
        results[flag] = (head.weight.detach().clone(), dict(opt.state))
    # same update up to rounding (the gated path multiplies by tensor coefficients; the
    # normalization's radial correction cancels digits), relative to the largest value
    for got, want in [(results[True][0], results[None][0])] + [
        (results[True][1][k], results[None][1][k]) for k in results[None][1]
    ]:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert torch.equal(results[False][0], before[0])
    for key, value in before[1].items():
        assert torch.equal(results[False][1][key], value)
