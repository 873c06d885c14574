"""tools/convert_to_onnx.py: PyTorch parity (r18, mbf, vit_t), checkpoint layouts, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import models
from models.weights import load_backbone, resolve_checkpoint
from tools import convert_to_onnx as conv

FULL = {"r18": 512, "mbf": 128, "vit_t": 512}  # network -> embedding size exported
TINY_KWARGS = {"base_width": 8}  # a tiny r18 for the checkpoint-layout and bad-input tests


pytestmark = pytest.mark.usefixtures("one_thread")


def _calibrated_state(name: str, embedding_size: int, **kwargs) -> dict[str, torch.Tensor]:
    """A model whose BatchNorm running stats come from data, as after training.

    With the initial (0, 1) stats an untrained IResNet's eval activations grow to ~1e6 and a
    1e-4 absolute tolerance would be meaningless.
    """
    torch.manual_seed(0)
    model = models.create(name, embedding_size=embedding_size, **kwargs).train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average over the calibration batches
    with torch.no_grad():
        for seed in range(2):
            model(torch.randn(4, 3, 112, 112, generator=torch.Generator().manual_seed(seed)))
    return model.state_dict()


def _step_dir(root: Path, step: int, network: str, embedding_size: int, kwargs: dict) -> Path:
    step_dir = root / "checkpoints" / f"step_{step}"
    step_dir.mkdir(parents=True)
    torch.save(_calibrated_state(network, embedding_size, **kwargs), step_dir / "backbone.pt")
    meta = {"network": network, "embedding_size": embedding_size, "model_kwargs": kwargs}
    (step_dir / "meta.json").write_text(json.dumps(meta))
    return step_dir


def _run(args: list) -> int:
    return conv.main([str(a) for a in args] + ["--runs", "2", "--ort-threads", "1"])


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".onnx" in p.name)


@pytest.mark.parametrize("name", list(FULL))
def test_export_matches_pytorch(name, tmp_path, lfw_root, capsys):
    dim = FULL[name]
    weights = tmp_path / f"{name}.pt"
    torch.save(_calibrated_state(name, dim), weights)
    out = tmp_path / "out" / "backbone.onnx"
    args = [weights, "--network", name, "--embedding-size", dim, "--output", out]
    assert _run(args + ["--lfw-root", lfw_root]) == 0
    printed = capsys.readouterr().out
    assert "max|diff|" in printed and "MiB" in printed and "latency" in printed

    graph = onnx.load(str(out)).graph
    assert [i.name for i in graph.input] == ["data"] and len(graph.output) == 1
    in_dims = graph.input[0].type.tensor_type.shape.dim
    assert in_dims[0].dim_param and [d.dim_value for d in in_dims[1:]] == [3, 112, 112]
    out_dims = graph.output[0].type.tensor_type.shape.dim
    assert out_dims[0].dim_param and out_dims[1].dim_value == dim
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in graph.initializer)
    # one self-contained file (no external data) and its card
    assert sorted(p.name for p in out.parent.iterdir()) == ["backbone.onnx", "model_card.md"]

    # Independent check (not trusting the tool's own comparison): random and real faces, N=1, 4.
    model = load_backbone(weights, name, embedding_size=dim)
    assert not model.training
    session = _session(out)
    faces = conv.load_faces(lfw_root=Path(lfw_root))
    assert faces.shape == (8, 3, 112, 112) and -1.0 <= faces.min() < faces.max() <= 1.0
    rng = np.random.default_rng(5)
    for batch in (faces[:1], faces[4:8], rng.standard_normal((4, 3, 112, 112), dtype=np.float32)):
        with torch.no_grad():
            ref = model(torch.from_numpy(batch)).numpy()
        got = session.run(None, {"data": batch})[0]
        assert got.shape == (len(batch), dim) and got.dtype == np.float32
        assert np.abs(got - ref).max() <= 1e-4


def test_run_dir_resolves_latest_step_and_meta(tmp_path):
    _step_dir(tmp_path, 10, "r18", 32, TINY_KWARGS)
    newest = _step_dir(tmp_path, 20, "r18", 48, TINY_KWARGS)
    (tmp_path / "checkpoints" / "latest").write_text("step_20\n")
    assert resolve_checkpoint(tmp_path) == (
        newest / "backbone.pt",
        {"network": "r18", "embedding_size": 48, "model_kwargs": TINY_KWARGS},
    )
    assert _run([tmp_path, "--no-faces"]) == 0  # network and kwargs from meta.json
    out = newest / "backbone.onnx"
    session = _session(out)
    assert session.run(None, {"data": np.zeros((3, 3, 112, 112), np.float32)})[0].shape == (3, 48)
    model = load_backbone(newest)
    assert model.embedding_size == 48 and model.conv1.out_channels == 8


def test_arcface_style_pth_loads(tmp_path):
    # A plain state dict saved under another name, with no meta.json: --network is required.
    path = tmp_path / "backbone.pth"
    torch.save(_calibrated_state("r18", 16, **TINY_KWARGS), path)
    with pytest.raises(ValueError, match="--network"):
        load_backbone(path)
    model = load_backbone(path, "r18", embedding_size=16, **TINY_KWARGS)
    assert torch.equal(model.fc.weight, torch.load(path)["fc.weight"])
    # A DistributedDataParallel state dict (every key `module.`-prefixed) loads the same way
    # for evaluation and export as it does for `model.pretrained` (models/weights.py).
    ddp = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in torch.load(path).items()}, ddp)
    model = load_backbone(ddp, "r18", embedding_size=16, **TINY_KWARGS)
    assert torch.equal(model.fc.weight, torch.load(path)["fc.weight"])


def test_missing_input_and_unknown_network(tmp_path, capsys):
    assert _run([tmp_path / "nope.pt", "--network", "r18"]) == 2
    assert "does not exist" in capsys.readouterr().err
    weights = tmp_path / "w.pt"
    torch.save(_calibrated_state("r18", 16, **TINY_KWARGS), weights)
    assert _run([weights, "--network", "resnet9", "--no-faces"]) == 2
    err = capsys.readouterr().err
    assert "resnet9" in err and "vit_t" in err
    (tmp_path / "empty").mkdir()
    assert _run([tmp_path / "empty"]) == 2
    assert "backbone.pt" in capsys.readouterr().err
    assert _leftovers(tmp_path) == []


def test_keys_that_do_not_fit_are_listed(tmp_path, capsys):
    step = _step_dir(tmp_path, 1, "r18", 32, TINY_KWARGS)
    state = torch.load(step / "backbone.pt")
    state["extra.weight"] = torch.zeros(3)
    del state["layer4.1.conv2.weight"]
    torch.save(state, step / "backbone.pt")
    assert _run([step, "--no-faces"]) == 2
    err = capsys.readouterr().err
    assert "missing keys (1): layer4.1.conv2.weight" in err
    assert "unexpected keys (1): extra.weight" in err
    assert _leftovers(step) == []

    step2 = _step_dir(tmp_path, 2, "r18", 32, TINY_KWARGS)
    meta = json.loads((step2 / "meta.json").read_text())
    meta["embedding_size"] = 64
    (step2 / "meta.json").write_text(json.dumps(meta))
    assert _run([step2, "--no-faces"]) == 2
    err = capsys.readouterr().err
    assert (
        "shape-mismatched" in err and "fc.weight: checkpoint (32, 3136) vs model (64, 3136)" in err
    )
    assert _leftovers(step2) == []

    assert _run([step2, "--network", "r34", "--no-faces"]) == 2
    assert "meta.json says 'r18'" in capsys.readouterr().err


def test_dangling_latest_and_bad_files(tmp_path, capsys):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_99")
    assert _run([tmp_path]) == 2
    assert "step_99" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    assert _run([junk, "--network", "r18"]) == 2
    assert "cannot read" in capsys.readouterr().err
    nested = tmp_path / "nested.pt"
    torch.save({"state_dict": {"a": torch.zeros(1)}}, nested)
    assert _run([nested, "--network", "r18"]) == 2
    assert "plain state dict" in capsys.readouterr().err


def test_parity_failure_leaves_no_onnx(tmp_path, monkeypatch, capsys):
    step = _step_dir(tmp_path, 3, "r18", 16, TINY_KWARGS)
    monkeypatch.setattr(conv, "TOLERANCE", -1.0)  # any difference, even 0, now fails
    assert _run([step, "--no-faces"]) == 1
    assert "FAILED" in capsys.readouterr().err
    assert _leftovers(step) == []


def test_simplify_needs_onnxsim(tmp_path, capsys):
    step = _step_dir(tmp_path, 4, "r18", 16, TINY_KWARGS)
    try:
        import onnxsim  # noqa: F401
    except ImportError:
        assert _run([step, "--no-faces", "--simplify"]) == 2
        assert "onnxsim" in capsys.readouterr().err
        assert _leftovers(step) == []
    else:
        assert _run([step, "--no-faces", "--simplify"]) == 0
        assert (step / "backbone.onnx").is_file()
