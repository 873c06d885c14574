"""The cases of ``benchmarks/gpu_check.py``: shipped recipes run through the trainer's own set-up.

Each case function runs in a fresh process (the command starts one per case) and returns rows
``{name: {"status": "ok" | "FAIL" | "skipped", ...}}``. Every training case builds its run with
``trainer.run.build_run`` (Accelerate + DeepSpeed from the recipe's JSON, the head, the CPU
loader behind ``DevicePrefetcher``, ``cudnn.benchmark`` and TF32 exactly as training sets them)
from a shipped recipe under ``configs/`` with the data switched to synthetic images (or a
``.rec`` written here), and steps it with ``trainer.step.train_step``. On CUDA each case then
runs a few steps under ``perf.sync_probe.SyncProbe``. Sizes: ``SIZES[mode]``; with ``cpu`` the
backbones are narrowed (``TINY``) so that CI runs every path in seconds.
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

from perf.sync_probe import SyncProbe, kernel_verdict, summarize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {
    "gpu": dict(batch=128, classes=100_000, warmup=5, steps=20, sync_steps=3, images=2048),
    "quick": dict(batch=128, classes=100_000, warmup=3, steps=8, sync_steps=2, images=1024),
    "cpu": dict(batch=4, classes=64, warmup=1, steps=2, sync_steps=1, images=48),
}
TINY = {  # CPU mode: narrow backbones, same code paths
    "r18": {"base_width": 4},
    "r50": {"base_width": 4},
    "vit_b": {"embed_dim": 32, "depth": 2, "num_heads": 2},
    "vit_l": {"embed_dim": 32, "depth": 2, "num_heads": 2},
}


def init_process(cpu: bool) -> None:
    """World size 1 environment of a launcher, before anything imports DeepSpeed."""
    from trainer.ports import free_port

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    os.environ.update(MASTER_ADDR="127.0.0.1", ACCELERATE_USE_DEEPSPEED="true")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    if cpu:
        os.environ["DS_ACCELERATOR"] = "cpu"


def build(recipe: str | None, network: str, mode: str, out: str, extra: list[str]) -> Any:
    """``trainer.run.build_run`` of ``recipe`` (a file under configs/, None: the defaults) on
    synthetic data; ``step()`` runs one optimizer step (``gradient_acc`` micro-batches)."""
    from trainer.config import load_config
    from trainer.engine import build_ds_config, resolve_engine_settings
    from trainer.run import build_run

    size = SIZES[mode]
    overrides = [
        "data.kind=synthetic",
        "data.rec=",
        f"data.num_classes={size['classes']}",
        f"data.num_image={size['images']}",
        f"data.batch_size={size['batch']}",
        f"model.network={network}",
        "eval.val_targets=[]",
        "logging.tensorboard=false",
        "logging.progress_bar=false",
        f"output={out}",
    ]
    if mode == "cpu":
        overrides += [f"model.kwargs={json.dumps(TINY[network])}", "data.num_workers=0"]
    path = None if recipe is None else os.path.join(REPO, "configs", recipe)
    cfg = load_config(path, overrides + extra)
    settings = resolve_engine_settings(cfg, env={})
    ds_config = build_ds_config(cfg, settings)
    if mode == "cpu" and settings.precision == "fp16":
        from deepspeed.accelerator import get_accelerator

        # DeepSpeed's CPU accelerator refuses fp16 without oneDNN fp16 kernels; torch's fp16
        # CPU ops run, so the loss-scale path runs here too (tests/helpers/train_step.py).
        get_accelerator().is_fp16_supported = lambda: True
    run = build_run(cfg, settings, ds_config)
    b = SimpleNamespace(run=run, cfg=cfg, settings=settings, gas=cfg.optim.gradient_acc, size=size)
    return build_steps(b)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: Any) -> float:
    """Peak allocated device memory (CUDA), else the process' peak RSS, in GiB."""
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def time_steps(
    step: Callable[[], Any], device: Any, size: dict, per_step: int
) -> tuple[float, Any]:
    """Samples/s over ``size["steps"]`` steps after ``size["warmup"]``, and the last result."""
    result = None
    for _ in range(size["warmup"]):
        result = step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(size["steps"]):
        result = step()
    _sync(device)
    return size["steps"] * per_step / (time.perf_counter() - t0), result


def sync_row(b: Any) -> dict:
    """Host syncs of ``sync_steps`` steady steps (the last one a logging step), attributed;
    allowed: one per micro-batch (the finite-loss check) + one logging read."""
    device = b.run.device
    if device.type != "cuda":
        for _ in range(b.size["sync_steps"]):
            b.step()
        return {"status": "skipped", "why": "CUDA sync debug mode needs a GPU"}
    _sync(device)
    with SyncProbe(REPO) as probe:
        for _ in range(b.size["sync_steps"]):
            result = b.step()
        result.read(b.run.engine)
    return summarize(probe.records, b.size["sync_steps"], b.gas + 1.0)


def speed_row(b: Any, network: str, extra: dict | None = None) -> dict:
    """Samples/s, peak memory, loss, the engine's settings and the syncs of one built run."""
    import torch

    device = b.run.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    per_step = b.size["batch"] * b.gas
    samples_s, result = time_steps(b.step, device, b.size, per_step)
    read = result.read(b.run.engine)
    row = {
        "status": "ok"
        if result.loss_finite and torch.isfinite(torch.tensor(read["loss"]))
        else "FAIL",
        "samples_per_s": samples_s,
        "peak_gib": _peak_gib(device),
        "loss": read["loss"],
        "loss_scale": read["loss_scale"],
        "recipe": f"{network} {b.settings.precision} ZeRO-{b.settings.zero_stage}, "
        f"{b.cfg.optim.optimizer}, gradient_acc {b.gas}, "
        f"checkpointing {b.cfg.model.grad_checkpointing}",
        "logits_dtype": b.run.head.logits_dtype,
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        **(extra or {}),
    }
    row["predicted_gib"] = _planned_gib(b)
    row["syncs"] = sync_row(b)
    if row["syncs"]["status"] == "FAIL":
        row["status"], row["why"] = (
            "FAIL",
            f"{row['syncs']['ours_per_step']:.1f} syncs/step from our code",
        )
    return row


def _planned_gib(b: Any) -> float:
    """``trainer.memory_plan.plan``'s peak for the run's sizes (compare with ``peak_gib``)."""
    from trainer.memory_plan import plan

    c = b.cfg
    predicted = plan(
        network=c.model.network, embedding_size=c.model.embedding_size,
        num_classes=c.data.num_classes, sample_rate=c.head.sample_rate,
        batch_size=c.data.batch_size, world_size=1, zero_stage=b.settings.zero_stage,
        precision=b.settings.precision, optimizer=c.optim.optimizer,
        grad_checkpointing=c.model.grad_checkpointing, model_kwargs=c.model.kwargs,
    )  # fmt: skip
    return float(predicted["device_total"]) / 2**30


def free(b: Any) -> None:
    """Release a run's engine before the next one is built in this process."""
    import torch

    b.run.accelerator.free_memory()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- the cases ------------------------------------------------------------------------------
def case_default(mode: str, out: str) -> dict:
    """The defaults on r18, bf16 ZeRO-2: attributed syncs, BatchNorm statistics dtype,
    cudnn.benchmark as the trainer sets it, the compiled head kernels (FAIL when eager)."""
    import warnings

    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        b = build(None, "r18", mode, out, ["engine.precision=bf16", "engine.zero_stage=2"])
        time_steps(b.step, b.run.device, {**b.size, "steps": 1}, 1)
    rows = {"host_syncs": sync_row(b)}
    bns = [
        m
        for m in b.run.engine.module.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    ]
    dtypes = sorted({str(t.dtype) for m in bns for t in (m.running_mean, m.running_var)})
    moved = all(float(m.running_mean.abs().sum()) > 0 for m in bns)
    rows["bn_stats_fp32"] = {
        "status": "ok" if dtypes == ["torch.float32"] and moved else "FAIL",
        "running_stat_dtypes": dtypes,
        "moved": moved,
        "param_dtype": str(next(b.run.engine.module.parameters()).dtype),
    }
    cuda = b.run.device.type == "cuda"
    rows["cudnn_benchmark"] = {
        "status": ("ok" if torch.backends.cudnn.benchmark else "FAIL") if cuda else "skipped",
        "set": bool(torch.backends.cudnn.benchmark),
        "set_by": "trainer.run.build_run (CUDA only)",
    }
    if cuda:
        from heads import fused

        kernels = {
            k.fn.__name__: (k.compiled is not None, k.failed) for k in (fused._RADIAL, fused._SGD)
        }
        fallbacks = [str(w.message) for w in caught if "torch.compile of" in str(w.message)]
        rows["head_kernels"] = kernel_verdict(b.run.head.fused, kernels, fallbacks)
    else:
        rows["head_kernels"] = {"status": "skipped", "why": "head.kernels auto = eager on CPU"}
    return rows


def case_r50(mode: str, out: str) -> dict:
    """r50 bf16 ZeRO-2 and the same step in plain PyTorch with the same head and loader."""
    b = build(None, "r50", mode, out, ["engine.precision=bf16", "engine.zero_stage=2"])
    ours = speed_row(b, "r50")
    free(b)
    plain = plain_pytorch(b, "r50", mode)
    plain["ratio_ours_over_plain"] = ours["samples_per_s"] / plain["samples_per_s"]
    ours["ratio_over_plain"] = plain["ratio_ours_over_plain"]
    return {"r50_bf16_zero2": ours, "r50_plain_pytorch": plain}


def plain_pytorch(b: Any, network: str, mode: str) -> dict:
    """The step as a plain loop on the same batches: torch.autocast bf16 backbone, torch SGD,
    and the same Partial FC head and head optimizer (built from the same config)."""
    import torch

    import models
    from trainer.run import build_head, micro_batches

    device, size = b.run.device, b.size
    torch.manual_seed(0)
    kwargs = TINY[network] if mode == "cpu" else {}
    model = models.create(network, embedding_size=b.cfg.model.embedding_size, **kwargs).to(device)
    model = model.to(memory_format=b.run.memory_format)  # the engine's (trainer/memory_format.py)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    head, head_opt = build_head(b.cfg, device, "bf16")
    head.fix_batch_size(size["batch"])
    batches = micro_batches(b.run.loader)

    def step() -> Any:
        images, labels = next(batches)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            emb = model(images.float())
        loss, _ = head(emb, labels, validate=False)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        head_opt.step(finite=head_opt.unscale_(loss_scale=1.0, blocking=False))
        head_opt.zero_grad()
        return loss.detach()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    samples_s, loss = time_steps(step, device, size, size["batch"])
    return {
        "status": "ok",
        "samples_per_s": samples_s,
        "peak_gib": _peak_gib(device),
        "loss": float(loss),
        "what": "autocast bf16 + torch SGD; same PartialFC head, HeadOptimizer, loader",
    }


def case_fp16(mode: str, out: str) -> dict:
    """configs/ms1mv3_r50.yaml: fp16 ZeRO-1 (dynamic loss scale; the head's logits in TF32)."""
    b = build("ms1mv3_r50.yaml", "r50", mode, out, [])
    row = speed_row(b, "r50")
    want = "tf32" if b.run.device.type == "cuda" else "fp32"
    if row["status"] == "ok" and (b.settings.precision != "fp16" or row["logits_dtype"] != want):
        row.update(
            status="FAIL", why=f"precision {b.settings.precision}, logits {row['logits_dtype']}"
        )
    return {"r50_fp16_zero1": row}


def case_vit_b(mode: str, out: str) -> dict:
    """configs/wf42m_pfc03_vit_b.yaml: ViT-B, AdamW, bf16 ZeRO-2, gradient_acc 3."""
    b = build("wf42m_pfc03_vit_b.yaml", "vit_b", mode, out, [])
    row = speed_row(b, "vit_b", {"optimizer": type(b.run.engine.optimizer).__name__})
    return {"vit_b_adamw_zero2": row}


def case_vit_l(mode: str, out: str) -> dict:
    """configs/wf42m_pfc02_vit_l_zero3.yaml: ViT-L, AdamW, bf16 ZeRO-3 + checkpointing."""
    b = build("wf42m_pfc02_vit_l_zero3.yaml", "vit_l", mode, out, [])
    return {"vit_l_zero3_ckpt": speed_row(b, "vit_l")}


def write_rec(folder: str, count: int) -> str:
    """``count`` smooth random 112x112 JPEGs (aligned-face file sizes), 16 classes, packed as
    an insightface ``.rec`` in ``folder``; returns the folder."""
    import numpy as np
    from PIL import Image

    from data.pack_rec import convert

    rng = np.random.default_rng(0)
    samples = []
    for i in range(count):
        small = rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)
        path = os.path.join(folder, f"{i}.jpg")
        Image.fromarray(small).resize((112, 112), Image.BILINEAR).save(path, quality=95)
        samples.append((path, i % 16))
    convert(samples, os.path.join(folder, "rec"), insightface_header=True, progress=False)
    return os.path.join(folder, "rec")


def case_input(mode: str, out: str) -> dict:
    """r50 bf16 ZeRO-2 fed by the real input path from a ``.rec`` written here: the CPU loader
    (JPEG decode in ``data.num_workers: auto`` workers) behind ``DevicePrefetcher``, then DALI
    built by the trainer (``data.dali: true``, ``mixed`` decode on CUDA), against pre-made
    pinned uint8 batches (no decode) in the same process."""
    from trainer.data_setup import resolve_num_workers
    from trainer.device_batch import DevicePrefetcher

    with tempfile.TemporaryDirectory() as tmp:
        rec = write_rec(tmp, SIZES[mode]["images"])
        data = ["data.kind=rec", f"data.rec={rec}", "data.num_classes=16"]
        b = build(None, "r50", mode, out, ["engine.precision=bf16", "engine.zero_stage=2", *data])
        run, per = b.run, b.size["batch"]
        cpu_s, _ = time_steps(b.step, run.device, b.size, per)
        workers = resolve_num_workers(b.cfg.data.num_workers)
        rows = {"input_cpu_loader": {"status": "ok", "samples_per_s": cpu_s, "workers": workers}}
        it = iter(run.loader.loader)  # the CPU loader's own uint8 host batches
        host = [next(it) for _ in range(2)]
        del it
        if run.device.type == "cuda":
            host = [(x.pin_memory(), y.pin_memory()) for x, y in host]
        run.loader = DevicePrefetcher(_Cycle(host), run.device, run.dtype, run.memory_format)
        b = build_steps(b)
        synth_s, _ = time_steps(b.step, run.device, b.size, per)
        rows["input_dali"] = _dali_row(b, rec, synth_s)
    rows["input_cpu_loader"]["over_pinned_batches"] = cpu_s / synth_s
    rows["input_pinned_batches"] = {"status": "ok", "samples_per_s": synth_s}
    return rows


def _dali_row(b: Any, rec: str, synth_s: float) -> dict[str, Any]:
    """Steps of ``b``'s run fed by DALI as the trainer builds it (``data.dali: true``; on CPU,
    where the trainer keeps its CPU loader, the same DALI loader with DALI's CPU decoder)."""
    import torch

    from trainer.data_setup import build_dataset, build_loader
    from trainer.device_batch import DevicePrefetcher

    run, per = b.run, b.size["batch"]
    cfg = replace(b.cfg, data=replace(b.cfg.data, dali=True))
    try:
        if run.device.type == "cuda":
            dali = build_loader(cfg, build_dataset(cfg), 0, 1, run.device)  # the trainer's branch
        else:
            from data.dali_loader import build_dali_loader

            dali = build_dali_loader(f"{rec}/train.rec", None, per, 0, 1, cfg.seed, num_threads=1)
    except ImportError as e:
        return {"status": "FAIL", "why": str(e)}
    run.loader = DevicePrefetcher(dali, run.device, run.dtype, run.memory_format)
    b = build_steps(b)
    dali_s, _ = time_steps(b.step, run.device, b.size, per)
    row = {
        "status": "ok",
        "samples_per_s": dali_s,
        "over_pinned_batches": dali_s / synth_s,
        "decode": "mixed (nvJPEG)" if run.device.type == "cuda" else "cpu",
        "loader": type(dali).__name__,
        "hand_over": "uint8 NHWC, normalized in the step's dtype on the device",
    }
    if not torch.isfinite(torch.tensor(b.step().read(run.engine)["loss"])):
        row.update(status="FAIL", why="loss not finite on DALI batches")
    return row


class _Cycle:
    """A loader protocol stand-in that repeats a few host batches (no decode)."""

    def __init__(self, batches: list) -> None:
        self.batches, self.epoch = batches, 0

    def __len__(self) -> int:
        return 10**6

    def __iter__(self) -> Any:
        while True:
            yield from self.batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": 0}

    def load_state_dict(self, state: dict[str, int]) -> None:
        pass


def build_steps(b: Any) -> Any:
    """``b`` with ``step`` re-bound to the current ``b.run.loader``."""
    from trainer.run import micro_batches
    from trainer.step import train_step

    batches, run = micro_batches(b.run.loader), b.run

    def step() -> Any:
        micro = [next(batches) for _ in range(b.gas)]
        return train_step(
            run.accelerator, run.engine, run.head, run.head_opt, micro,
            b.settings.precision, run.device, run.memory_format,
        )  # fmt: skip

    b.step = step
    return b


CASES: dict[str, tuple[Callable[[str, str], dict], tuple[str, ...]]] = {
    "default": (case_default, ("host_syncs", "bn_stats_fp32", "cudnn_benchmark", "head_kernels")),
    "r50": (case_r50, ("r50_bf16_zero2", "r50_plain_pytorch")),
    "fp16": (case_fp16, ("r50_fp16_zero1",)),
    "vit_b": (case_vit_b, ("vit_b_adamw_zero2",)),
    "vit_l": (case_vit_l, ("vit_l_zero3_ckpt",)),
    "input": (case_input, ("input_pinned_batches", "input_cpu_loader", "input_dali")),
}
ROWS = tuple(row for _, rows in CASES.values() for row in rows)
