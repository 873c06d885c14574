"""Initial class centers of the Partial FC head, the same for any world size.

Reference: insightface arcface_torch ``partial_fc_v2.PartialFC_V2`` draws
``torch.normal(0, 0.01, (n_r, D))`` per shard; here class c's row depends on
``(seed, num_classes, c)`` only, so a head re-sharded to another world size starts from the same
centers.
"""

from __future__ import annotations

import torch

__all__ = ["INIT_BLOCK", "init_centers"]

INIT_BLOCK = 65536  # classes per independently seeded block of initial centers


def init_centers(
    num_classes: int, start: int, count: int, dim: int, seed: int, block: int = INIT_BLOCK
) -> torch.Tensor:
    """Initial centers of classes ``[start, start + count)``, N(0, 0.01) as arcface_torch.

    Class c's row depends only on ``(seed, num_classes, c)``, never on the world size: rows are
    drawn in blocks of ``block`` classes, each from its own seeded generator, and a rank draws
    only the blocks its range touches. (arcface_torch draws every shard from the global RNG,
    which gives identical centers to classes ``c`` and ``c + n_r`` when ranks share a seed.)

    Args:
        num_classes: rows in the global order (classes times sub-centers for ``PartialFC``).
        start, count: the rows to draw, ``[start, start + count)``.
        dim: D. seed: the run's seed. block: rows per seeded generator (tests shrink it).

    Returns:
        ``(count, dim)`` fp32 CPU tensor.
    """
    out = torch.empty(count, dim)
    if count == 0:
        return out
    g = torch.Generator()
    for b in range(start // block, (start + count - 1) // block + 1):
        lo, hi = b * block, min((b + 1) * block, num_classes)
        # torch's CPU generator keeps only 32 seed bits: mix seed and block into them (the odd
        # multiplier makes blocks of one seed distinct).
        g.manual_seed(((seed * 1_000_003) ^ (b * 2_654_435_761) ^ 0x5EED) & 0xFFFFFFFF)
        rows = torch.normal(0.0, 0.01, (hi - lo, dim), generator=g)
        a, z = max(lo, start), min(hi, start + count)
        out[a - start : z - start] = rows[a - lo : z - lo]
    return out
