"""Careless runs on checkpoint folders (issue 19, trainer/checkpoint.py), in this process:
pruning keeps the checkpoint just written, only our temporary names are cleaned, a garbage
meta.json or an unwritable output is one line, `latest` cannot point outside the run. Issue 32
items 4, 5, 13: meta.json is checked as a schema and against the config, every tensor a resume
copies against the live one (a real 1-rank engine). Hostile payloads in a real run's
checkpoint: tests/integration/test_hostile_checkpoints.py.
"""

import json
import os
import re

import pytest

from trainer import checkpoint as ckpt
from trainer.config import ConfigError, load_config

CONFIG = "configs/synthetic_tiny.yaml"


def test_pruning_never_removes_the_checkpoint_just_written(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 5, 100):
        (root / f"step_{step}").mkdir(parents=True)
        (root / f"step_{step}" / "meta.json").write_text("{}")
    ckpt.prune_checkpoints(str(root), keep_last=1, keep=str(root / "step_5"))
    assert sorted(os.listdir(root)) == ["step_5"]


def test_clean_incomplete_removes_only_its_own_temporary_names(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step_7").mkdir(parents=True)
    (root / "step_7" / "weights.bin").write_bytes(b"someone's weights")
    (root / "step_8.tmp").mkdir()
    removed = ckpt.clean_incomplete(str(root), log=lambda *a: None)
    assert removed == [str(root / "step_8.tmp")]
    assert (root / "step_7" / "weights.bin").is_file()


def test_garbage_meta_json_names_the_file(tmp_path):
    step = tmp_path / "step_3"
    step.mkdir()
    for garbage in ("{not json", "[1, 2]", json.dumps({"step": "x", "epoch": 0, "world_size": 1})):
        (step / "meta.json").write_text(garbage)
        with pytest.raises(ConfigError, match=str(step / "meta.json")):
            ckpt.load_meta(str(step))


def test_unwritable_output_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cfg = load_config(CONFIG, [f"output={blocker / 'run'}"])
    with pytest.raises(ConfigError, match="output: cannot write to"):
        ckpt.preflight_output(cfg)


def test_latest_is_confined_to_the_runs_checkpoints(tmp_path):
    from tools.convert_to_onnx import resolve_checkpoint

    elsewhere = tmp_path / "elsewhere" / "step_9"
    elsewhere.mkdir(parents=True)
    (elsewhere / "meta.json").write_text(json.dumps({"step": 9, "epoch": 0, "world_size": 1}))
    (elsewhere / "backbone.pt").write_bytes(b"")
    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    for name in (str(elsewhere), "../../elsewhere/step_9"):
        (root / "latest").write_text(name + "\n")
        assert ckpt.latest_checkpoint(str(tmp_path / "run")) is None
        with pytest.raises(FileNotFoundError, match="which is no complete step_<N> folder"):
            resolve_checkpoint(tmp_path / "run")


def _fake_checkpoint(folder, world=1, **meta):
    """A step folder with the files meta.json implies (contents unread by the schema check)."""
    (folder / "head").mkdir(parents=True)
    (folder / "engine" / "engine").mkdir(parents=True)
    (folder / "backbone.pt").write_bytes(b"")
    for r in range(world):
        (folder / f"rng_rank{r}.pt").write_bytes(b"")
        (folder / "engine" / "engine" / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").touch()
    fields = {"step": 4, "epoch": 0, "world_size": world, "loader": {"epoch": 0, "offset": 32},
              "network": "r18", "embedding_size": 64, "num_classes": 101, **meta}  # fmt: skip
    (folder / "meta.json").write_text(json.dumps({k: v for k, v in fields.items() if v != "-"}))
    return folder


@pytest.mark.parametrize(
    "meta, field",
    [
        ({"step": -5}, "'step' = -5 is outside"),
        ({"step": 10**30}, "integer of 31 digits"),
        ({"step": 3}, "'step' = 3 but the folder is step_4"),
        ({"world_size": 0}, "'world_size' = 0 is outside"),
        ({"embedding_size": 262144}, "'embedding_size' = 262144 is outside"),
        ({"loader": "-"}, "'loader' (the data position"),
        ({"loader": {"epoch": 0, "offset": -1}}, "loader: 'offset' = -1"),
        ({"network": ["r18"]}, "'network' must be a string"),
    ],
)
def test_meta_json_is_checked_as_a_schema(tmp_path, meta, field):
    step = _fake_checkpoint(tmp_path / "step_4", **meta)
    with pytest.raises(ConfigError, match=re.escape(field)) as err:
        ckpt.load_meta(str(step))
    assert str(step / "meta.json") in str(err.value) and "\n" not in str(err.value)


def test_meta_json_world_size_must_match_the_files(tmp_path):
    """world_size: 0 -> 1 rank files of a 2-rank run: the resume would take the world-size-change
    path and drop the optimizer state silently."""
    step = _fake_checkpoint(tmp_path / "step_4", world=2, world_size=1)
    with pytest.raises(ConfigError, match="'world_size' = 1 but the folder holds 2 rng_rank"):
        ckpt.load_meta(str(step))
    (step / "meta.json").write_text("[" * 100000)
    with pytest.raises(ConfigError, match="nested too deeply"):
        ckpt.load_meta(str(step))


@pytest.mark.parametrize(
    "meta, field",
    [
        ({"num_classes": 100}, "num_classes=100 but data.num_classes is 101"),
        ({"embedding_size": 32}, "embedding_size=32 but model.embedding_size is 64"),
        ({"num_subcenters": 3}, "num_subcenters=3 but head.num_subcenters is 1"),
        ({"network": "r50"}, "network='r50' but model.network is 'r18'"),
    ],
)
def test_resume_with_other_model_or_head_sizes_is_refused_at_preflight(tmp_path, meta, field):
    step = _fake_checkpoint(tmp_path / "run" / "checkpoints" / "step_4", **meta)
    cfg = load_config(CONFIG, [f"output={tmp_path / 'out'}", f"checkpoint.resume={step}"])
    with pytest.raises(ConfigError, match=re.escape(field)):
        ckpt.preflight_output(cfg)


def test_loader_offset_out_of_range_is_one_line_before_the_engine_loads(tmp_path):
    from data.sampler import DistributedShardSampler

    class Loader:  # the parts of a TrainLoader the Checkpointer uses
        epoch = 0
        sampler = DistributedShardSampler(64, 0, 1, seed=0)

        def set_epoch(self, epoch):
            self.epoch = epoch

        def load_state_dict(self, state):
            self.sampler.load_state_dict(state)

    _fake_checkpoint(tmp_path / "run" / "checkpoints" / "step_4",
                     loader={"epoch": 0, "offset": 10**9})  # fmt: skip
    cfg = load_config(CONFIG, [f"output={tmp_path / 'run'}", "checkpoint.resume=true"])
    checkpointer = ckpt.Checkpointer(cfg, engine=None, head=None, head_opt=None, loader=Loader(),
                                     rank=0, world=1, precision="fp32", zero_stage=2)  # fmt: skip
    with pytest.raises(ConfigError, match="'loader' does not fit this data .*offset 1000000000"):
        checkpointer.resume()


def _resume_worker(rank, world, stage, root):
    """Saves a real checkpoint of a tiny engine + head, then resumes from copies with one tensor
    of the wrong shape each; returns {case: the ConfigError's message or "loaded"}."""
    import shutil

    import torch

    from tests.helpers.train_step import build_step

    _, engine, head, head_opt, _, _ = build_step(rank, world, stage, "fp32", 1)
    meta = {"step": 1, "epoch": 0, "world_size": 1, "loader": {"epoch": 0, "offset": 4}}
    good = ckpt.save_checkpoint(root, 1, engine, head, head_opt, meta, rank, 5, log=lambda m: None)
    eng = os.path.join("engine", "engine")
    model = next(f for f in os.listdir(os.path.join(good, eng)) if "model_states" in f)
    optim = next(f for f in os.listdir(os.path.join(good, eng)) if "optim_states" in f)
    shard = os.path.join("head", os.listdir(os.path.join(good, "head"))[0])

    def edit(rel, change):
        def apply(path):
            state = torch.load(os.path.join(path, rel), weights_only=False)
            change(state)
            torch.save(state, os.path.join(path, rel))

        return apply

    def module(s):
        s["module"]["1.weight"] = torch.zeros(1, 48)  # broadcastable into (8, 48)
        s["param_shapes"][0]["1.weight"] = torch.Size([1, 48])  # what ZeRO-3 is checked by

    def partition(s):
        groups = s["optimizer_state_dict"]
        key = "single_partition_of_fp32_groups" if stage < 3 else "fp32_flat_groups"
        groups[key][0] = torch.zeros(1)

    cases = {
        "intact": lambda p: None,
        "model_states": edit(os.path.join(eng, model), module),
        "optim_states": edit(os.path.join(eng, optim), partition),
        "head_rows": edit(shard, lambda s: s.update(weight=torch.zeros(1, 8))),
        "head_width": edit(shard, lambda s: s.update(weight=torch.zeros(11, 9))),
        "head_dtype": edit(shard, lambda s: s.update(weight=torch.zeros(11, 8).double())),
        "backbone_pt": edit("backbone.pt", lambda s: s.update({"1.weight": torch.zeros(1, 48)})),
    }
    out = {}
    for name, apply in cases.items():
        path = os.path.join(root, "checkpoints", f"step_{len(out) + 2}")
        shutil.copytree(good, path)
        apply(path)
        with open(os.path.join(path, "meta.json"), "w") as f:
            json.dump({**meta, "step": len(out) + 2}, f)
        try:
            if name == "backbone_pt":
                ckpt.load_backbone_weights(engine, os.path.join(path, "backbone.pt"))
            else:
                ckpt.load_checkpoint(path, engine, head, head_opt, rank, world, log=lambda m: None)
            out[name] = "loaded"
        except ConfigError as e:
            out[name] = str(e)
    return out


@pytest.mark.parametrize("stage", [2, 3])
def test_every_tensor_a_resume_copies_is_checked_against_the_live_one(tmp_path, stage):
    """A tensor of another shape (a broadcastable one too: `copy_` would fill the parameter
    with it) or dtype is one line naming the file and tensor; an intact checkpoint loads."""
    from tests.helpers.distributed import run_distributed

    (out,) = run_distributed(_resume_worker, 1, args=(stage, str(tmp_path)), timeout=900)
    assert out.pop("intact") == "loaded"
    expect = {
        "model_states": ("model_states.pt: ", "'1.weight' is (1, 48)", "(8, 48)"),
        "optim_states": ("optim_states.pt: '", "(1,) torch.float32 but the run's tensor is (392,)"),
        "head_rows": ("shard_0_11.pt: 'weight' is (1, 8)", "the head's is (11, 8)"),
        "head_width": ("shard_0_11.pt: 'weight' is (11, 9)", "the head's is (11, 8)"),
        "head_dtype": ("shard_0_11.pt: 'weight' is (11, 8) torch.float64", "torch.float32"),
        "backbone_pt": ("backbone.pt: '1.weight' is (1, 48)", "(8, 48)"),
    }
    for case, needles in expect.items():
        assert all(n in out[case] for n in needles), (case, out[case])
        assert "\n" not in out[case]
