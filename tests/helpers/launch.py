"""The one way tests start the trainer, a launcher or a tool in a subprocess.

- ``run_cmd(cmd)``: runs a command to the end in the checkout, output captured (``check`` asserts
  it succeeded and returns stdout).
- ``Launch(cmd, tmp, name)``: starts a command in its own process group with its output in
  files (no pipe to fill), for tests that watch or kill a run while it trains; every Launch
  still running when its test ends is killed (tests/integration/conftest.py).
- commands: ``accelerate_cmd`` (``accelerate launch ... -m trainer.train``), ``deepspeed_cmd``
  (the ``deepspeed`` launcher on ``trainer/train.py``), ``train_cmd`` (bare ``python -m
  trainer.train``); ``accelerate(...)`` is ``run_cmd(accelerate_cmd(...))``.
- ``launch_env()``: the environment every one of them gets by default.
- ``TINY``/``tiny_overrides``: a tiny IResNet on small data; ``losses``/``lrs``: the console's
  step lines.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys

from tests.helpers.paths import REPO, TORCH_EXTENSIONS
from trainer.ports import free_port

__all__ = [
    "BIN",
    "REPO",
    "STEP_RE",
    "TINY",
    "Launch",
    "accelerate",
    "accelerate_cmd",
    "check",
    "deepspeed_cmd",
    "free_port",
    "kill_tree",
    "launch_env",
    "losses",
    "lrs",
    "run_cmd",
    "stop_launches",
    "tiny_overrides",
    "train_cmd",
]

BIN = os.path.dirname(sys.executable)
STEP_RE = re.compile(r"^Step (\d+)/(\d+) Epoch (\d+) Loss (\S+) LR (\S+)", re.M)
# The venv's scripts start through this interpreter, not their shebang: a launcher's ranks then
# import torch from the same path as this process, so a DeepSpeed op JIT-built into
# TORCH_EXTENSIONS_DIR (its build flags name torch's include path) is not rebuilt whenever the
# venv is reached once through a symlink (.venv) and once through its real path (the shebang).
# tools/setup_env.sh's zz_arcscale_venv.pth does the same for every other process.
_SCRIPT = [sys.executable]
# Variables a launcher sets for its ranks: a started process never inherits this one's.
_RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")

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
    inherited `cpu` would contradict torch: trainer/engine.py resolve_device), no inherited rank
    variables (a bare `python -m trainer.train` runs as world size 1)."""
    import torch

    env = {k: v for k, v in os.environ.items() if k not in _RANK_VARS}
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", TORCH_EXTENSIONS)
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    # The cached venv's editable install names the checkout that last ran tools/setup_env.sh;
    # scripts run by path (`deepspeed trainer/train.py`) must import this checkout's code.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH", "")]))
    return env


# --- commands ---------------------------------------------------------------------------------


def accelerate_cmd(
    config: str,
    overrides: list[str],
    accel_cfg: str,
    extra: list[str] = (),
    port: int = 0,
    module: str = "trainer.train",
) -> list[str]:
    """`accelerate launch --config_file accel_cfg --main_process_port P [extra] -m module
    config overrides` (P: `port`, or a free one)."""
    return [
        *_SCRIPT,
        os.path.join(BIN, "accelerate"),
        "launch",
        "--config_file",
        os.path.join(REPO, accel_cfg),
        "--main_process_port",
        str(port or free_port()),
        *extra,
        "-m",
        module,
        config,
        *overrides,
    ]


def deepspeed_cmd(config: str, overrides: list[str], extra: list[str] = ()) -> list[str]:
    """`deepspeed [extra] --master_port P trainer/train.py config overrides` (P: a free port)."""
    return [
        *_SCRIPT,
        os.path.join(BIN, "deepspeed"),
        *extra,
        "--master_port",
        str(free_port()),
        os.path.join(REPO, "trainer", "train.py"),
        config,
        *overrides,
    ]


def train_cmd(config: str, overrides: list[str]) -> list[str]:
    """`python -m trainer.train config overrides`, no launcher (world size 1)."""
    return [sys.executable, "-m", "trainer.train", config, *overrides]


# --- running ----------------------------------------------------------------------------------


def run_cmd(
    cmd: list, env: dict | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Runs `cmd` in the checkout to the end, output captured as text.

    Args:
        env: the whole environment; default `launch_env()`.
        timeout: seconds before `subprocess.TimeoutExpired`.
    """
    return subprocess.run(
        [str(c) for c in cmd],
        cwd=REPO,
        env=launch_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def accelerate(
    config: str,
    overrides: list[str],
    accel_cfg: str,
    extra: list[str] = (),
    timeout: float = 600,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """Runs `accelerate_cmd(...)` to the end, output captured."""
    return run_cmd(accelerate_cmd(config, overrides, accel_cfg, extra), env=env, timeout=timeout)


def check(proc: subprocess.CompletedProcess) -> str:
    """Asserts a launch succeeded, showing its output tail otherwise; returns stdout."""
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
        f"--- stderr\n{proc.stderr[-6000:]}"
    )
    return proc.stdout


_STARTED: list[Launch] = []


class Launch:
    """`cmd` started in the checkout in its own process group, output in `tmp/name.out|err`.

    Args:
        env: the whole environment; default `launch_env()`.
    """

    def __init__(self, cmd: list, tmp, name: str, env: dict | None = None):
        self.out_path, self.err_path = tmp / f"{name}.out", tmp / f"{name}.err"
        with open(self.out_path, "w") as so, open(self.err_path, "w") as se:
            self.proc = subprocess.Popen(
                [str(c) for c in cmd],
                cwd=REPO,
                env=launch_env() if env is None else env,
                stdout=so,
                stderr=se,
                start_new_session=True,
            )
        _STARTED.append(self)

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def wait(self, timeout: float = 600) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        kill_tree(self.proc.pid)
        self.proc.wait(timeout=60)

    def ok(self, timeout: float = 600) -> str:
        """Waits for the end, asserts exit 0 (showing the output tails otherwise); stdout."""
        rc = self.wait(timeout)
        assert rc == 0, f"exit {rc}\n{self.stdout[-3000:]}\n{self.stderr[-5000:]}"
        return self.stdout


def stop_launches() -> None:
    """Kills every `Launch` still running (a failing test must not leave runs training)."""
    while _STARTED:
        launch = _STARTED.pop()
        if launch.proc.poll() is None:
            launch.kill()


def kill_tree(pid: int) -> None:
    """SIGKILL of the launcher's process group and of every descendant's group: torchrun starts
    each worker in a session of its own, so killing the launcher's group alone leaves the
    workers training (and writing checkpoints) as orphans."""
    import psutil

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    groups = set()
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
            groups.add(os.getpgid(p.pid))
    for group in groups - {os.getpgrp()}:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


# --- overrides and console ----------------------------------------------------------------------


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
