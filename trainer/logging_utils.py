"""Rank-0 training log: one console line every `frequent` steps, the same scalars to TensorBoard
and, through Accelerate (`log_with`, `init_trackers`, `accelerator.log`), to the experiment
trackers of `logging.trackers`, with the verification metrics; `run_log` keeps the console in
`<output>/training.log`.

The console line follows arcface_torch's `CallBackLogging` fields:
`Step 120/2000 Epoch 1 Loss 21.3411 LR 0.09800 Speed 845.2 samples/s ETA 0h12m ...`; as there
(its `AverageMeter`, reset at each log), Loss is the mean over the steps since the last line.
arcface_torch also writes `training.log` in its output folder (`utils/utils_logging.py`).
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import IO, Any, TextIO

from trainer.config import Config, ConfigError, to_dict
from trainer.fd_tee import FdTee

RUN_LOG = "training.log"


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
    ) -> None:
        self.rank = rank
        self.total_steps = total_steps
        self.global_batch = global_batch
        self.writer: Any = None
        self.progress: Any = None
        self.accelerator: Any = None  # set by `init_trackers`: trackers log through it
        self._loss_sum: Any = None  # device tensor: finite losses since the last line
        self._loss_count = 0
        self._window_start = time.time()
        self._window_steps = 0
        self._run_start = time.time()
        if rank != 0:
            return
        if use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(output, "tensorboard"))
        if progress_bar and sys.stdout.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TimeRemainingColumn

            # the bar goes to the terminal only; printed lines still reach training.log
            self.progress = Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                TimeRemainingColumn(),
                console=Console(file=getattr(sys.stdout, "terminal", sys.stdout)),
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self.progress.start()
            self._task = self.progress.add_task("train", total=total_steps)

    def info(self, msg: str) -> None:
        """Prints a line on rank 0 (flushed, so logs of killed runs stay complete)."""
        if self.rank == 0:
            print(msg, flush=True)

    def step(
        self,
        step: int,
        epoch: int,
        scalars: dict[str, float] | Callable[[], dict[str, float]],
        frequent: int,
        loss: Any = None,
    ) -> None:
        """Records one optimizer step; every `frequent` steps prints and logs `scalars`.

        `scalars` is a dict, or a callable returning one that is called on logging steps only
        (reading device values costs a host sync: the loop passes a callable). It holds at least
        `loss` and `lr`; others (loss_scale, grad_norm, num_sampled, ...) are printed and logged
        as given. `loss`: this step's finite loss (0-dim device tensor, None when non-finite):
        added on the device, the printed and logged `loss` is their mean since the last line
        (one more read, on logging steps only), as arcface_torch's `AverageMeter`.
        """
        self._window_steps += 1
        if self.progress is not None:
            self.progress.update(self._task, completed=step)
        if self.rank != 0:
            return
        if loss is not None:
            self._loss_sum = loss.detach().float() + (
                0 if self._loss_sum is None else self._loss_sum
            )
            self._loss_count += 1
        if step % frequent != 0 and step != self.total_steps:
            return
        scalars = dict(scalars() if callable(scalars) else scalars)
        if self._loss_count:
            scalars["loss"] = float(self._loss_sum) / self._loss_count
            self._loss_sum, self._loss_count = None, 0
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
        values = {f"train/{k}": float(v) for k, v in scalars.items()}
        self.log_metrics({**values, "train/samples_per_sec": speed}, step)

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        """Sends `values` to the trackers (`accelerator.log`, rank 0; no-op without trackers)."""
        if self.accelerator is not None and self.rank == 0:
            self.accelerator.log(values, step=step)

    def close(self) -> None:
        """Stops the progress bar, closes TensorBoard and finishes the trackers."""
        if self.progress is not None:
            self.progress.stop()
        if self.writer is not None:
            self.writer.close()
        if self.accelerator is not None:
            self.accelerator.end_training()
            self.accelerator = None


def val_scalars(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The verification callback's results (target -> metrics) as tracker scalars:
    `val/<target>/accuracy`, `accuracy_std`, `highest_accuracy`, `tar_at_far`, `xnorm`."""
    keys = {
        "accuracy_mean": "accuracy",
        "accuracy_std": "accuracy_std",
        "highest_accuracy": "highest_accuracy",
        "tar_at_far": "tar_at_far",
        "xnorm": "xnorm",
    }
    return {
        f"val/{name}/{tag}": float(res[key])
        for name, res in results.items()
        for key, tag in keys.items()
        if key in res
    }


def _tracker_class(name: str) -> Any:
    """accelerate's tracker class registered as `name` (`accelerate.tracking`).

    Raises:
        ConfigError: an unknown name, or a known one whose package is not installed.
    """
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
    from accelerate.utils import LoggerType

    if name not in LOGGER_TYPE_TO_CLASS:
        raise ConfigError(
            f"logging.trackers: unknown tracker {name!r}; accelerate knows "
            f"{', '.join(sorted(LOGGER_TYPE_TO_CLASS))}"
        )
    builtin = name in {t.value for t in LoggerType}
    if builtin and LoggerType(name) not in get_available_trackers():
        raise ConfigError(
            f"logging.trackers: {name!r} needs the '{name}' package, which is not installed "
            f"(pip install {name}), or remove it from logging.trackers"
        )
    return LOGGER_TYPE_TO_CLASS[name]


def check_trackers(cfg: Config) -> None:
    """Fails early (before any process-group work) on a tracker that cannot be started.

    Raises:
        ConfigError: as `_tracker_class`.
    """
    for name in cfg.logging.trackers:
        _tracker_class(str(name))


def tracking_kwargs(cfg: Config) -> dict[str, Any]:
    """`Accelerator(**...)` arguments for the trackers: `log_with` and a project configuration
    whose logging folder, `<output>/trackers`, holds the files of trackers that need one
    (TensorBoard, Aim). Empty without `logging.trackers`."""
    from accelerate.utils import ProjectConfiguration

    if not cfg.logging.trackers:
        return {}
    return {
        "log_with": [str(name) for name in cfg.logging.trackers],
        "project_config": ProjectConfiguration(
            project_dir=cfg.output, logging_dir=os.path.join(cfg.output, "trackers")
        ),
    }


def tracker_init_kwargs(cfg: Config) -> dict[str, dict[str, Any]]:
    """`init_kwargs` of `accelerator.init_trackers`: `logging.run_name` (default: the output
    folder's name) and `logging.tags` as W&B's `name`/`tags` and MLflow's `run_name`/`tags`,
    then `logging.init_kwargs[tracker]` over them."""
    log = cfg.logging
    run_name = log.run_name or os.path.basename(os.path.normpath(cfg.output)) or "arcscale"
    derived: dict[str, dict[str, Any]] = {
        "wandb": {"name": run_name, **({"tags": list(log.tags)} if log.tags else {})},
        "mlflow": {
            "run_name": run_name,
            **({"tags": dict.fromkeys(log.tags, "")} if log.tags else {}),
        },
    }
    return {
        str(name): {**derived.get(str(name), {}), **dict(log.init_kwargs.get(str(name), {}))}
        for name in log.trackers
    }


def init_trackers(accelerator: Any, cfg: Config, logger: TrainLogger) -> None:
    """Starts the trackers of `accelerator` (made with `tracking_kwargs`) through
    `accelerator.init_trackers(logging.project, flat config, tracker_init_kwargs(cfg))` and lets
    `logger` send its scalars there. Call on every rank (Accelerate starts them on the main
    process only).

    Raises:
        ConfigError: as `_tracker_class`.
    """
    check_trackers(cfg)
    accelerator.init_trackers(cfg.logging.project, _flat(to_dict(cfg)), tracker_init_kwargs(cfg))
    logger.accelerator = accelerator


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"optim": {"lr": 0.1}}` -> `{"optim.lr": 0.1}`; lists and dicts as strings (trackers
    store hyperparameters of type bool, str, int, float or None only)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and prefix.count(".") < 1:
            out.update(_flat(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, str, int, float)) or value is None:
            out[f"{prefix}{key}"] = value
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


class _Tee:
    """A text stream that writes to `terminal` and to `log` (prefixed per line, flushed per
    line so that the log of a killed run is complete)."""

    def __init__(self, terminal: TextIO, log: Any, prefix: str = "") -> None:
        self.terminal = terminal
        self.log = log
        self.prefix = prefix
        self._line_start = True

    def write(self, text: str) -> int:
        self.terminal.write(text)
        if self.log.closed:  # a handler that kept this stream after the run ended
            return len(text)
        if self.prefix:
            parts = text.split("\n")
            text = "\n".join(
                (self.prefix if (i or self._line_start) and part else "") + part
                for i, part in enumerate(parts)
            )
            self._line_start = text.endswith("\n")
        self.log.write(text)
        if "\n" in text:
            self.log.flush()
        return len(text)

    def flush(self) -> None:
        self.terminal.flush()
        if not self.log.closed:
            self.log.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding: the terminal's
        return getattr(self.terminal, name)


def versions() -> str:
    """One line: Python, torch, DeepSpeed, Accelerate, numpy versions and the host."""
    import importlib.metadata as md

    parts = [f"python {platform.python_version()}"]
    for pkg in ("torch", "deepspeed", "accelerate", "numpy", "nvidia-dali-cuda120"):
        try:
            parts.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            continue
    return ", ".join(parts) + f"; host {platform.node()}"


class _LockedLog:
    """The open log file shared by the Python-level tees and the descriptor copies' threads.

    A child forked while a copy thread held the lock (a loader worker) would wait on it
    forever: children get a fresh lock (`os.register_at_fork`)."""

    _live: weakref.WeakSet[_LockedLog] = weakref.WeakSet()

    def __init__(self, f: IO[str]) -> None:
        self.f = f
        self.lock = threading.Lock()
        _LockedLog._live.add(self)

    @staticmethod
    def _after_fork_in_child() -> None:
        for log in list(_LockedLog._live):
            log.lock = threading.Lock()

    @property
    def closed(self) -> bool:
        return self.f.closed

    def write(self, text: str) -> int:
        with self.lock:
            if self.f.closed:  # a copy thread draining after the run
                return len(text)
            return self.f.write(text)

    def flush(self) -> None:
        with self.lock:
            if not self.f.closed:
                self.f.flush()

    def line(self, text: str) -> None:
        """Writes and flushes one line (the descriptor copies)."""
        self.write(text)
        self.flush()


os.register_at_fork(after_in_child=_LockedLog._after_fork_in_child)


def _tee_stream(name: str, fd: int, log: _LockedLog, prefix: str) -> FdTee:
    """Sends descriptor `fd` (native writes) and `sys.<name>` (Python's) to `log` as well.

    Python text is written to the log directly, in order with the run's other lines; when
    `sys.<name>` is the descriptor's own stream it reaches the terminal through a duplicate of
    the original descriptor, so it does not pass the pipe (and the log) twice."""
    stream = getattr(sys, name)
    stream.flush()
    tee = FdTee(fd, log.line, prefix)
    terminal: Any = stream
    try:
        backed = stream.fileno() == fd
    except (AttributeError, OSError, ValueError):  # e.g. pytest's capsys
        backed = False
    if backed:  # left open: a handler may keep writing to this stream after the run
        terminal = open(  # noqa: SIM115
            os.dup(tee.saved), "w", buffering=1, encoding=stream.encoding, errors=stream.errors
        )
    setattr(sys, name, _Tee(terminal, log, prefix=prefix))
    return tee


@contextmanager
def run_log(cfg: Config, argv: Sequence[str], rank: int, world_size: int) -> Iterator[str]:
    """Keeps the console of a run in `<output>/training.log` (appended: a resumed run adds to it).

    Rank 0 writes a header (date, command line, versions, world size, the config as YAML) and
    then everything written to stdout and stderr; the other ranks add only their stderr, each
    line prefixed with `[rank R]`. The copy is made at the file-descriptor level
    (`trainer.fd_tee`): lines that native code writes (NCCL, c10 warnings, loader workers)
    reach the log too. An exception leaving the block is written there with its traceback,
    then re-raised. Yields the log path.

    Raises:
        OSError: the output folder cannot be created or the log opened.
    """
    import yaml

    os.makedirs(cfg.output, exist_ok=True)
    path = os.path.join(cfg.output, RUN_LOG)
    saved = sys.stdout, sys.stderr
    tees: list[FdTee] = []
    with open(path, "a", encoding="utf-8") as f:
        log = _LockedLog(f)
        if rank == 0:
            now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
            log.write(
                f"===== {now} arcscale run =====\ncommand: {' '.join(argv)}\n"
                f"versions: {versions()}\nworld size: {world_size}\nconfig:\n"
                + "".join(f"  {line}\n" for line in yaml.safe_dump(to_dict(cfg)).splitlines())
            )
            log.flush()
            tees = [_tee_stream("stdout", 1, log, ""), _tee_stream("stderr", 2, log, "")]
        else:
            tees = [_tee_stream("stderr", 2, log, f"[rank {rank}] ")]
        try:
            yield path
        except BaseException as e:
            if not isinstance(e, SystemExit):
                lines = traceback.format_exception(e)
                log.write(
                    "".join(f"[rank {rank}] {line}" for line in "".join(lines).splitlines(True))
                )
            raise
        finally:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            sys.stdout, sys.stderr = saved
            for tee in tees:
                tee.close()
