"""heads/comm.py gather_batch on 2 gloo ranks: the exact values of the old two-gather +
all-reduce path, over a smaller wire (one gather in the input dtype, an fp32 reduce-scatter).

The reference is written out here: the gathered rows are the concatenation of every rank's
``x.float()`` and labels, and rank r's gradient is ``W * (sum over ranks of G)[rank r's rows]``
cast to ``x``'s dtype (what the old ``all_reduce`` path returned). With two ranks an fp32 sum of
two values does not depend on the order, so the comparison is bit-exact.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from heads.comm import gather_batch, resolve_group
from tests.helpers.distributed import run_distributed

D = 6
CASES = [  # (per-rank sizes, dtype)
    ([4, 4], torch.bfloat16),
    ([3, 0], torch.bfloat16),
    ([5, 2], torch.float32),
    ([4, 4], torch.float16),
]


def _inputs(rank: int, sizes: list[int], dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed * 10 + rank)
    x = torch.randn(sizes[rank], D, generator=g).to(dtype)
    labels = torch.randint(-(2**40), 2**40, (sizes[rank],), generator=g)  # all 8 bytes used
    grad = torch.randn(sum(sizes), D, generator=g) * 1e3  # rank's partial gradient, fp32
    return x, labels, grad


def _counting(calls: list):
    """Wrap the collectives gather_batch may use so that each call is recorded."""
    originals = {}
    for name in ("all_gather", "all_gather_single", "all_reduce", "reduce_scatter_single"):
        fn = getattr(dist, name)
        originals[name] = fn

        def wrapped(*args, _fn=fn, _name=name, **kwargs):
            t = args[1] if _name.endswith("_single") else args[0]
            t = t[0] if isinstance(t, list) else t
            calls.append((_name, t.dtype, t.numel()))
            return _fn(*args, **kwargs)

        setattr(dist, name, wrapped)
    return originals


def gather_worker(rank: int, world: int):
    topo = resolve_group()
    out = []
    for seed, (sizes, dtype) in enumerate(CASES):
        x, labels, grad = _inputs(rank, sizes, dtype, seed)
        x.requires_grad_(True)
        calls: list = []
        originals = _counting(calls)
        try:
            emb, gathered, got_sizes = gather_batch(x, labels, topo, list(sizes))
            forward_calls = list(calls)
            (emb * grad).sum().backward()
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)
        out.append(
            {
                "emb": emb.detach(),
                "labels": gathered,
                "sizes": got_sizes,
                "grad": x.grad,
                "forward_calls": forward_calls,
                "backward_calls": calls[len(forward_calls) :],
            }
        )
    return out


def test_gather_batch_matches_the_old_path_over_a_smaller_wire():
    results = run_distributed(gather_worker, 2)
    for seed, (sizes, dtype) in enumerate(CASES):
        inputs = [_inputs(r, sizes, dtype, seed) for r in range(2)]
        want_emb = torch.cat([x.float() for x, _, _ in inputs])
        want_labels = torch.cat([lab for _, lab, _ in inputs])
        summed = inputs[0][2] + inputs[1][2]
        width = max(sizes)
        row_bytes = D * dtype.itemsize + 8  # the embedding in its own dtype + the int64 label
        for rank, r in enumerate(results):
            got = r[seed]
            assert got["emb"].dtype == torch.float32 and torch.equal(got["emb"], want_emb)
            assert torch.equal(got["labels"], want_labels) and got["sizes"] == sizes
            start = sum(sizes[:rank])
            want_grad = (summed[start : start + sizes[rank]] * 2).to(dtype)
            assert got["grad"].dtype == dtype and torch.equal(got["grad"], want_grad), (
                sizes,
                dtype,
                rank,
            )
            # forward: one gather of padded rows carrying the label, in x's dtype
            ((name, wire_dtype, numel),) = got["forward_calls"]
            assert name == "all_gather_single" and wire_dtype == dtype
            assert numel * dtype.itemsize == width * row_bytes
            # backward: one fp32 reduce-scatter of the (W * width, D) gradient, no all-reduce
            want_calls = [("reduce_scatter_single", torch.float32, 2 * width * D)]
            assert got["backward_calls"] == want_calls
