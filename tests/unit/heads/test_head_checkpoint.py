"""save_head/load_head: 2 ranks -> 1 and -> 3 ranks, exact rows and optimizer state; errors."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from heads import CombinedMarginLoss, PartialFC, build_head_optimizer, load_head, save_head
from tests.helpers.distributed import run_distributed
from tests.helpers.head_steps import train_steps

C, D = 1003, 16
KWARGS = {"sgd": dict(lr=0.1, momentum=0.9), "adamw": dict(lr=0.01, weight_decay=0.05)}


def make(name, seed=0):
    head = PartialFC(D, C, 0.3, CombinedMarginLoss(), seed=seed)
    return head, build_head_optimizer(head, name, **KWARGS[name])


def snapshot(head, opt):
    return {
        "range": (head.class_start, head.class_start + head.num_local),
        "weight": head.weight.detach().clone(),
        "state": {k: v.clone() for k, v in opt.state_dict()["state"].items()},
        "lr": opt.lr,
    }


def save_worker(rank, world, root):
    out = {}
    for name in KWARGS:
        head, opt = make(name, seed=rank)
        train_steps(head, opt, 3, rank, C)
        opt.set_lr(0.0123)
        save_head(os.path.join(root, name), head, opt)
        out[name] = snapshot(head, opt)
    return out


def load_worker(rank, world, root):
    out = {}
    for name in KWARGS:
        head, opt = make(name, seed=100 + rank)
        load_head(os.path.join(root, name), head, opt)
        out[name] = snapshot(head, opt)
    return out


def global_view(per_rank, name):
    parts = sorted((r[name] for r in per_rank), key=lambda s: s["range"])
    assert parts[0]["range"][0] == 0 and parts[-1]["range"][1] == C
    weight = torch.cat([p["weight"] for p in parts])
    state = {k: torch.cat([p["state"][k] for p in parts]) for k in parts[0]["state"]}
    return weight, state


@pytest.fixture(scope="module")
def saved_on_two_ranks(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("head_ckpt"))
    return root, run_distributed(save_worker, 2, args=(root,))


def test_two_ranks_write_one_file_each_atomically(saved_on_two_ranks):
    root, saved = saved_on_two_ranks
    for name in KWARGS:
        files = sorted(os.listdir(os.path.join(root, name, "head")))
        assert files == ["shard_0_502.pt", "shard_502_1003.pt"]
        w, state = global_view(saved, name)
        assert w.shape == (C, D) and set(state) == (
            {"momentum_buffer"} if name == "sgd" else {"exp_avg", "exp_avg_sq", "step"}
        )
        assert any(torch.count_nonzero(v) for v in state.values())  # training left state


@pytest.mark.parametrize("name", list(KWARGS))
def test_load_on_one_rank_restores_rows_and_state(saved_on_two_ranks, name):
    root, saved = saved_on_two_ranks
    weight, state = global_view(saved, name)
    head, opt = make(name, seed=7)
    load_head(os.path.join(root, name), head, opt)
    assert torch.equal(head.weight, weight)
    for key, value in state.items():
        assert torch.equal(opt.state[key], value), key
    assert opt.lr == 0.0123


def test_load_on_three_ranks_restores_rows_and_state(saved_on_two_ranks):
    root, saved = saved_on_two_ranks
    loaded = run_distributed(load_worker, 3, args=(root,))
    assert [r["sgd"]["range"] for r in loaded] == [(0, 335), (335, 669), (669, 1003)]
    for name in KWARGS:
        weight, state = global_view(saved, name)
        for r in loaded:
            lo, hi = r[name]["range"]
            assert torch.equal(r[name]["weight"], weight[lo:hi])
            for key, value in state.items():
                assert torch.equal(r[name]["state"][key], value[lo:hi]), key


def test_same_world_size_resume_continues_the_same_sampling(tmp_path):
    head, opt = make("sgd")
    train_steps(head, opt, 2, 0, C)
    save_head(str(tmp_path), head, opt)
    assert not [f for f in os.listdir(tmp_path / "head") if ".tmp" in f]
    x, y = torch.randn(8, D), torch.randint(0, C, (8,))
    loss_a = head(x, y)[0].detach()
    index_a = head.sampled_index
    other, other_opt = make("sgd", seed=5)
    load_head(str(tmp_path), other, other_opt)
    loss_b = other(x, y)[0].detach()
    assert torch.equal(other.sampled_index, index_a)
    assert torch.equal(loss_a, loss_b)


def test_load_errors_name_the_directory(saved_on_two_ranks, tmp_path):
    root, _ = saved_on_two_ranks
    src = os.path.join(root, "sgd")
    head, opt = make("sgd")
    with pytest.raises(ValueError, match="num_classes=1003 but the head has 1004"):
        load_head(src, PartialFC(D, C + 1, 1.0, CombinedMarginLoss()))
    with pytest.raises(ValueError, match="embedding_size=16 but the head has 8"):
        load_head(src, PartialFC(8, C, 1.0, CombinedMarginLoss()))
    adam_head, adam_opt = make("adamw")
    with pytest.raises(ValueError, match="saved optimizer 'sgd' but loading into 'adamw'"):
        load_head(src, adam_head, adam_opt)
    with pytest.raises(FileNotFoundError, match="no head checkpoint folder .*nowhere"):
        load_head(str(tmp_path / "nowhere"), head, opt)
    partial = tmp_path / "partial"
    shutil.copytree(src, partial)
    os.remove(partial / "head" / "shard_502_1003.pt")
    before = head.weight.detach().clone()
    with pytest.raises(ValueError, match=r"partial/head does not cover classes \[\(502, 1003\)\]"):
        load_head(str(partial), head, opt)
    assert torch.equal(head.weight, before)  # a failed load leaves the head unchanged
    # centers-only load works without an optimizer in the file or in the call
    bare = tmp_path / "bare"
    save_head(str(bare), head)
    with pytest.raises(ValueError, match="saved optimizer None"):
        load_head(str(bare), head, opt)
    load_head(str(bare), make("sgd", seed=9)[0])
