"""Rank-0 training log: one console line every `frequent` steps, the same scalars to TensorBoard.

The console line follows arcface_torch's `CallBackLogging` fields:
`Step 120/2000 Epoch 1 Loss 21.3411 LR 0.09800 Speed 845.2 samples/s ETA 0h12m ...`.
"""

from __future__ import annotations

import os
import sys
import time


class TrainLogger:
    """Console + TensorBoard logging on rank 0 (other ranks hold a no-op instance).

    Args:
        output: run directory; TensorBoard events go to `<output>/tensorboard`.
        rank: process rank; only rank 0 writes.
        total_steps: steps of the whole run, for the ETA.
        global_batch: samples per optimizer step over all ranks, for samples/s.
        use_tensorboard: write event files.
        progress_bar: show a rich progress bar when stdout is a TTY.
    """

    def __init__(
        self,
        output: str,
        rank: int,
        total_steps: int,
        global_batch: int,
        use_tensorboard: bool = True,
        progress_bar: bool = True,
    ):
        self.rank = rank
        self.total_steps = total_steps
        self.global_batch = global_batch
        self.writer = None
        self.progress = None
        self._window_start = time.time()
        self._window_steps = 0
        self._run_start = time.time()
        if rank != 0:
            return
        if use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(output, "tensorboard"))
        if progress_bar and sys.stdout.isatty():
            from rich.progress import BarColumn, Progress, TimeRemainingColumn

            self.progress = Progress(
                "[progress.description]{task.description}", BarColumn(), TimeRemainingColumn()
            )
            self.progress.start()
            self._task = self.progress.add_task("train", total=total_steps)

    def info(self, msg: str) -> None:
        """Prints a line on rank 0 (flushed, so logs of killed runs stay complete)."""
        if self.rank == 0:
            print(msg, flush=True)

    def step(self, step: int, epoch: int, scalars, frequent: int) -> None:
        """Records one optimizer step; every `frequent` steps prints and logs `scalars`.

        `scalars` is a dict, or a callable returning one that is called on logging steps only
        (reading device values costs a host sync: the loop passes a callable). It holds at least
        `loss` and `lr`; others (loss_scale, grad_norm, num_sampled, ...) are printed and logged
        as given.
        """
        self._window_steps += 1
        if self.progress is not None:
            self.progress.update(self._task, completed=step)
        if self.rank != 0 or (step % frequent != 0 and step != self.total_steps):
            return
        if callable(scalars):
            scalars = scalars()
        now = time.time()
        speed = self._window_steps * self.global_batch / max(now - self._window_start, 1e-9)
        self._window_start, self._window_steps = now, 0
        remaining = (self.total_steps - step) * self.global_batch / max(speed, 1e-9)
        hours, rest = divmod(int(remaining), 3600)
        eta = f"{hours}h{rest // 60:02d}m{rest % 60:02d}s"
        extra = " ".join(f"{k} {v:.4g}" for k, v in scalars.items() if k not in ("loss", "lr"))
        self.info(
            f"Step {step}/{self.total_steps} Epoch {epoch} Loss {scalars['loss']:.4f} "
            f"LR {scalars['lr']:.6f} Speed {speed:.1f} samples/s ETA {eta} {extra}".rstrip()
        )
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(f"train/{k}", v, step)
            self.writer.add_scalar("train/samples_per_sec", speed, step)
            self.writer.flush()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.writer is not None:
            self.writer.close()
