"""Every shipped per-loss demo config trains end to end: ONE `accelerate launch` (2 CPU processes,
ZeRO-2) of this module, whose `__main__` runs the trainer's own `train()` once per config, 3 steps
each on a 16-identity `.rec` of real LFW faces, with a final checkpoint. One launch instead of
ten saves ~10 s of start-up per loss. `lfw_demo_subcenter.yaml` (ArcFace with 3 sub-centers per
class) rides in the same launch: its checkpointed head shards must hold 3 rows per class.
"""

from __future__ import annotations

import glob
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.launch import (
    BIN,
    REPO,
    check,
    free_port,
    launch_env,
    losses,
    make_lfw_rec,
    tiny_overrides,
)

pytestmark = pytest.mark.slow
LOSS_CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "lfw_demo_*.yaml")))
NUM = 16
STEPS = 3
MARK = "=== loss config "


def _loss_name(path: str) -> str:
    return os.path.basename(path)[len("lfw_demo_") : -len(".yaml")]


def run_all(out_root: str, configs: list[str], overrides: list[str]) -> None:
    """Launched entry: `train()` for each config in turn, in this one process group."""
    import time

    from accelerate.state import AcceleratorState

    from trainer.config import load_config
    from trainer.engine import build_ds_config, resolve_engine_settings
    from trainer.train import train

    for path in configs:
        t0 = time.time()
        name = _loss_name(path)
        cfg = load_config(path, [*overrides, f"output={out_root}/{name}"])
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{MARK}{name} {cfg.head.loss} {cfg.head.num_subcenters}", flush=True)
        settings = resolve_engine_settings(cfg)
        train(cfg, settings, build_ds_config(cfg, settings))
        AcceleratorState._reset_state()  # the next run builds its own Accelerator and plugin
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"=== {name} took {time.time() - t0:.1f} s", flush=True)


def test_every_loss_config_trains_with_zero2(lfw_root, tmp_path):
    per_loss = [c for c in LOSS_CONFIGS if _loss_name(c) not in ("r18", "mbf")]
    assert len(per_loss) >= 10, per_loss
    data = make_lfw_rec(lfw_root, str(tmp_path / "lfw16"), NUM)
    out = tmp_path / "runs"
    ov = tiny_overrides("unused", data, NUM, STEPS, "engine.zero_stage=2")
    cmd = [
        os.path.join(BIN, "accelerate"),
        "launch",
        "--config_file",
        os.path.join(REPO, "accelerate_configs", "cpu_2proc_zero2.yaml"),
        "--main_process_port",
        str(free_port()),
        "-m",
        "tests.test_margins_e2e",
        str(out),
        *per_loss,
        "--",
        *ov,
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=900
    )
    stdout = check(proc)
    sections = stdout.split(MARK)[1:]
    assert len(sections) == len(per_loss)
    for path, text in zip(per_loss, sections):
        name = _loss_name(path)
        loss, subcenters = ("arcface", 3) if name == "subcenter" else (name, 1)
        assert text.startswith(f"{name} {loss} {subcenters}"), text[:80]
        steps = losses(text)
        assert sorted(steps) == list(range(1, STEPS + 1)), f"{name}: {steps}"
        assert all(math.isfinite(v) for v in steps.values()), f"{name}: {steps}"
        shards = glob.glob(str(out / name / "**" / "head" / "shard_*.pt"), recursive=True)
        assert len(shards) >= 2, f"{name}: no 2-rank head checkpoint"
        head = torch.load(shards[0], weights_only=True)
        assert head["num_subcenters"] == subcenters
        rows = (head["end"] - head["start"]) * subcenters  # K rows per class of the shard
        assert head["weight"].shape == (rows, head["embedding_size"])
        saved = head["margin"]
        if name == "curricularface":  # t moved off 0 and was checkpointed
            assert float(saved["state"]["t"]) != 0.0
        if name == "adaface":
            assert float(saved["state"]["batch_mean"]) != 20.0


if __name__ == "__main__":
    split = sys.argv.index("--")
    run_all(sys.argv[1], sys.argv[2:split], sys.argv[split + 1 :])
