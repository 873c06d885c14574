"""Stopping a run on a signal without losing a step (preemption, time limits, Ctrl-C).

A scheduler announces the end of a job with a signal some time before it kills it (SLURM:
`--signal=USR1@120`, then SIGTERM and SIGKILL `KillWait` seconds later at the time limit or on
preemption); torchrun / `accelerate launch` forward SIGTERM and SIGINT to every rank; Ctrl-C is
SIGINT. `StopSignal` turns each configured signal (`preemption.signals`) into a flag: the handler
only records the signal, so a step, a collective or a checkpoint write in progress always ends
normally, and a checkpoint being written when the signal arrives is completed and renamed as
usual (`latest` never names a partial one). A second SIGINT (an impatient Ctrl-C) exits at once
with 130: the temp-then-rename checkpoint layout keeps `latest` on the last complete checkpoint.

The ranks must stop after the same step (the checkpoint is collective), but each rank may see
the signal at a slightly different time. Every `preemption.sync_every` optimizer steps the ranks
all-reduce (MAX) one int64 holding the signal number each has seen: the first check after the
signal, all of them stop at that step. The step already reads the device once per micro-batch
(the replicated finite-loss check, trainer/step.py), so the agreement adds the latency of one
8-byte all-reduce per check, not a pipeline drain per step; `sync_every` > 1 spreads even that
(the stop then lands within `sync_every - 1` steps of the signal, seconds against a scheduler's
grace of minutes).

Exit status of a stopped run: 128 + the signal number, the shell's convention for "ended by this
signal" (130 SIGINT, 143 SIGTERM, 138 SIGUSR1 on Linux), after the checkpoint of the stop step
is complete (docs/clusters.md).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP")


def signal_number(name: str) -> int:
    """`SIGTERM` / `TERM` / `15` -> 15.

    Raises:
        ValueError: a name outside `SIGNALS` (SIGKILL and SIGSTOP cannot be caught).
    """
    text = str(name).strip().upper()
    if text.isdigit():
        names = [s for s in SIGNALS if int(getattr(signal, s)) == int(text)]
        if names:
            return int(text)
    full = text if text.startswith("SIG") else f"SIG{text}"
    if full not in SIGNALS:
        raise ValueError(f"{name!r} is not one of {', '.join(SIGNALS)}")
    return int(getattr(signal, full))


def exit_code(signum: int) -> int:
    """The process exit status of a run stopped by `signum` (128 + number, shell convention)."""
    return 128 + signum


class StoppedBySignal(Exception):  # noqa: N818 - a normal end, not an error
    """The run stopped on a signal after saving the stop step (`code`: the exit status)."""

    def __init__(self, signum: int, step: int, checkpoint: str | None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.code = exit_code(signum)
        super().__init__(f"{signal.Signals(signum).name} at step {step}")


class StopSignal:
    """Signal flag of one rank plus the agreement of all ranks on the step to stop at.

    Args:
        names: signals to catch (`preemption.signals`); empty: nothing is installed.
        sync_every: optimizer steps between agreements (>= 1).
        device: where the all-reduce tensor lives (the process group's device).
    """

    def __init__(self, names: Sequence[str], sync_every: int, device: torch.device) -> None:
        self.signums = [signal_number(n) for n in names]
        self.sync_every = sync_every
        self.device = device
        self.received: int = 0  # this rank's first signal (0: none)
        self.received_at = 0.0  # time.monotonic() of it
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Installs the handlers (main thread only; a no-op elsewhere, e.g. in a test thread)."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.signums:
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        """Puts the handlers that were there before `install` back."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.received:
            self.received, self.received_at = signum, time.monotonic()
        elif signum == signal.SIGINT:  # second Ctrl-C: leave now (write() is signal-safe)
            os.write(2, b"arcscale: second interrupt: exiting without a checkpoint\n")
            os._exit(exit_code(signal.SIGINT))

    def agreed(self, step: int, world: int) -> int:
        """On a check step (`step % sync_every == 0`), the largest signal number any rank has
        seen (collective: every rank calls it with the same `step`); 0 to go on."""
        if step % self.sync_every:
            return 0
        if world <= 1 or not (dist.is_available() and dist.is_initialized()):
            return self.received
        flag = torch.tensor([self.received], dtype=torch.int64, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


def stop_line(signum: int, step: int, path: str | None, seconds: float, requeue: str) -> str:
    """The one line a stopped run logs (rank 0); `requeue`: `requeue_note`'s text."""
    name = signal.Signals(signum).name
    saved = f"checkpoint {path}" if path else "no checkpoint (non-finite loss at this step)"
    return (
        f"[arcscale] {name}: stopped after step {step}, {saved} ({seconds:.1f}s after the "
        f"signal); exit {exit_code(signum)}{requeue}; continue with checkpoint.resume=true"
    )


def requeue_note(wanted: bool, env: Mapping[str, str]) -> str:
    """What the stop line says about `preemption.requeue`."""
    if not wanted:
        return ""
    job = env.get("SLURM_JOB_ID", "")
    return f", requeueing SLURM job {job}" if job else ", not requeued (no SLURM_JOB_ID)"


def requeue_slurm_job(env: Mapping[str, str], run: Callable[..., Any] | None = None) -> str | None:
    """`scontrol requeue $SLURM_JOB_ID` (rank 0, once the stop checkpoint is complete; SLURM
    then ends the job's processes and queues the job again). Returns None on success, else why
    it failed (one line). Without SLURM_JOB_ID nothing runs (None)."""
    import subprocess

    job = env.get("SLURM_JOB_ID", "")
    if not job:
        return None
    run = subprocess.run if run is None else run
    try:
        done = run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"scontrol requeue {job}: {e}"
    if done.returncode:
        why = (done.stderr or done.stdout or "").strip().splitlines()
        return f"scontrol requeue {job}: {why[0] if why else f'exit {done.returncode}'}"
    return None
