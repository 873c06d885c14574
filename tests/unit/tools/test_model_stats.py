"""tools/model_stats.py: GFLOPs against arcface_torch's published numbers and a hand count,
parameter counts, the command line."""

import pytest

import models
from tools import model_stats

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", ["r50", "r100", "vit_t", "vit_b"])
def test_gflops_match_arcface_torch(name):
    num_params, gflops = model_stats.count_stats(name)
    assert abs(gflops / model_stats.PUBLISHED_GFLOPS[name] - 1) < 0.1
    if name in ("r50", "vit_t"):  # meta-device count == real model count
        assert num_params == sum(p.numel() for p in models.create(name).parameters())


def test_model_stats_gflops_by_hand():
    # IResNet-18 stem + first block convs at base_width 8, counted by hand as multiply-adds.
    _, gflops = model_stats.count_stats("r18", embedding_size=16, base_width=8)
    w = [8, 16, 32, 64]
    sizes = [56, 28, 14, 7]
    macs = 112 * 112 * 3 * 8 * 9  # stem
    in_ch, hw_in = 8, 112
    for width, hw in zip(w, sizes):
        macs += hw_in * hw_in * in_ch * width * 9 + hw * hw * width * width * 9  # block 0
        macs += hw * hw * in_ch * width  # 1x1 downsample
        macs += 2 * hw * hw * width * width * 9  # block 1
        in_ch, hw_in = width, hw
    macs += 64 * 49 * 16  # fc
    assert gflops * 1e9 == pytest.approx(macs, rel=1e-9)


def test_model_stats_cli(capsys):
    assert model_stats.main(["--models", "r18", "vit_t"]) == 0
    table = capsys.readouterr().out
    assert "| r18 |" in table and "| vit_t |" in table and "1.5" in table
    assert model_stats.main(["--models", "nope"]) == 2
    assert "unknown network" in capsys.readouterr().err
