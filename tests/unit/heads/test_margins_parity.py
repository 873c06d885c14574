"""Margin losses of issue #16 (and the issue #15 switches) on the sharded head vs references.

Each reference (tests/helpers/head_parity.py) is written from the paper's formulas (and the
authors' published code where the paper leaves a detail open: fallbacks, clips, EMA order) with
one-hot masks over the full ``(N, C)`` logits and ``F.cross_entropy``; nothing in it comes from
heads/. Our ``PartialFC`` runs on 1, 2 and 3 gloo ranks (uneven batches, one rank may have none)
with sample_rate 1.0, and with sample_rate 0.3, where the reference is restricted to the classes
the head kept (a fixed sampling, read back from each rank). Loss, embedding gradients, center
gradients and the loss's state after the step (t, EMA) must match. A second group checks that
the state (t, EMA, the ElasticFace RNG) survives ``save_head`` on 2 ranks and ``load_head`` on 3
and on 1.
"""

from __future__ import annotations

import pytest
import torch

from heads import PartialFC, build_margin, load_head, save_head
from tests.helpers.distributed import run_distributed
from tests.helpers.head_parity import (
    LOSSES,
    C,
    D,
    Problem,
    S,
    cases_for,
    close,
    make_head,
    make_problem,
    parity_worker,
    reference,
)

REL = 2e-5  # of the reference's largest magnitude
# tests/unit/heads/test_partial_fc.py's problem with the even rows' centers pulled towards them,
# so target angles are spread instead of all near 90 degrees.
PROBLEM = Problem(pull="even")


def parity_cases(world):
    """Every loss at sample rates 1.0 and 0.3 (the arcface_torch switches at 1.0 only)."""

    def skip(name, rate):
        return rate < 1 and name.startswith("arcface_torch")

    return cases_for(world, list(LOSSES), 20, skip=skip)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_losses_match_paper_references_on_sharded_sampled_heads(world):
    cases = parity_cases(world)
    results = run_distributed(parity_worker, world, args=(cases, PROBLEM))
    for i, (name, sizes, seed, rate) in enumerate(cases):
        what = f"{name} rate={rate} world={world}"
        per_rank = [r[i] for r in results]
        losses = [r["loss"] for r in per_rank]
        assert all(torch.equal(losses[0], x) for x in losses), f"{what}: loss differs by rank"
        kept = torch.cat([r["rows"] for r in per_rank])
        if rate == 1.0:
            assert torch.equal(kept, torch.arange(C))
        else:
            assert kept.numel() < C / 2
        ref = reference((name, sizes, seed, rate), PROBLEM, kept)
        close(losses[0], ref["loss"], REL, what=f"{what} loss")
        emb_grad = torch.cat([r["emb_grad"] for r in per_rank]) / world
        close(emb_grad, ref["emb_grad"], REL, what=f"{what} embedding grad")
        grad = torch.cat([r["grad"] for r in per_rank])
        close(grad, ref["center_grad"], REL, what=f"{what} grad")
        for key, want in ref["state"].items():
            for r in per_rank:
                assert torch.equal(r["state"][key], per_rank[0]["state"][key]), f"{what}: {key}"
            close(per_rank[0]["state"][key], want, rel=1e-6, what=f"{what} {key}")


def test_margin_gradient_switch_changes_only_the_target_slope():
    """Guard that the arcface_torch gradient case tests something: its embedding gradient must
    differ from the exact ArcFace gradient while the loss value is the same."""
    z, y, centers, backbone = make_problem(3, 12, PROBLEM)
    out = []
    for mode in ("exact", "arcface_torch"):
        head = PartialFC(D, C, 1.0, build_margin("arcface", S, margin_gradient=mode), seed=7)
        with torch.no_grad():
            head.weight.copy_(centers)
        emb = backbone(z)
        emb.retain_grad()
        loss, _ = head(emb, y)
        loss.backward()
        out.append((loss.detach(), emb.grad))
    assert torch.allclose(out[0][0], out[1][0])
    assert (out[0][1] - out[1][1]).abs().max() > 1e-3


# -- state through checkpoints -----------------------------------------------------------------
STATEFUL = ["curricularface", "elasticface_arc", "elasticface_cos_plus", "adaface"]
N_CKPT = 12


def _step(head, rank, world, seed):
    z, y, _, backbone = make_problem(seed, N_CKPT, PROBLEM)
    base, extra = divmod(N_CKPT, world)
    sizes = [base + (r < extra) for r in range(world)]
    off = sum(sizes[:rank])
    with torch.no_grad():
        emb = backbone(z[off : off + sizes[rank]])
    head.train()
    with torch.enable_grad():
        loss, _ = head(emb.requires_grad_(True), y[off : off + sizes[rank]])
        loss.backward()
    head.zero_grad()
    return loss.detach()


def save_worker(rank, world, root):
    out = {}
    for name in STATEFUL:
        head = make_head(name, 1.0)
        _step(head, rank, world, 1)
        save_head(f"{root}/{name}", head)
        saved = {k: v.clone() for k, v in head.margin_loss.state_dict().items()}
        out[name] = {"saved": saved, "next": _step(head, rank, world, 2)}
    return out


def load_worker(rank, world, root):
    out = {}
    for name in STATEFUL:
        head = build_margin(LOSSES[name][0], S, seed=123, loss_kwargs=LOSSES[name][1])
        head = PartialFC(D, C, 1.0, head, seed=7)  # other seed: the state must come from disk
        load_head(f"{root}/{name}", head)
        loaded = {k: v.clone() for k, v in head.margin_loss.state_dict().items()}
        out[name] = {"loaded": loaded, "next": _step(head, rank, world, 2)}
    return out


def test_loss_state_survives_checkpoint_and_resume_on_other_world_sizes(tmp_path):
    saved = run_distributed(save_worker, 2, args=(str(tmp_path),))
    for world in (3, 1):
        resumed = run_distributed(load_worker, world, args=(str(tmp_path),))
        for name in STATEFUL:
            want = saved[0][name]
            for key, value in want["saved"].items():
                assert torch.equal(saved[1][name]["saved"][key], value), f"{name}: {key} by rank"
                for r in resumed:
                    assert torch.equal(r[name]["loaded"][key], value), f"{name}: {key} lost"
            # the next step draws/uses the same state: same loss as the uninterrupted run
            for r in resumed:
                close(r[name]["next"], want["next"], rel=1e-6, what=f"{name} next step")
