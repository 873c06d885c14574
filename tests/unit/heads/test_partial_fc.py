"""PartialFC: parity with a plain single-process full softmax on 1-3 gloo ranks, sampling.

The reference (tests/helpers/head_parity.py) is written out with F.normalize, F.linear, the
arccos margin formula and F.cross_entropy; nothing in it comes from heads/. Tolerances: fp32
values are compared relative to the largest reference magnitude (1e-5), since the center
gradients reach ~1e2.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from heads import (
    CombinedMarginLoss,
    PartialFC,
    init_centers,
    sample_classes,
)
from tests.helpers.distributed import DistributedError, run_distributed
from tests.helpers.head_parity import (
    COMBINED,
    C,
    D,
    Problem,
    S,
    cases_for,
    close,
    make_problem,
    parity_worker,
    reference,
    reference_loss,
    shard,
)

# The step as DeepSpeed runs it under an fp16 loss scale: backbone gradients averaged over the
# ranks, the head optimizer unscales.
PROBLEM = Problem(loss_scale=512.0)
# rows per rank: uneven (one rank of 3 without rows), then even
UNEVEN = {1: [9], 2: [7, 4], 3: [5, 0, 3]}
EVEN = {1: [12], 2: [6, 6], 3: [4, 4, 4]}


def parity_cases(world):
    """Each margin of ``COMBINED`` on uneven batches, plain ArcFace on even ones."""
    cases = cases_for(world, list(COMBINED), 10, rates=(1.0,), sizes=UNEVEN)
    return cases + cases_for(world, ["arcface"], 99, rates=(1.0,), sizes=EVEN)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_parity_with_single_process_full_softmax(world):
    cases = parity_cases(world)
    results = run_distributed(parity_worker, world, args=(cases, PROBLEM))
    for i, case in enumerate(cases):
        ref = reference(case, PROBLEM)
        sizes = case[1]
        per_rank = [r[i] for r in results]
        losses = [r["loss"] for r in per_rank]
        assert all(torch.equal(losses[0], x) for x in losses), f"{case}: loss differs by rank"
        close(losses[0], ref["loss"])
        # Each rank's embedding gradient is W x exact; the backbone's averaging divides by W.
        emb_grad = torch.cat([r["emb_grad"] for r in per_rank]) / world
        assert emb_grad.shape == (sum(sizes), D)
        close(emb_grad, ref["emb_grad"])
        for r in per_rank:
            for got, want in zip(r["bb_grad"], ref["bb_grad"]):
                close(got, want)
            assert r["finite"] is True
            assert r["stats"]["global_batch"] == sum(sizes)
        rows = torch.cat([r["rows"] for r in per_rank])
        assert torch.equal(rows, torch.arange(C)), "sample_rate=1 must cover every class once"
        close(torch.cat([r["grad"] for r in per_rank]), ref["center_grad"])


def sampled_worker(rank, world, sample_rate, seed):
    z, y, centers, backbone = make_problem(seed, 24)
    start, n = shard(rank, world)
    head = PartialFC(D, C, sample_rate, CombinedMarginLoss(S, 1.0, 0.5, 0.0), seed=7)
    with torch.no_grad():
        head.weight.copy_(centers[start : start + n])
        emb = backbone(z)
    half = len(y) // 2
    sl = slice(0, half) if rank == 0 else slice(half, len(y)) if rank == 1 else slice(0, 0)
    loss, stats = head(emb[sl], y[sl])
    return {"loss": loss.detach(), "stats": stats, "n": n, "start": start}


def test_sampled_loss_on_two_ranks_matches_reference_on_the_sampled_classes():
    """Loss with sampling equals the full-softmax reference restricted to the kept classes."""
    seed, rate = 5, 0.2
    results = run_distributed(sampled_worker, 2, args=(rate, seed))
    z, y, centers, backbone = make_problem(seed, 24)
    kept = []
    for rank, r in enumerate(results):
        head_rng = torch.Generator().manual_seed(7 * 1_000_003 + rank)
        index, _ = sample_classes(y, r["start"], r["n"], int(rate * r["n"]), head_rng)
        assert r["stats"]["num_sampled"] == int(rate * r["n"]) == index.numel()
        kept.append(index + r["start"])
    kept = torch.cat(kept)
    assert set(y.tolist()) <= set(kept.tolist()), "a positive center was not sampled"
    with torch.no_grad():
        remap = torch.searchsorted(kept, y)
        want = reference_loss(backbone(z), remap, centers[kept], 1.0, 0.5, 0.0, 0.0)
    assert torch.equal(results[0]["loss"], results[1]["loss"])
    close(results[0]["loss"], want)


def test_sample_classes_keeps_positives_and_remaps():
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([3, 17, 17, 40, 55, 99, 120, 3])
    start, count = 10, 100  # classes 10..109
    index, local = sample_classes(labels, start, count, 12, g)
    assert index.numel() == 12
    assert torch.equal(index, index.sort().values) and index.unique().numel() == 12
    in_shard = (labels >= start) & (labels < start + count)
    assert torch.equal(local[~in_shard], torch.full_like(local[~in_shard], -1))
    # remapped labels point at the right center
    assert torch.equal(index[local[in_shard]] + start, labels[in_shard])
    # as many kept classes as positives: exactly the positives (the size is fixed by the
    # caller; PartialFC keeps at least N classes so every positive fits)
    index2, local2 = sample_classes(labels, start, count, 4, g)
    assert torch.equal(index2 + start, torch.tensor([17, 40, 55, 99]))
    assert torch.equal(index2[local2[in_shard]] + start, labels[in_shard])
    head = PartialFC(D, 100, 0.02, CombinedMarginLoss())  # int(0.02 * 100) = 2 < N = 8
    head(torch.randn(8, D), labels.clamp_max(99))
    assert set(labels.clamp_max(99).tolist()) <= set(head.sampled_index.tolist())
    assert head.sampled_index.numel() == 8
    # num_sample >= count keeps the whole shard, labels just shift
    index3, local3 = sample_classes(labels, start, count, count, g)
    assert torch.equal(index3, torch.arange(count))
    assert torch.equal(local3[in_shard], labels[in_shard] - start)


def test_sampling_is_uniform_over_negatives():
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 1])
    hits = torch.zeros(50)
    for _ in range(2000):
        index, _ = sample_classes(labels, 0, 50, 7, g)
        hits[index] += 1
    assert hits[0] == hits[1] == 2000
    freq = hits[2:] / 2000  # 5 of 48 negatives per draw
    assert (freq - 5 / 48).abs().max() < 0.03


def test_fixed_seed_is_reproducible_and_seeds_differ():
    y = torch.randint(0, C, (16,), generator=torch.Generator().manual_seed(0))
    emb = torch.randn(16, D, generator=torch.Generator().manual_seed(1))

    def run(seed):
        head = PartialFC(D, C, 0.1, CombinedMarginLoss(), seed=seed)
        return [head(emb, y)[0].detach() for _ in range(3)], head

    a, _ = run(0)
    b, _ = run(0)
    c, _ = run(1)
    assert all(torch.equal(x, z) for x, z in zip(a, b))
    assert not all(torch.equal(x, z) for x, z in zip(a, c))


def test_initial_centers_do_not_depend_on_world_size():
    full = init_centers(C, 0, C, D, seed=4, block=100)
    for world in (2, 3):
        parts = [init_centers(C, *shard(r, world), D, seed=4, block=100) for r in range(world)]
        assert torch.equal(torch.cat(parts), full)
    assert torch.unique(full, dim=0).shape[0] == C  # no two classes share a center
    assert abs(full.std().item() - 0.01) < 5e-4 and abs(full.mean().item()) < 5e-4
    assert not torch.equal(init_centers(C, 0, C, D, seed=5, block=100), full)
    head = PartialFC(D, C, 1.0, CombinedMarginLoss(), seed=4)
    assert torch.equal(head.weight, init_centers(C, 0, C, D, seed=4))


def test_single_process_without_group_low_precision_and_stats():
    torch.manual_seed(0)
    head = PartialFC(D, 50, 0.5, CombinedMarginLoss())
    x = torch.randn(6, D, dtype=torch.bfloat16, requires_grad=True)
    y = torch.tensor([0, 1, 1, 2, 49, 49])
    loss, stats = head(x, y)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert stats == {"num_sampled": 25, "num_positive": 4, "global_batch": 6}
    loss.backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()
    ref = reference_loss(x.detach().float(), y, head.weight, 1.0, 0.5, 0.0, 0.0)
    # with sampling the loss is over fewer classes: never above the full-softmax loss
    assert loss.item() <= ref.item() + 1e-4
    with torch.no_grad():  # no grad: nothing recorded for the optimizer
        head(x, y)
    assert head.num_recorded == 1


def test_input_errors_name_the_field():
    head = PartialFC(D, 10, 1.0, CombinedMarginLoss())
    with pytest.raises(ValueError, match="local_labels must be in"):
        head(torch.randn(2, D), torch.tensor([0, 10]))
    with pytest.raises(ValueError, match=r"local_embeddings must be \(B, 32\)"):
        head(torch.randn(2, D + 1), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="local_labels must be int64"):
        head(torch.randn(2, D), torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="sample_rate"):
        PartialFC(D, 10, 0.0, CombinedMarginLoss())


def _raising_worker(rank, world):
    if rank == 1:
        raise KeyError("boom on rank 1")
    return rank


def test_distributed_helper_reraises_worker_errors():
    with pytest.raises(DistributedError, match="rank 1 of 2 failed(.|\n)*boom on rank 1"):
        run_distributed(_raising_worker, 2, timeout=60)


def test_bf16_logits_keep_the_loss_and_finite_gradients():
    """logits_dtype bf16 (bf16 GEMM operands, fp32 softmax) stays within 1e-2 of fp32."""
    y = torch.randint(0, C, (32,), generator=torch.Generator().manual_seed(2))
    x = torch.randn(32, D, generator=torch.Generator().manual_seed(3))
    out = {}
    for mode in ("fp32", "bf16"):
        head = PartialFC(D, C, 0.5, CombinedMarginLoss(), seed=1, logits_dtype=mode)
        emb = x.clone().requires_grad_(True)
        loss, _ = head(emb, y)
        loss.backward()
        rows, grad = head.sparse_grad()
        out[mode] = (loss.detach(), emb.grad, grad)
    (l32, e32, g32), (l16, e16, g16) = out["fp32"], out["bf16"]
    assert abs(l16.item() / l32.item() - 1) < 1e-2
    assert torch.isfinite(e16).all() and torch.isfinite(g16).all()
    assert not torch.equal(l16, l32)  # the bf16 path really ran
    for a, b in ((e16, e32), (g16, g32)):  # and the gradients point the same way
        assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99
    with pytest.raises(ValueError, match="logits_dtype"):
        PartialFC(D, C, 1.0, CombinedMarginLoss(), logits_dtype="fp8")


def test_unvalidated_labels_poison_the_loss_and_shapes_are_fixed():
    head = PartialFC(D, 100, 0.3, CombinedMarginLoss())
    x = torch.randn(4, D)
    loss, stats = head(x, torch.tensor([1, 2, 3, 100]), validate=False)  # 100 is out of range
    assert torch.isnan(loss)
    loss, stats = head(x, torch.tensor([1, 1, 3, 99]), validate=False)
    assert torch.isfinite(loss) and stats["num_sampled"] == 30 and int(stats["num_positive"]) == 3
    head.fix_batch_size(4)
    with pytest.raises(ValueError, match="fix_batch_size agreed on 4"):
        head(torch.randn(3, D), torch.tensor([1, 2, 3]))


def test_logits_dtype_auto_is_fast_on_cuda_and_fp32_on_cpu():
    from heads import resolve_logits_dtype

    assert resolve_logits_dtype("auto", torch.device("cpu"), "bf16") == "fp32"
    assert resolve_logits_dtype("auto", torch.device("cuda", 0), "bf16") == "bf16"
    assert resolve_logits_dtype("auto", torch.device("cuda", 0), "fp16") == "tf32"
    assert resolve_logits_dtype("fp32", torch.device("cuda", 0), "bf16") == "fp32"
    with pytest.raises(ValueError, match="logits dtype"):
        resolve_logits_dtype("half", torch.device("cpu"), "fp32")
