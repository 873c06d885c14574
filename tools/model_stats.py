"""Parameters and forward GFLOPs of every registered backbone, beside arcface_torch's numbers.

    python tools/model_stats.py [--models r50 vit_t] [--embedding-size 512]

FLOPs are counted with `torch.utils.flop_counter.FlopCounterMode` on one 112x112 image (batch 1,
eval mode, so no ViT token masking). FlopCounterMode counts a multiply-add as 2 FLOPs; the
published arcface_torch table counts it as 1 ("r50: 6.3 GFLOPs" is 6.3 G multiply-adds), so
the column printed here is FlopCounterMode's total / 2. Only convolutions and matrix products
are counted (BatchNorm, activations and additions are not, as in the published numbers). timm's
fused attention (`scaled_dot_product_attention`) has no CPU FLOP formula, so ViT attention is
switched to timm's explicit matmul path for counting. Models are built on the `meta` device:
nothing is allocated and no real arithmetic runs, so even vit_h is counted in seconds.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

import models

__all__ = ["PUBLISHED_GFLOPS", "count_stats", "format_table", "main"]

# arcface_torch README (recognition/arcface_torch), GFLOPs as multiply-adds at 112x112.
PUBLISHED_GFLOPS: dict[str, float] = {
    "r18": 2.6,
    "r50": 6.3,
    "r100": 12.1,
    "r200": 23.5,
    "vit_t": 1.5,
    "vit_s": 5.7,
    "vit_b": 11.4,
    "vit_l": 25.3,
}


def count_stats(name: str, embedding_size: int = 512, **kwargs) -> tuple[int, float]:
    """Parameter count and forward GMACs (FlopCounterMode FLOPs / 2 / 1e9) of one backbone.

    Args:
        name: a registered network name.
        embedding_size: D.
        **kwargs: builder overrides (see `models.create`).

    Returns:
        (number of parameters, trainable or not; forward G multiply-adds for a (1, 3, 112, 112)
        input).

    Raises:
        models.UnknownModelError: unknown name; TypeError/ValueError: bad overrides.
    """
    with torch.device("meta"):
        model = models.create(name, embedding_size=embedding_size, **kwargs).eval()
        images = torch.empty(1, 3, 112, 112)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False  # count attention matmuls (see module docstring)
    num_params = sum(p.numel() for p in model.parameters())
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images)
    return num_params, counter.get_total_flops() / 2 / 1e9


def format_table(rows: list[tuple[str, int, float]]) -> str:
    """Markdown table: network, params (M), GFLOPs (ours), published, ours/published."""
    lines = [
        "| network | params (M) | GFLOPs (ours, MACs) | GFLOPs (arcface_torch) | ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, num_params, gflops in rows:
        ref = PUBLISHED_GFLOPS.get(name)
        ref_s, ratio_s = ("-", "-") if ref is None else (f"{ref:.1f}", f"{gflops / ref:.3f}")
        lines.append(f"| {name} | {num_params / 1e6:.2f} | {gflops:.2f} | {ref_s} | {ratio_s} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the table; return 1 if a published number disagrees with ours by more than 10%."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=None, help="default: every registered one")
    parser.add_argument("--embedding-size", type=int, default=512)
    args = parser.parse_args(argv)
    names = args.models or models.list_models()
    try:
        rows = [(n, *count_stats(n, args.embedding_size)) for n in names]
    except (KeyError, ValueError, TypeError) as err:
        print(f"tools/model_stats.py: {err}", file=sys.stderr)
        return 2
    print(format_table(rows))
    off = [
        n for n, _, g in rows if n in PUBLISHED_GFLOPS and abs(g / PUBLISHED_GFLOPS[n] - 1) > 0.1
    ]
    if off:
        print(
            f"tools/model_stats.py: more than 10% off the published GFLOPs: {off}", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
