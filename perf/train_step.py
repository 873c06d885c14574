"""One training step of the trainer, timed by phase, with its peak memory: a benchmark case.

The measurement behind ``benchmarks/bench_train.py`` (the sweep and its table) and
``benchmarks/bench_memory.py`` (the memory planner against real runs); ``perf.isolated`` runs a
case in a fresh process. A ``Case`` (world size 1) builds the engine and head exactly as
training does (`trainer.run.build_engine` / `build_head`: Accelerate + DeepSpeed with the JSON of
`trainer.engine.build_ds_config`) and times ``steps`` calls of the trainer's own
`trainer.step.train_step` after ``warmup`` untimed ones. Each step is cut, synchronize-then-time,
at hooks of the real step into data (loader ``next()`` and the uint8 copy + normalize), backbone
forward, head forward, backward and optimizer (``engine.step`` + head unscale/step).

Peak memory: on GPU ``torch.cuda.max_memory_allocated``; on CPU the peak resident set (``VmHWM``
of ``/proc/self/status``, ``perf.memory_probe``) minus the resident set before the model was
built, reported twice: over the whole case (initialization included) and over the timed steps
only (``VmHWM`` is reset through ``/proc/self/clear_refs`` after the warm-up).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

from perf.memory_probe import reset_peak_rss, status_bytes
from trainer.ports import free_port

__all__ = ["PHASES", "Case", "has_cuda", "run_case"]

PHASES = ("data", "forward", "head", "backward", "optimizer")


@dataclass
class Case:
    """One benchmark configuration (world size 1). `model_kwargs` go to the backbone builder."""

    network: str
    precision: str
    zero_stage: int
    grad_checkpointing: bool = False
    batch_size: int = 8
    steps: int = 3
    warmup: int = 1
    embedding_size: int = 512
    num_classes: int = 10000
    sample_rate: float = 0.3
    optimizer: str = "sgd"
    offload: bool = False
    channels_last: bool = False
    num_workers: int = 0
    model_kwargs: dict = field(default_factory=dict)
    num_subcenters: int = 1

    def label(self) -> str:
        """Short human-readable name of the case, e.g. ``r18 bf16 ZeRO-2 ckpt B=8``."""
        extra = "".join(f" {k}={v}" for k, v in sorted(self.model_kwargs.items()))
        flags = " ckpt" * self.grad_checkpointing + " offload" * self.offload
        flags += " cl" * self.channels_last
        flags += f" S={self.num_subcenters}" * (self.num_subcenters > 1)
        return (
            f"{self.network}{extra} {self.precision} ZeRO-{self.zero_stage}{flags} "
            f"B={self.batch_size}"
        )


def _init_single_process() -> None:
    """A one-rank process group (gloo on CPU, nccl on GPU) unless one already exists."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1)


def _config(case: Case):
    """The trainer's typed Config for `case` (validated, so bad cases fail like the trainer)."""
    from trainer.config import (
        Config,
        DataConfig,
        EngineConfig,
        HeadConfig,
        ModelConfig,
        OptimConfig,
        validate,
    )

    cfg = Config(
        model=ModelConfig(
            case.network, case.embedding_size, case.grad_checkpointing, dict(case.model_kwargs)
        ),
        data=DataConfig(
            kind="synthetic",
            num_classes=case.num_classes,
            num_image=case.batch_size * (case.steps + case.warmup),
            batch_size=case.batch_size,
            num_workers=case.num_workers,
        ),
        head=HeadConfig(sample_rate=case.sample_rate, num_subcenters=case.num_subcenters),
        optim=OptimConfig(optimizer=case.optimizer),
        engine=EngineConfig(
            zero_stage=case.zero_stage,
            precision=case.precision,
            offload=case.offload,
            memory_format="channels_last" if case.channels_last else "contiguous",
        ),
    )
    validate(cfg, "benchmark case")
    return cfg


def run_case(case: Case) -> dict:
    """Runs `case` in this process through the trainer's own set-up and `train_step`.

    The engine and head come from `trainer.run.build_engine` / `build_head` (Accelerate +
    DeepSpeed as in training) and each optimizer step is `trainer.step.train_step`. Phases are
    cut at the step's own boundaries (synchronize, then read the clock): data (loader `next()`
    and the uint8 copy/normalize up to the backbone's forward pre-hook), forward (backbone),
    head (Partial FC forward), backward (up to `engine.step`) and optimizer (`engine.step` and the
    head's unscale/step).

    Returns:
        dict with ``samples_per_s`` (steady state, timed steps only), ``step_ms`` and one
        ``<phase>_ms`` per phase (means over timed steps), ``peak_mb`` (whole case) and
        ``steady_peak_mb`` (timed steps; CPU only, None on GPU), ``memory`` (what was measured),
        ``loss`` (last step), ``params`` (backbone parameter count) and ``device``.

    Raises:
        ValueError / trainer.config.ConfigError: an invalid case (unknown network, stage, ...).
        RuntimeError: a non-finite loss (the numbers would be meaningless).
    """
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not has_cuda() else "cuda")
    import torch

    from trainer.step import train_step

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    _init_single_process()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()
    rss0 = status_bytes("VmRSS")
    run = _build_run(case, torch.device("cuda", 0) if cuda else torch.device("cpu"))
    clock = _PhaseClock(sync, run.engine, run.head)

    init_peak, times = 0, dict.fromkeys(PHASES, 0.0)
    for step in range(case.warmup + case.steps):
        if step == case.warmup:
            sync()
            times = dict.fromkeys(PHASES, 0.0)
            init_peak = status_bytes("VmHWM") - rss0  # build + warm-up
            reset_peak_rss()
        clock.start()
        micro = [next(run.batches)]
        result = train_step(
            run.accelerator,
            run.engine,
            run.head,
            run.head_opt,
            micro,
            run.precision,
            run.device,
            run.memory_format,
        )
        for phase, dt in clock.stop().items():
            times[phase] += dt
        if not result.loss_finite:
            raise RuntimeError(f"benchmark case {case.label()}: loss not finite")

    total = sum(times.values())
    out = {f"{p}_ms": 1000 * times[p] / case.steps for p in PHASES}
    out.update(
        samples_per_s=case.batch_size * case.steps / total,
        step_ms=1000 * total / case.steps,
        loss=result.read(run.engine)["loss"],
        params=sum(p.numel() for p in run.engine.module.parameters()),
        device=str(run.device),
    )
    out.update(_peak_memory(cuda, init_peak, rss0))
    return out


def _build_run(case: Case, device) -> SimpleNamespace:
    """The engine, head and batch iterator of `case`, built as `trainer.run` builds them."""
    import torch

    from data import SyntheticDataset, build_cpu_loader
    from trainer.engine import build_ds_config, create_accelerator, resolve_engine_settings
    from trainer.run import build_engine, build_head

    cfg = _config(case)
    torch.manual_seed(0)
    settings = resolve_engine_settings(cfg, env={})
    ds_config = build_ds_config(cfg, settings)
    accelerator = create_accelerator(cfg, ds_config, settings.precision)
    engine, memory_format = build_engine(cfg, accelerator, ds_config, device, 1, lambda *a: None)
    head, head_opt = build_head(cfg, device, settings.precision)
    loader = build_cpu_loader(
        SyntheticDataset(cfg.data.num_image, case.num_classes, seed=0),
        case.batch_size,
        0,
        1,
        seed=0,
        num_workers=case.num_workers,
        flip=True,
    )
    loader.set_epoch(0)
    return SimpleNamespace(
        accelerator=accelerator,
        engine=engine,
        head=head,
        head_opt=head_opt,
        batches=iter(loader),
        precision=settings.precision,
        device=device,
        memory_format=memory_format,
    )


def _peak_memory(cuda: bool, init_peak: int, rss0: int) -> dict:
    """``peak_mb`` (whole case), ``steady_peak_mb`` (timed steps, CPU only) and what was read."""
    if cuda:
        import torch

        return dict(
            peak_mb=torch.cuda.max_memory_allocated() / 2**20,
            steady_peak_mb=None,
            memory="torch.cuda.max_memory_allocated",
        )
    steady = status_bytes("VmHWM") - rss0
    return dict(
        peak_mb=max(init_peak, steady) / 2**20,
        steady_peak_mb=steady / 2**20,
        memory="VmHWM - VmRSS before build",
    )


class _PhaseClock:
    """Cuts one `train_step` into PHASES at hooks of the real step (benchmark only): the
    backbone's and the head's forward hooks and the engine's `step`, each after a synchronize."""

    def __init__(self, sync, engine, head) -> None:
        self.sync, self.marks = sync, {}
        engine.module.register_forward_pre_hook(lambda *a: self._mark("forward"))
        engine.module.register_forward_hook(lambda *a: self._mark("head"))
        head.register_forward_hook(lambda *a: self._mark("backward"))
        step = engine.step

        def timed_step(*args, **kwargs):
            self._mark("optimizer")
            return step(*args, **kwargs)

        engine.step = timed_step

    def _mark(self, phase: str) -> None:
        self.sync()
        self.marks.setdefault(phase, time.perf_counter())

    def start(self) -> None:
        self.sync()
        self.marks = {"data": time.perf_counter()}

    def stop(self) -> dict:
        """Seconds per phase since `start` (a phase whose mark is missing gets 0)."""
        self.sync()
        end, out = time.perf_counter(), {}
        bounds = [self.marks.get(p) for p in PHASES] + [end]
        for i, phase in enumerate(PHASES):
            if bounds[i] is None:
                out[phase] = 0.0
                continue
            nxt = next(b for b in bounds[i + 1 :] if b is not None)
            out[phase] = nxt - bounds[i]
        return out


def has_cuda() -> bool:
    """Whether torch sees a CUDA device (imports torch on first use)."""
    import torch

    return torch.cuda.is_available()
