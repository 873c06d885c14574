"""models/weights.py: arcface_torch's `model.pt` folder and `backbone.safetensors` (issue #31)."""

from __future__ import annotations

import json

import pytest
import torch

from models.weights import (
    WEIGHT_FILES,
    load_backbone,
    read_state_dict,
    resolve_checkpoint,
    save_safetensors,
)
from tests.helpers.pretrained import TINY_NET, pretrained_file

META = {
    "network": "r18",
    "embedding_size": TINY_NET["embedding_size"],
    "model_kwargs": {"base_width": 8},
}


def _same(net: torch.nn.Module, ref: dict[str, torch.Tensor]) -> bool:
    state = net.state_dict()
    return set(state) == set(ref) and all(torch.equal(state[k], ref[k]) for k in ref)


def test_folder_with_arcface_torch_model_pt(tmp_path):
    """train_v2.py's output folder (`model.pt`, DDP prefix or not) loads with --network."""
    ref = pretrained_file(tmp_path / "model.pt", prefix="module.")
    weights, meta = resolve_checkpoint(tmp_path)
    assert weights == tmp_path / "model.pt" and meta is None
    net = load_backbone(tmp_path, "r18", **TINY_NET)
    assert _same(net, ref)


def test_safetensors_round_trip_names_its_network(tmp_path):
    """A `backbone.safetensors` holds the same tensors and, in its header, meta.json's fields:
    it loads without --network, alone or in a folder, where it wins over a `backbone.pt`."""
    ref = pretrained_file(tmp_path / "backbone.pt")
    save_safetensors(ref, tmp_path / "backbone.safetensors", META)
    state = read_state_dict(tmp_path / "backbone.safetensors")
    assert set(state) == set(ref) and all(torch.equal(state[k], ref[k]) for k in ref)
    assert WEIGHT_FILES[0] == "backbone.safetensors"
    for source in (tmp_path / "backbone.safetensors", tmp_path):
        weights, meta = resolve_checkpoint(source)
        assert weights.name == "backbone.safetensors" and meta == META
        assert _same(load_backbone(source), ref)
    with pytest.raises(ValueError, match="meta.json says|network"):
        load_backbone(tmp_path / "backbone.safetensors", "mbf")


def test_bad_safetensors_is_one_value_error(tmp_path):
    bad = tmp_path / "backbone.safetensors"
    bad.write_bytes(json.dumps({"not": "safetensors"}).encode())
    with pytest.raises(ValueError, match="safetensors"):
        resolve_checkpoint(bad)
    with pytest.raises(ValueError, match="safetensors"):
        read_state_dict(bad)
