"""Helpers for tests that run the real entry point through `accelerate launch` / `deepspeed`."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from trainer.ports import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
STEP_RE = re.compile(r"^Step (\d+)/(\d+) Epoch (\d+) Loss (\S+) LR (\S+)", re.M)

# A tiny IResNet on the LFW demo data: each 2-process step takes well under a second on 2 cores.
TINY = [
    "model.network=r18",
    "model.embedding_size=64",
    "model.kwargs={base_width: 8}",
    "data.batch_size=16",
    "data.num_workers=0",
    "logging.frequent=1",
    "logging.progress_bar=false",
    "eval.batch_size=256",
    "eval.val_targets=[]",  # verification costs minutes on 2 cores: only tests that check it
]


def launch_env() -> dict:
    """The launch environment: DS_ACCELERATOR=cpu only where torch sees no CUDA (on a GPU host an
    inherited `cpu` would contradict torch: trainer/engine.py resolve_device)."""
    import torch

    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/arcscale/torch_extensions"))
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    # The cached venv's editable install names the checkout that last ran tools/setup_env.sh;
    # scripts run by path (`deepspeed trainer/train.py`) must import this checkout's code.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH", "")]))
    return env


def accelerate_cmd(
    config: str, overrides: list[str], accel_cfg: str, extra: list[str] = (), port: int = 0
) -> list[str]:
    """`accelerate launch --config_file accel_cfg --main_process_port P [extra] -m trainer.train
    config overrides` (P: `port`, or a free one)."""
    return [
        os.path.join(BIN, "accelerate"),
        "launch",
        "--config_file",
        os.path.join(REPO, accel_cfg),
        "--main_process_port",
        str(port or free_port()),
        *extra,
        "-m",
        "trainer.train",
        config,
        *overrides,
    ]


def accelerate(
    config: str, overrides: list[str], accel_cfg: str, extra: list[str] = (), timeout=600
):
    """Runs `accelerate_cmd(...)` to the end, output captured."""
    return subprocess.run(
        accelerate_cmd(config, overrides, accel_cfg, extra),
        cwd=REPO,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tiny_overrides(out, data: str, num_classes: int, steps: int, *more: str) -> list[str]:
    """`TINY` on the `.rec` in `data` for `steps` steps without warmup, writing to `out`."""
    return [
        *TINY,
        f"output={out}",
        f"data.rec={data}",
        f"data.num_classes={num_classes}",
        f"schedule.max_steps={steps}",
        "schedule.warmup_epoch=0",
        *more,
    ]


def losses(stdout: str) -> dict[int, float]:
    """{step: loss} from the console lines `Step N/M Epoch E Loss X LR Y ...`."""
    return {int(m.group(1)): float(m.group(4)) for m in STEP_RE.finditer(stdout)}


def lrs(stdout: str) -> dict[int, float]:
    return {int(m.group(1)): float(m.group(5)) for m in STEP_RE.finditer(stdout)}


def check(proc: subprocess.CompletedProcess) -> str:
    """Asserts a launch succeeded, showing its output tail otherwise; returns stdout."""
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
        f"--- stderr\n{proc.stderr[-6000:]}"
    )
    return proc.stdout


def make_lfw_rec(lfw_root: str, out: str, num_people: int = 16, max_per_person: int = 60) -> str:
    """A small insightface-style `.rec` of real LFW faces in `out`: the first `num_people`
    people (sorted) with 20..`max_per_person` images, labels 0..num_people-1. Returns `out`."""
    from data.lfw import LFW_CROP
    from data.pack_rec import convert

    root = os.path.join(lfw_root, "lfw-deepfunneled")
    people = [
        p
        for p in sorted(os.listdir(root))
        if 20 <= len(os.listdir(os.path.join(root, p))) <= max_per_person
    ][:num_people]
    samples = [
        (os.path.join(root, p, f), label)
        for label, p in enumerate(people)
        for f in sorted(os.listdir(os.path.join(root, p)))
    ]
    convert(samples, out, crop=LFW_CROP, insightface_header=True, progress=False)
    return out
