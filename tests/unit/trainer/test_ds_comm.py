"""ds_configs/*.json: ZeRO-1/2 reduce gradients in buckets that overlap the backward (issue 28
item 9; the numbers behind the bucket size: benchmarks/bench_comm.py, docs/benchmarks.md)."""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers.paths import REPO

R50_PARAMS = 43_590_848  # models.create("r50", embedding_size=512), the smallest shipped r-recipe


@pytest.mark.parametrize("name", ["zero1_fp16.json", "zero2_bf16.json"])
def test_zero1_and_zero2_overlap_reduction_with_the_backward(name):
    with open(os.path.join(REPO, "ds_configs", name)) as f:
        zero = json.load(f)["zero_optimization"]
    assert zero["overlap_comm"] is True  # reduce each full bucket while the backward goes on
    # at least 4 buckets for r50: only the last one's reduction waits after the backward
    assert R50_PARAMS / zero["reduce_bucket_size"] >= 4
