"""evaluation/onnx_meta.py + the shared loader: an ONNX model's metadata is read, not assumed."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from data.decode import normalize
from evaluation.embedders import load_embedder, onnx_session
from evaluation.onnx_meta import (
    MetadataMismatch,
    Normalization,
    build_metadata,
    read_metadata,
    set_metadata,
)
from tests.helpers.tiny_eval import export_onnx, tiny_net

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(tmp_path, **entries) -> str:
    path = str(tmp_path / "m.onnx")
    export_onnx(tiny_net(), path)
    proto = onnx.load(path)
    set_metadata(proto, {**build_metadata("tiny", 16), **entries})
    onnx.save(proto, path)
    return path


def test_metadata_round_trip_and_replace(tmp_path):
    path = _model(tmp_path, precision="int8")
    meta = read_metadata(onnx.load(path))
    assert meta == read_metadata(onnx_session(path))
    assert meta["network"] == "tiny" and meta["embedding_size"] == "16"
    assert meta["precision"] == "int8" and meta["channel_order"] == "RGB"
    assert meta["mean"] == meta["std"] == "127.5,127.5,127.5" and meta["input_size"] == "112x112"
    assert [p.key for p in onnx.load(path).metadata_props].count("precision") == 1


def test_loader_applies_the_declared_normalization(tmp_path):
    """A model declaring BGR, mean 0 and std 255 gets exactly that input from the loader, while
    callers keep feeding the canonical [-1, 1] RGB batch (data.decode.normalize)."""
    path = _model(tmp_path, channel_order="BGR", mean="0,0,0", std="255,255,255")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    got = load_embedder(path)(normalize(torch.from_numpy(pixels)).contiguous()).numpy()
    native = (pixels[..., ::-1].astype(np.float32) / 255.0).transpose(0, 3, 1, 2)
    want = onnx_session(path).run(None, {"data": np.ascontiguousarray(native)})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert Normalization().canonical and not Normalization((0.0,) * 3).canonical


@pytest.mark.parametrize(
    ("entries", "kwargs", "message"),
    [
        ({}, {"network": "mbf"}, "metadata says network=tiny but --network mbf"),
        ({}, {"embedding_size": 512}, "embedding_size=16 but --embedding-size 512"),
        ({"embedding_size": "512"}, {}, "embedding_size=512 but the graph outputs 16"),
        ({"input_size": "96x96"}, {}, "input_size=96x96 but the graph takes 112x112"),
        ({"std": "1,0,1"}, {}, "std"),
        ({"channel_order": "GRB"}, {}, "channel_order"),
    ],
)
def test_contradictions_are_refused(tmp_path, entries, kwargs, message):
    path = _model(tmp_path, **entries)
    with pytest.raises(MetadataMismatch, match=message):
        load_embedder(path, **kwargs)
    assert load_embedder(_model(tmp_path), network="tiny", embedding_size=16).metadata
