"""The final export (`Checkpointer.finish`) writes `backbone.safetensors` beside `backbone.pt`,
and `model.pretrained` reads it and arcface_torch's `model.pt` folder (issue #31)."""

from __future__ import annotations

import json
import os

import torch

import models
from models.weights import load_backbone, read_state_dict
from tests.helpers.paths import REPO
from tests.helpers.pretrained import TINY_NET, pretrained_file
from trainer.checkpoint.manager import Checkpointer
from trainer.config import load_config
from trainer.pretrained import load_pretrained

CONFIG = os.path.join(REPO, "configs", "lfw_demo_r18.yaml")


class _Loader:
    epoch = 1

    def state_dict(self) -> dict[str, int]:
        return {"epoch": 1}


def _cfg(tmp_path, **more):
    overrides = [
        f"output={tmp_path / 'run'}",
        "model.network=r18",
        f"model.embedding_size={TINY_NET['embedding_size']}",
        "model.kwargs={base_width: 8}",
        *(f"{k}={v}" for k, v in more.items()),
    ]
    return load_config(CONFIG, overrides)


def test_finish_writes_safetensors_beside_backbone_pt(tmp_path):
    cfg = _cfg(tmp_path)
    step = tmp_path / "run" / "checkpoints" / "step_3"
    step.mkdir(parents=True)
    ref = pretrained_file(step / "backbone.pt")
    (step / "meta.json").write_text(json.dumps({"network": "r18"}))
    (step.parent / "latest").write_text("step_3\n")
    ckpt = Checkpointer(
        cfg, engine=None, head=None, head_opt=None, loader=_Loader(), rank=0, world=1,
        precision="fp32", zero_stage=2,
    )  # fmt: skip
    ckpt.finish(3)  # step 3 is saved already: only the export runs
    out = tmp_path / "run"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("backbone")) == [
        "backbone.pt",
        "backbone.safetensors",
    ]
    state = read_state_dict(out / "backbone.safetensors")
    assert all(torch.equal(state[k], ref[k]) for k in ref) and set(state) == set(ref)
    net = load_backbone(out / "backbone.safetensors")  # the header names the network
    assert all(torch.equal(net.state_dict()[k], ref[k]) for k in ref)


def test_pretrained_reads_safetensors_and_model_pt_folder(tmp_path):
    ref = pretrained_file(tmp_path / "model.pt", prefix="module.")
    net = models.create("r18", **TINY_NET)
    assert load_pretrained(_cfg(tmp_path, **{"model.pretrained": tmp_path}), net) == len(ref)
    assert all(torch.equal(net.state_dict()[k], ref[k]) for k in ref)
    from models.weights import save_safetensors

    save_safetensors(ref, tmp_path / "w.safetensors", {"network": "r18", "embedding_size": 64})
    net = models.create("r18", **TINY_NET)
    cfg = _cfg(tmp_path, **{"model.pretrained": tmp_path / "w.safetensors"})
    assert load_pretrained(cfg, net) == len(ref)
    assert all(torch.equal(net.state_dict()[k], ref[k]) for k in ref)
