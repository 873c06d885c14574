"""Training-step throughput and peak memory on synthetic data, one process (world size 1).

    python benchmarks/bench_train.py [--networks mbf,r18] [--precisions bf16,fp32]
        [--stages 1,2,3] [--checkpointing off,on] [--batch 8] [--steps 3] [--warmup 1]
        [--channels-last] [--smoke] [--json out.json]

Every case builds the engine and head exactly as training does (`trainer.run.build_engine` /
`build_head`: Accelerate + DeepSpeed with the JSON of `trainer.engine.build_ds_config`) and times
``--steps`` calls of the trainer's own `trainer.step.train_step` after ``--warmup`` untimed ones.
Each step is cut, synchronize-then-time, at hooks of the real step into data (loader ``next()``
and the uint8 copy + normalize), backbone forward, head forward, backward and optimizer
(``engine.step`` + head unscale/step). By default each case runs in a fresh subprocess, which
isolates its peak memory and DeepSpeed's global state.

Peak memory: on GPU ``torch.cuda.max_memory_allocated``; on CPU the peak resident set (``VmHWM``
of ``/proc/self/status``) minus the resident set before the model was built, reported twice:
over the whole case (initialization included) and over the timed steps only (``VmHWM`` is reset
through ``/proc/self/clear_refs`` after the warm-up). Speed and memory only, never pass/fail.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace

from benchmarks.memory_probe import reset_peak_rss, status_bytes
from trainer.ports import free_port

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

__all__ = [
    "PUBLISHED",
    "Case",
    "default_cases",
    "format_table",
    "main",
    "run_case",
    "run_isolated",
]

# insightface arcface_torch docs/speed_benchmark.md and README (8x V100 32GB, fp16): published,
# not measured here. (setting, samples/s, MB per GPU or "" when not published)
PUBLISHED = [
    ("r50, 1.4M ids, data parallel (8x V100)", 1672, 32252),
    ("r50, 1.4M ids, model parallel (8x V100)", 3043, 11178),
    ("r50, 1.4M ids, Partial FC 0.1 (8x V100)", 4738, 6056),
    ("r50, 29M ids, Partial FC 0.1 (8x V100)", 1855, 32324),
    ("r50, multi-host, batch 128 x 32 GPUs", 17000, ""),
    ("ViT-B, multi-host, batch 384 x 64 GPUs", 13800, ""),
]
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


# -- one case -----------------------------------------------------------------------------------
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
    validate(cfg, "benchmarks/bench_train.py case")
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
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
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
            raise RuntimeError(f"benchmarks/bench_train.py: {case.label()}: loss not finite")

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


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _subprocess_env() -> dict:
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/arcscale/torch_extensions"))
    # A fixed mmap threshold makes glibc return large freed blocks to the OS, so RSS follows
    # live tensors instead of keeping every freed buffer in the heap.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_isolated(case: Case, timeout_s: float = 1800) -> dict:
    """Runs `case` in a fresh Python process (see module docstring) and returns its result.

    On CPU the subprocess also reports ``peak_mb``: the peak RSS over the whole case, including
    DeepSpeed initialization. A failed case returns ``{"error": message}`` (never dropped).
    """
    cmd = [sys.executable, os.path.abspath(__file__), "--case-json", json.dumps(asdict(case))]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout_s, env=_subprocess_env()
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}


def _child(case_json: str) -> int:
    """Subprocess side of `run_isolated`: run one case, print ``RESULT <json>``."""
    result = run_case(Case(**json.loads(case_json)))
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# -- case lists, table, command line ------------------------------------------------------------
def default_cases(cuda: bool) -> dict:
    """Default sweep: CPU mbf/r18 x bf16/fp32 x ZeRO 1-3 x checkpointing off/on at batch 8;
    GPU r50/r100/vit_b x fp16/bf16 x ZeRO 1-3 at batch 128."""
    if cuda:
        return dict(networks="r50,r100,vit_b", precisions="fp16,bf16", batch=128)
    return dict(networks="mbf,r18", precisions="bf16,fp32", batch=8)


def _csv(text: str, kind=str, name: str = "") -> list:
    try:
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise SystemExit(f"benchmarks/bench_train.py: --{name}: {e}") from e
    if not values:
        raise SystemExit(f"benchmarks/bench_train.py: --{name} is empty")
    return values


def build_cases(args: argparse.Namespace, cuda: bool) -> list[Case]:
    """Cartesian product of the command-line lists (or the single `--smoke` case)."""
    common = dict(
        steps=args.steps,
        warmup=args.warmup,
        embedding_size=args.embedding_size,
        num_classes=args.num_classes,
        sample_rate=args.sample_rate,
        optimizer=args.optimizer,
        channels_last=args.channels_last,
        num_workers=args.workers,
    )
    if args.smoke:
        common.update(steps=2, warmup=1, embedding_size=64, num_classes=1000)
        return [Case("r18", "fp32", 2, False, 4, model_kwargs={"base_width": 8}, **common)]
    defaults = default_cases(cuda)
    ckpt_names = {"off": False, "on": True}
    ckpts = _csv(args.checkpointing, str, "checkpointing")
    bad = [c for c in ckpts if c not in ckpt_names]
    if bad:
        raise SystemExit(f"benchmarks/bench_train.py: --checkpointing: {bad} not in off,on")
    kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    return [
        Case(
            net,
            prec,
            stage,
            ckpt_names[ck],
            args.batch or defaults["batch"],
            model_kwargs=kwargs,
            **common,
        )  # fmt: skip
        for net in _csv(args.networks or defaults["networks"], str, "networks")
        for prec in _csv(args.precisions or defaults["precisions"], str, "precisions")
        for stage in _csv(args.stages, int, "stages")
        for ck in ckpts
    ]


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def format_table(rows: list[tuple[Case, dict]]) -> str:
    """Markdown table of measured cases; a failed case shows its error in place of numbers."""
    head = ["case", "samples/s", "step ms"] + [f"{p} ms" for p in PHASES]
    head += ["peak MB", "steady peak MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case, r in rows:
        if "error" in r:
            lines.append(f"| {case.label()} | failed: {r['error']} |" + " |" * (len(head) - 2))
            continue
        cells = [case.label(), _fmt(r["samples_per_s"], 2), _fmt(r["step_ms"], 0)]
        cells += [_fmt(r[f"{p}_ms"], 0) for p in PHASES]
        cells += [_fmt(r["peak_mb"], 0), _fmt(r["steady_peak_mb"], 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_published() -> str:
    """The arcface_torch reference numbers, labelled as published (not measured here)."""
    lines = [
        "Published by insightface arcface_torch (docs/speed_benchmark.md, fp16; NOT measured "
        "here):",
        "| setting | samples/s | MB per GPU |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {sps:,} | {f'{mb:,}' if mb else '-'} |" for name, sps, mb in PUBLISHED]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--networks", default="", help="comma list (default: CPU mbf,r18; GPU r50,...)")
    p.add_argument("--precisions", default="", help="comma list of fp32,fp16,bf16")
    p.add_argument("--stages", default="1,2,3", help="ZeRO stages, comma list")
    p.add_argument("--checkpointing", default="off,on", help="activation checkpointing: off,on")
    p.add_argument("--batch", type=int, default=0, help="per-device batch (default CPU 8, GPU 128)")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    p.add_argument("--embedding-size", type=int, default=512)
    p.add_argument("--num-classes", type=int, default=10000)
    p.add_argument("--sample-rate", type=float, default=0.3)
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"))
    p.add_argument("--model-kwargs", default="", help="JSON, e.g. '{\"base_width\": 16}'")
    p.add_argument("--workers", type=int, default=0, help="loader worker processes")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--smoke", action="store_true", help="one tiny case, 2 steps (CI)")
    p.add_argument("--in-process", action="store_true", help="no subprocess per case")
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    p.add_argument("--case-json", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    """Runs the sweep and prints the table; exit status 1 when any case failed."""
    args = parse_args(argv)
    if args.case_json:
        return _child(args.case_json)
    cuda = _has_cuda()
    rows = []
    for case in build_cases(args, cuda):
        print(f"[bench_train] {case.label()} ...", file=sys.stderr, flush=True)
        if args.in_process:
            try:
                result = run_case(case)
            except Exception as e:  # a failed case is a row, not a crash of the sweep
                result = {"error": f"{type(e).__name__}: {e}"}
        else:
            result = run_isolated(case)
        rows.append((case, result))
    import torch

    where = f"GPU {torch.cuda.get_device_name()}" if cuda else "CPU"
    print(
        f"Training step, world size 1, synthetic data, torch {torch.__version__}, deepspeed "
        f"{importlib.metadata.version('deepspeed')}, {where}, "
        f"{torch.get_num_threads()} threads, load average "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())} at the end"
    )
    print(format_table(rows))
    print()
    print(format_published())
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"case": asdict(c), "result": r} for c, r in rows], f, indent=1)
    return 1 if any("error" in r for _, r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
