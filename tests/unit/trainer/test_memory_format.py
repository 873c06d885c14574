"""Input memory layout (trainer/memory_format.py): channels_last except where oneDNN crashes."""

from __future__ import annotations

import pytest
import torch

import models
from trainer import memory_format as mf
from trainer.config import ConfigError, load_config

CPU = torch.device("cpu")


def _net(name, **kwargs):
    return models.create(name, embedding_size=64, **kwargs)


def test_unsafe_convs_are_the_narrow_strided_1x1_downsamples():
    narrow = mf.onednn_unsafe_convs(_net("r18", base_width=8))
    assert narrow and all(n.endswith("downsample.0") for n in narrow)
    assert narrow == ["layer1.0.downsample.0", "layer2.0.downsample.0"]  # 8 in; layer3: 16
    for name, kwargs in (("r18", {"base_width": 16}), ("r50", {}), ("mbf", {}), ("vit_t", {})):
        assert mf.onednn_unsafe_convs(_net(name, **kwargs)) == [], name


@pytest.mark.parametrize("avx512", [True, False])
def test_auto_falls_back_to_nchw_only_where_needed(monkeypatch, avx512):
    monkeypatch.setattr(mf, "cpu_has_avx512", lambda: avx512)
    fmt, why = mf.input_memory_format(_net("r18", base_width=8), CPU)
    want = torch.contiguous_format if avx512 else torch.channels_last
    assert fmt == want, why
    if avx512:
        assert "layer1.0.downsample.0" in why
    fmt, _ = mf.input_memory_format(_net("r18", base_width=16), CPU)
    assert fmt == torch.channels_last
    fmt, _ = mf.input_memory_format(_net("r18", base_width=8), torch.device("cuda"))
    assert fmt == torch.channels_last


def test_explicit_choice_wins_and_bad_values_are_rejected(tmp_path):
    net = _net("r18", base_width=8)
    assert mf.input_memory_format(net, CPU, "channels_last")[0] == torch.channels_last
    assert mf.input_memory_format(_net("r50"), CPU, "contiguous")[0] == torch.contiguous_format
    with pytest.raises(ValueError, match="memory_format"):
        mf.input_memory_format(net, CPU, "nhwc")
    path = tmp_path / "c.yaml"
    path.write_text("data: {kind: synthetic, num_image: 10, num_classes: 2}\n")
    assert load_config(str(path)).engine.memory_format == "auto"
    with pytest.raises(ConfigError, match=r"engine\.memory_format.*'nhwc'"):
        load_config(str(path), ["engine.memory_format=nhwc"])
