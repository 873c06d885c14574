"""End-to-end training through the real launchers: 2 CPU processes over gloo, LFW demo data.

Each launch costs ~10 s of start-up, so the cases are grouped; the session fixture
`lfw16_heldout` (tests/integration/conftest.py) gives the 16-identity LFW `.rec` beside the
demo's held-out `.bin` (tools/prepare_lfw.py on ../shared/data/lfw).
"""

import glob
import json
import os

import pytest
import torch

import models
from evaluation.runs import read_scalars
from tests.helpers.launch import (
    BIN,
    REPO,
    Launch,
    accelerate,
    accelerate_cmd,
    check,
    deepspeed_cmd,
    free_port,
    launch_env,
    losses,
    lrs,
    run_cmd,
    tiny_overrides,
)
from tests.helpers.lfw_rec import LFW16_CLASSES

CONFIG = os.path.join(REPO, "configs", "lfw_demo_r18.yaml")


def _overrides(tmp, data, steps, *more):
    return tiny_overrides(tmp, data, LFW16_CLASSES, steps, *more)


def _head_rows(ckpt_dir):
    """All head rows of a checkpoint in global class order (whatever the shard layout)."""
    parts = []
    for path in sorted(glob.glob(os.path.join(ckpt_dir, "head", "*.pt"))):
        shard = torch.load(path, weights_only=False)
        parts.append((shard["start"], shard["weight"]))
    return torch.cat([w for _, w in sorted(parts, key=lambda p: p[0])])


def test_zero_stages_agree_and_artifacts(lfw16_heldout, tmp_path):
    """ZeRO-1/2/3 fp32 give the same loss curve (20 steps, same seed and data, SGD momentum and
    weight decay on, Partial FC sampling 0.5) to 1e-5 in TensorBoard's float32 values; the loss
    falls; the run writes the verification line, TensorBoard events, eval.jsonl and checkpoints.

    Gradient clipping is off here: DeepSpeed sums the global gradient norm over differently cut
    partitions per stage (ZeRO-3 splits every parameter, ZeRO-1/2 one flat buffer), so with
    clipping active the clip coefficient can differ in its last bit and the curves separate at
    float-rounding level, amplified by training (README.md, "ZeRO stages agree")."""
    curves = {}
    for stage in (1, 2, 3):
        out = tmp_path / f"z{stage}"
        extra = ["eval.val_targets=[lfw_heldout]", "eval.verbose=10", "checkpoint.every=10"]
        ov = _overrides(
            out,
            lfw16_heldout,
            20,
            "engine.precision=fp32",
            "head.sample_rate=0.5",
            "optim.lr=0.02",
            "optim.clip_grad=0",
            *extra,
        )
        stdout = check(accelerate(CONFIG, ov, f"accelerate_configs/cpu_2proc_zero{stage}.yaml"))
        assert f"ZeRO-{stage} fp32" in stdout
        assert sorted(losses(stdout)) == list(range(1, 21))
        steps, values = read_scalars(str(out / "tensorboard"))["train/loss"]
        curves[stage] = dict(zip(steps, values, strict=True))
        assert "[lfw_heldout][10]" in stdout and "Accuracy-Flip" in stdout
        assert glob.glob(str(out / "tensorboard" / "events.out.tfevents.*"))
        evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
        assert {e["step"] for e in evals} == {10, 20}
        latest = (out / "checkpoints" / "latest").read_text().strip()
        assert latest == "step_20"
        step_dir = out / "checkpoints" / "step_20"
        for name in ("meta.json", "backbone.pt", "rng_rank0.pt", "rng_rank1.pt"):
            assert (step_dir / name).is_file(), name
        assert (out / "config.yaml").is_file()
        # The consolidated fp32 backbone loads strictly into the network (insightface keys).
        net = models.create("r18", embedding_size=64, base_width=8)
        net.load_state_dict(torch.load(out / "backbone.pt", weights_only=True), strict=True)
        assert not glob.glob(str(out / "checkpoints" / "*.tmp"))
    first5 = sum(curves[1][s] for s in range(1, 6)) / 5
    last5 = sum(curves[1][s] for s in range(16, 21)) / 5
    assert last5 < first5 - 0.5, curves[1]
    for step, loss in curves[1].items():
        for stage in (2, 3):
            assert abs(curves[stage][step] - loss) < 1e-5, (stage, step, loss, curves[stage][step])


def test_bf16_vit_with_checkpointing_and_deepspeed_launcher(lfw16_heldout, tmp_path):
    """A tiny ViT under ZeRO-2 bf16 with activation checkpointing; then the `deepspeed` launcher."""
    out = tmp_path / "vit"
    vit = [
        "model.network=vit_t",
        "model.kwargs={embed_dim: 32, depth: 2, num_heads: 2}",
        "model.grad_checkpointing=true",
        "optim.optimizer=adamw",
        "optim.lr=0.003",
        "optim.weight_decay=0.1",
        "engine.precision=bf16",
    ]
    stdout = check(
        accelerate(
            CONFIG,
            _overrides(out, lfw16_heldout, 12, *vit),
            "accelerate_configs/cpu_2proc_zero2.yaml",
        )
    )
    curve = losses(stdout)
    assert "ZeRO-2 bf16" in stdout and len(curve) == 12
    assert all(torch.isfinite(torch.tensor(v)) for v in curve.values())

    out2 = tmp_path / "ds"
    ov = _overrides(out2, lfw16_heldout, 6, "engine.zero_stage=1", "engine.precision=fp32")
    env = launch_env()
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    stdout = check(run_cmd(deepspeed_cmd(CONFIG, ov, ["--num_gpus", "2"]), env=env))
    assert "world size 2" in stdout and len(losses(stdout)) == 6


def test_two_nodes_on_one_machine(lfw16_heldout, tmp_path):
    """`accelerate launch --num_machines 2 --machine_rank 0/1` as two processes: trains, saves."""
    port = free_port()
    out = tmp_path / "nodes"
    nodes = []
    for rank in (0, 1):
        extra = [
            "--num_machines",
            "2",
            "--num_processes",
            "2",
            "--machine_rank",
            str(rank),
            "--main_process_ip",
            "127.0.0.1",
        ]
        cmd = accelerate_cmd(
            CONFIG,
            _overrides(out, lfw16_heldout, 6, "engine.precision=fp32", "checkpoint.every=3"),
            "accelerate_configs/cpu_2proc_zero2.yaml",
            extra,
            port,
        )
        nodes.append(Launch(cmd, tmp_path, f"node{rank}"))
    outs = [node.ok() for node in nodes]
    assert "world size 2" in outs[0] and len(losses(outs[0])) == 6
    assert (out / "checkpoints" / "step_6" / "meta.json").is_file()
    assert json.loads((out / "checkpoints" / "step_6" / "meta.json").read_text())["world_size"] == 2


def test_resume_continues_and_reshards(lfw16_heldout, tmp_path):
    """Resume from step 5 of a 10-step run reproduces steps 6-10 (loss and LR); resuming the
    2-process checkpoint on 1 and 3 processes restores the head rows exactly."""
    out = tmp_path / "full"
    base = ["engine.precision=fp32", "checkpoint.every=5", "checkpoint.keep_last=5"]
    full = check(
        accelerate(
            CONFIG,
            _overrides(out, lfw16_heldout, 10, *base),
            "accelerate_configs/cpu_2proc_zero2.yaml",
        )
    )
    ref_loss, ref_lr = losses(full), lrs(full)
    step5 = out / "checkpoints" / "step_5"
    assert step5.is_dir()

    out2 = tmp_path / "resumed"
    resumed = check(
        accelerate(
            CONFIG,
            _overrides(out2, lfw16_heldout, 10, *base, f"checkpoint.resume={step5}"),
            "accelerate_configs/cpu_2proc_zero2.yaml",
        )
    )
    assert "resumed from" in resumed
    got_loss, got_lr = losses(resumed), lrs(resumed)
    assert sorted(got_loss) == list(range(6, 11))
    for s in range(6, 11):
        assert got_lr[s] == pytest.approx(ref_lr[s], rel=1e-6)
        assert got_loss[s] == pytest.approx(ref_loss[s], abs=1e-4), (s, got_loss, ref_loss)

    saved = _head_rows(step5)
    for nproc in (1, 3):
        out3 = tmp_path / f"w{nproc}"
        proc = accelerate(
            CONFIG,
            _overrides(out3, lfw16_heldout, 5, *base, f"checkpoint.resume={step5}"),
            "accelerate_configs/cpu_2proc_zero2.yaml",
            extra=["--num_processes", str(nproc)],
        )
        stdout = check(proc)
        assert f"world size {nproc}" in stdout and "resumed from" in stdout
        again = out3 / "checkpoints" / "step_5"
        assert json.loads((again / "meta.json").read_text())["world_size"] == nproc
        assert torch.equal(_head_rows(again), saved)
