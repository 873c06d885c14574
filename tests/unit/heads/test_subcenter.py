"""Sub-center ArcFace (Deng et al., ECCV 2020) on the sharded Partial FC head vs the paper.

The reference (tests/helpers/head_parity.py) is written from the paper's Eq. 2 and nothing in
it comes from heads/: centers ``W`` ``(C K, D)``, ``cos = normalize(x) @ normalize(W).T``
reshaped ``(N, C, K)`` and max-reduced over the K sub-centers, the ArcFace margin
``cos(theta + m)`` on the target, and ``F.cross_entropy`` of the logits scaled by ``s``;
autograd's max routes the gradient to the arg-max sub-center. Our ``PartialFC(num_subcenters=K)``
runs on 1, 2 and 3 gloo ranks (1003 classes: uneven shards; uneven batches, one rank with none)
at sample_rate 1.0 and 0.3, where the reference is restricted to the classes the head kept (read
back from each rank). Loss, embedding gradients and every sub-center row's gradient must match;
CosFace and three losses of ``tests/unit/heads/test_margins_parity.py`` (their references
applied to the max-reduced cosines) check that sub-centers compose with any margin. Further:
initial centers independent of the world size, a K = 3 checkpoint saved on 2 ranks and loaded on
3 and 1 (and back), the row-sparse optimizer with dense (lazy) decay against a dense SGD, the
one-buffer memory contract, config validation.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from heads import (
    PartialFC,
    build_head_optimizer,
    build_margin,
    centers_of,
    init_centers,
    load_head,
    margin_softmax_cross_entropy,
    open_centers,
    save_head,
)
from heads.comm import Topology
from heads.subcenter import subcenter_max
from tests.helpers.distributed import run_distributed
from tests.helpers.head_parity import (
    C,
    D,
    Problem,
    S,
    cases_for,
    close,
    make_problem,
    parity_worker,
    reference,
)
from tests.helpers.head_steps import step_heads, train_steps
from trainer.config import ConfigError, load_config

K = 3
COS_M = 0.4  # CosFace's margin (head_parity's "cosface")
REL = 2e-5  # of the reference's largest magnitude
# Losses of tests/unit/heads/test_margins_parity.py reused on the max-reduced cosines: the
# re-weighting path (CurricularFace), a global sort of target cosines (ElasticFace+),
# norm-aware (MagFace).
COMPOSED = ["curricularface", "elasticface_arc_plus", "magface"]
NAMES = ["arcface", "cosface", *COMPOSED]
# (C K, D) sub-centers; odd row i pulls sub-center i % K of its class towards it, so target
# arg-maxes differ by row and margins act at spread-out angles.
PROBLEM = Problem(subcenters=K, pull="subcenters")


@pytest.mark.parametrize("world", [1, 2, 3])
def test_subcenter_head_matches_the_paper_on_sharded_sampled_heads(world):
    cases = cases_for(world, NAMES, 40)
    results = run_distributed(parity_worker, world, args=(cases, PROBLEM))
    for i, (name, sizes, seed, rate) in enumerate(cases):
        what = f"{name} K={K} rate={rate} world={world}"
        per_rank = [r[i] for r in results]
        losses = [r["loss"] for r in per_rank]
        assert all(torch.equal(losses[0], x) for x in losses), f"{what}: loss differs by rank"
        rows = torch.cat([r["rows"] for r in per_rank])
        # whole classes: each kept class contributes its K consecutive rows, in order
        classes = rows[::K] // K
        assert torch.equal(rows, (classes.unsqueeze(1) * K + torch.arange(K)).flatten()), what
        assert sum(r["stats"]["num_sampled"] for r in per_rank) == classes.numel()
        if rate == 1.0:
            assert torch.equal(classes, torch.arange(C)), what
        else:
            assert classes.numel() < C / 2, what
        _, y, _, _ = make_problem(seed, sum(sizes), PROBLEM)
        assert set(y.tolist()) <= set(classes.tolist()), f"{what}: a positive was dropped"
        ref = reference((name, sizes, seed, rate), PROBLEM, classes)
        # the routing is exercised: targets pick different sub-centers
        assert len(ref["target_subcenters"]) > 1, what
        close(losses[0], ref["loss"], REL, what=f"{what} loss")
        emb_grad = torch.cat([r["emb_grad"] for r in per_rank]) / world
        close(emb_grad, ref["emb_grad"], REL, what=f"{what} embedding grad")
        grad = torch.cat([r["grad"] for r in per_rank])
        close(grad, ref["center_grad"], REL, what=f"{what} sub-center grad")


def test_backward_routes_to_the_arg_max_row_in_the_gemm_buffer():
    """One ``(N, M K)`` buffer: the gradient handed back for the GEMM's output is its own
    storage; only the arg-max column of each class gets a gradient; values and gradient equal
    autograd's ``max(dim=2)``."""
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(6, 40 * K, generator=g) * 2 - 1).requires_grad_(True)
    sub = x * 1.0
    ptr = sub.data_ptr()
    seen = []
    sub.register_hook(lambda grad: seen.append(grad.data_ptr()))
    cos = subcenter_max(sub, K)
    assert cos.shape == (6, 40)
    reduced = x.detach().view(6, 40, K).max(dim=2)
    assert torch.equal(cos, reduced.values)
    labels = torch.tensor([0, 5, 9, -1, 39, 5])
    margin = build_margin("arcface", 4.0)  # small s: no probability underflows to 0
    loss = margin_softmax_cross_entropy(cos, labels, margin, Topology(None, 0, 1))
    loss.backward()
    assert seen == [ptr]
    grad = x.grad.view(6, 40, K)
    hit = torch.zeros_like(grad, dtype=torch.bool).scatter_(2, reduced.indices.unsqueeze(2), True)
    assert torch.count_nonzero(grad[~hit]) == 0  # the other K - 1 rows get nothing
    assert torch.count_nonzero(grad[hit]) == grad[hit].numel()
    with pytest.raises(ValueError, match="must be \\(N, M \\* 3\\)"):
        subcenter_max(torch.zeros(2, 7), K)
    with pytest.raises(ValueError, match="integer in \\[1, 255\\]"):
        subcenter_max(torch.zeros(2, 6), 0)


# -- initialization, checkpoints, re-sharding --------------------------------------------------
CK = 101  # classes in the checkpoint tests: 51/50 on 2 ranks, 34/34/33 on 3


def _view(head, opt):
    return {
        "range": (head.class_start, head.class_start + head.num_local),
        "weight": head.weight.detach().clone(),
        "momentum": opt.state_dict()["state"]["momentum_buffer"].clone(),
    }


def ckpt_save_worker(rank, world, root):
    head = PartialFC(D, CK, 0.3, build_margin("arcface"), seed=5, num_subcenters=K)
    opt = build_head_optimizer(head, "sgd", lr=0.1, momentum=0.9)
    init = head.weight.detach().clone()
    train_steps(head, opt, 3, rank, CK)
    save_head(root, head, opt)
    return {"init": init} | _view(head, opt)


def ckpt_load_worker(rank, world, src, dst):
    head = PartialFC(D, CK, 0.3, build_margin("arcface"), seed=99, num_subcenters=K)
    opt = build_head_optimizer(head, "sgd", lr=0.1, momentum=0.9)
    init = head.weight.detach().clone()
    load_head(src, head, opt)
    out = {"init": init} | _view(head, opt)
    if dst:
        save_head(dst, head, opt)
    return out


def _global(per_rank, key):
    parts = sorted(per_rank, key=lambda r: r["range"])
    assert parts[0]["range"][0] == 0 and parts[-1]["range"][1] == CK
    for p in parts:
        lo, hi = p["range"]
        assert p[key].shape[0] == (hi - lo) * K  # K rows per class of the shard
    return torch.cat([p[key] for p in parts]).view(CK, K, -1)


def test_checkpoint_moves_whole_classes_across_world_sizes(tmp_path):
    two = str(tmp_path / "two")
    saved = run_distributed(ckpt_save_worker, 2, args=(two,))
    assert sorted(os.listdir(os.path.join(two, "head"))) == ["shard_0_51.pt", "shard_51_101.pt"]
    weight, momentum = _global(saved, "weight"), _global(saved, "momentum")
    assert torch.count_nonzero(momentum) > 0  # training left state
    # world-size independent initialization: 2 ranks' rows = the C K rows drawn at once
    assert torch.equal(_global(saved, "init").view(-1, D), init_centers(CK * K, 0, CK * K, D, 5))
    three = str(tmp_path / "three")
    loaded = run_distributed(ckpt_load_worker, 3, args=(two, three))
    assert [r["range"] for r in loaded] == [(0, 34), (34, 68), (68, 101)]
    assert torch.equal(_global(loaded, "init").view(-1, D), init_centers(CK * K, 0, CK * K, D, 99))
    assert torch.equal(_global(loaded, "weight"), weight)
    assert torch.equal(_global(loaded, "momentum"), momentum)
    # and back: 3 -> 2 and 3 -> 1 give the same classes' rows
    back = run_distributed(ckpt_load_worker, 2, args=(three, ""))
    assert torch.equal(_global(back, "weight"), weight)
    assert torch.equal(_global(back, "momentum"), momentum)
    one = ckpt_load_worker(0, 1, three, "")
    assert torch.equal(_global([one], "weight"), weight)
    # offline read (tools/clean_subcenters.py): any classes, across the 3 shard files
    centers = open_centers(three)
    assert (centers.num_classes, centers.num_subcenters, centers.starts) == (CK, K, [0, 34, 68])
    ids = torch.tensor([100, 0, 33, 34, 67, 68, 5, 5])
    assert torch.equal(centers_of(centers, ids), weight[ids])
    assert torch.equal(centers_of(centers, torch.arange(CK)), weight)
    with pytest.raises(ValueError, match=r"class ids must be in \[0, 101\)"):
        centers_of(centers, torch.tensor([101]))
    os.remove(os.path.join(three, "head", "shard_34_68.pt"))
    with pytest.raises(ValueError, match=r"does not cover classes \[\(34, 68\)\]"):
        open_centers(three)
    # another number of sub-centers cannot read it
    plain = PartialFC(D, CK, 0.3, build_margin("arcface"), num_subcenters=1)
    with pytest.raises(ValueError, match="num_subcenters=3 but the head has 1"):
        load_head(two, plain)
    save_head(str(tmp_path / "plain"), plain)
    with pytest.raises(ValueError, match="num_subcenters=1 but the head has 3"):
        load_head(str(tmp_path / "plain"), PartialFC(D, CK, 0.3, num_subcenters=K))


# -- the row-sparse optimizer with dense (lazy) decay ------------------------------------------
LR = [0.2, 0.1, 0.3, 0.05, 0.1, 0.02]
MOMENTUM, WD = 0.9, 0.05


def _dense_sgd_step(weight, buf, rows, emb, labels, lr):
    """arcface_torch's step from the formulas with sub-centers: the classes' rows ``rows``
    gathered from the whole parameter, max over each class's K, CosFace, CE, then
    ``torch.optim.SGD``'s rule on every row (dense gradient, momentum, weight decay)."""
    weight = weight.detach().requires_grad_(True)
    cos = F.normalize(emb) @ F.normalize(weight[rows]).t()
    cos = cos.view(emb.shape[0], -1, K).max(dim=2).values
    pos = torch.searchsorted(rows[::K] // K, labels)
    logits = cos.scatter(1, pos[:, None], cos.gather(1, pos[:, None]) - COS_M) * S
    F.cross_entropy(logits, pos).backward()
    with torch.no_grad():
        buf = MOMENTUM * buf + weight.grad + WD * weight
        return (weight - lr * buf).detach(), buf


def test_head_optimizer_dense_decay_steps_sub_center_rows_like_dense_sgd():
    num_classes, n = 40, 8

    def make():
        return PartialFC(D, num_classes, 0.25, build_margin("cosface", S), seed=3, num_subcenters=K)

    head = make()
    opt = build_head_optimizer(
        head, "sgd", lr=LR[0], momentum=MOMENTUM, weight_decay=WD, dense_decay=True
    )
    sparse = make()
    sparse_opt = build_head_optimizer(sparse, "sgd", momentum=MOMENTUM, weight_decay=WD)
    ref_w, ref_b = head.weight.detach().clone(), torch.zeros(num_classes * K, D)
    g = torch.Generator().manual_seed(5)
    for lr in LR:
        emb = torch.randn(n, D, generator=g)
        labels = torch.randint(0, num_classes, (n,), generator=g)
        step_heads([(head, opt), (sparse, sparse_opt)], emb, labels, lr)
        rows = head.sampled_index
        assert rows.numel() == K * 10 and torch.equal(rows, sparse.sampled_index)
        ref_w, ref_b = _dense_sgd_step(ref_w, ref_b, rows, emb, labels, lr)
        torch.testing.assert_close(head.weight[rows], ref_w[rows], rtol=1e-4, atol=1e-6)
    sd = opt.state_dict()  # flushes the lagging rows
    # atol 1e-5 for weights ~1e-2 (a missed decay step is lr * wd * w ~ 1e-4)
    torch.testing.assert_close(head.weight.detach(), ref_w, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sd["state"]["momentum_buffer"], ref_b, rtol=1e-4, atol=1e-3)
    # sampled mode: the K rows of a never-sampled class stay where they started, together
    moved = (sparse_opt.state["momentum_buffer"].abs().sum(1) > 0).view(num_classes, K)
    assert torch.equal(moved.all(1), moved.any(1))  # a class's rows step together
    never = ~moved.any(1)
    assert never.any() and not never.all()
    init = make().weight.view(num_classes, K, D)
    assert torch.equal(sparse.weight.view(num_classes, K, D)[never], init[never])


# -- config ------------------------------------------------------------------------------------
CONFIG = "configs/synthetic_tiny.yaml"


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("0", r"num_subcenters must be an integer in \[1, 255\], got 0"),
        ("-2", r"num_subcenters must be an integer in \[1, 255\], got -2"),
        ("256", r"num_subcenters must be an integer in \[1, 255\], got 256"),
        ("2.5", "expected an integer, got 2.5"),
        ("true", "expected an integer, got True"),
        ("three", "expected an integer"),
    ],
)
def test_bad_num_subcenters_is_a_config_error(value, why):
    with pytest.raises(ConfigError, match=rf"{CONFIG} \+ command line: head.num_subcenters: {why}"):
        load_config(CONFIG, [f"head.num_subcenters={value}"])


def test_num_subcenters_defaults_to_one_and_composes_with_any_loss():
    assert load_config(CONFIG).head.num_subcenters == 1
    for loss in ("arcface", "cosface", "adaface"):
        cfg = load_config(CONFIG, [f"head.loss={loss}", "head.num_subcenters=3"])
        assert (cfg.head.loss, cfg.head.num_subcenters) == (loss, 3)
    cfg = load_config("configs/lfw_demo_subcenter.yaml")
    assert (cfg.head.loss, cfg.head.num_subcenters) == ("arcface", 3)
    with pytest.raises(ValueError, match="num_subcenters must be an integer"):
        PartialFC(D, 10, 1.0, num_subcenters=True)
