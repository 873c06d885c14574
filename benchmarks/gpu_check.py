"""One-shot GPU readiness check (issue 13): what the CPU tests cannot show, in one command.

    python benchmarks/gpu_check.py [--out work_dirs/gpu_check.json]   # one GPU, <= 8 minutes
    python benchmarks/gpu_check.py --cpu [--out ...]                  # tiny sizes on CPU (CI)

Each case runs in its own process (world size 1, the trainer's own set-up: `create_accelerator`,
`trainer.run.build_engine` / `build_head`, `trainer.step.train_step`; NCCL on GPU, gloo with
--cpu) and reports rows:

- host_syncs: `torch.cuda.set_sync_debug_mode` around steady-state r18 + Partial FC bf16 steps,
  one of them a logging step (`StepResult.read`). "error" mode stops at the first sync, so the
  check runs in "warn" mode, records every synchronizing call with its source line, and fails
  when the project's own code syncs more than 2 times per step (DeepSpeed's are listed apart).
- bn_stats_fp32: every BatchNorm running statistic is fp32 after those bf16 steps, and moved.
- r50_bf16, vit_b_bf16: samples/s and peak device memory against `trainer.memory_plan.plan`.
- r50_plain_pytorch: the same r50 step as a plain PyTorch loop (torch.autocast bf16, dense
  nn.Linear head, torch SGD, no DeepSpeed) in the r50 process; `ratio` = ours / plain samples/s.
- dali_mixed: DALI `mixed` (nvJPEG) decode images/s on a generated `.rec` (GPU only).

Prints a table and writes JSON (`{"mode", "device", "rows": {name: {...}}, "ok"}`); exit 1 when
a check fails. Speed rows are measurements, never pass/fail. With --cpu the GPU-only rows are
present with status "skipped".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = (
    "host_syncs",
    "bn_stats_fp32",
    "r50_bf16",
    "r50_plain_pytorch",
    "vit_b_bf16",
    "dali_mixed",
)
CASES = {"r18_pfc": ROWS[:2], "r50": ROWS[2:4], "vit_b": ROWS[4:5], "dali": ROWS[5:]}
ALLOWED_SYNCS_PER_STEP = 2  # the replicated finite-loss check + the logging read
# GPU: arcface_torch-like sizes that fit one GPU; CPU: seconds per case on 2 cores.
SIZES = {
    "gpu": dict(
        batch=128,
        classes=100_000,
        rate=0.2,
        dim=512,
        warmup=5,
        steps=20,
        sync_steps=5,
        dali_images=2048,
    ),
    "cpu": dict(
        batch=4, classes=64, rate=0.5, dim=32, warmup=1, steps=2, sync_steps=2, dali_images=64
    ),
}
MODEL_KWARGS = {
    "gpu": {"r18": {}, "r50": {}, "vit_b": {}},
    "cpu": {
        "r18": {"base_width": 4},
        "r50": {"base_width": 4},
        "vit_b": {"embed_dim": 32, "depth": 2, "num_heads": 2},
    },
}


# -- one case, in its own process ---------------------------------------------------------------
def _init_process(cpu: bool) -> None:
    from trainer.ports import free_port

    os.environ.update(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1"
    )
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    if cpu:
        os.environ["DS_ACCELERATOR"] = "cpu"


def _trainer(network: str, size: dict, kwargs: dict):
    """The trainer's engine, head and step for `network` in bf16 ZeRO-2, world size 1."""
    from trainer.config import load_config
    from trainer.engine import (
        build_ds_config,
        create_accelerator,
        dist_info,
        resolve_engine_settings,
    )
    from trainer.run import build_engine, build_head
    from trainer.step import train_step

    cfg = load_config(
        None,
        [
            "data.kind=synthetic",
            f"data.num_classes={size['classes']}",
            f"data.num_image={size['batch'] * 64}",
            f"data.batch_size={size['batch']}",
            f"model.network={network}",
            f"model.embedding_size={size['dim']}",
            f"model.kwargs={json.dumps(kwargs)}",
            f"head.sample_rate={size['rate']}",
            "engine.precision=bf16",
            "engine.zero_stage=2",
            "optim.lr=0.01",
        ],
    )
    settings = resolve_engine_settings(cfg, env={})
    ds_config = build_ds_config(cfg, settings)
    accelerator = create_accelerator(cfg, ds_config, "bf16")
    device = dist_info().device
    engine, memory_format = build_engine(cfg, accelerator, ds_config, device, 1, _quiet)
    head, head_opt = build_head(cfg, device, "bf16")
    batches = _batches(size, device)

    def step(i: int):
        return train_step(
            accelerator,
            engine,
            head,
            head_opt,
            [batches[i % len(batches)]],
            "bf16",
            device,
            memory_format=memory_format,
        )

    step.accelerator = accelerator  # to release the engine (`free_memory`) after timing
    return engine, device, step, memory_format


def _quiet(*args, **kwargs) -> None:
    pass


def _batches(size: dict, device) -> list:
    """Four uint8 (B, 112, 112, 3) batches as the CPU loader hands them (pinned on CUDA)."""
    import torch

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(4):
        images = torch.randint(0, 256, (size["batch"], 112, 112, 3), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, size["classes"], (size["batch"],), generator=g)
        if device.type == "cuda":
            images, labels = images.pin_memory(), labels.pin_memory()
        out.append((images, labels))
    return out


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device) -> float:
    """Peak allocated device memory (CUDA), else the process' peak RSS, in GiB."""
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _time_steps(step, device, size: dict, batch: int) -> tuple[float, object]:
    """Samples/s over `size["steps"]` steps after `size["warmup"]`; the last is a logging step."""
    for i in range(size["warmup"]):
        step(i)
    _sync(device)
    t0 = time.perf_counter()
    result = None
    for i in range(size["steps"]):
        result = step(i)
    result = result.read() if hasattr(result, "read") else result
    _sync(device)
    return size["steps"] * batch / (time.perf_counter() - t0), result


def case_r18_pfc(size: dict, kwargs: dict) -> dict:
    import warnings

    import torch

    engine, device, step, _ = _trainer("r18", size, kwargs["r18"])
    for i in range(size["warmup"]):
        step(i)
    rows = {}
    if device.type == "cuda":
        _sync(device)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for i in range(size["sync_steps"]):
                    result = step(i)
                result.read(engine)  # one logging step
        finally:
            torch.cuda.set_sync_debug_mode(0)
        syncs = [
            f"{os.path.relpath(w.filename, REPO)}:{w.lineno}"
            for w in caught
            if "synchroniz" in str(w.message)
        ]
        ours = [s for s in syncs if not s.startswith("..") and "site-packages" not in s]
        per_step = len(ours) / size["sync_steps"]
        where: dict = {}
        for loc in syncs:
            where[loc] = where.get(loc, 0) + 1
        rows["host_syncs"] = {
            "status": "ok" if per_step <= ALLOWED_SYNCS_PER_STEP else "FAIL",
            "all_locations": where,  # a backward's syncs show at the backward() call line
            "ours_per_step": per_step,
            "allowed_per_step": ALLOWED_SYNCS_PER_STEP,
            "ours": sorted(set(ours)),
            "deepspeed_and_torch_per_step": (len(syncs) - len(ours)) / size["sync_steps"],
            "steps": size["sync_steps"],
        }
    else:
        for i in range(size["sync_steps"]):
            step(i)
        rows["host_syncs"] = {"status": "skipped", "why": "CUDA sync debug mode needs a GPU"}
    bns = [
        m for m in engine.module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    ]
    dtypes = sorted({str(b.dtype) for m in bns for b in (m.running_mean, m.running_var)})
    moved = all(float(m.running_mean.abs().sum()) > 0 for m in bns)
    weight = str(next(engine.module.parameters()).dtype)
    rows["bn_stats_fp32"] = {
        "status": "ok" if dtypes == ["torch.float32"] and moved else "FAIL",
        "running_stat_dtypes": dtypes,
        "moved": moved,
        "param_dtype": weight,
        "layers": len(bns),
    }
    return rows


def _speed_row(network: str, size: dict, kwargs: dict) -> tuple[dict, object]:
    import torch

    from trainer.memory_plan import plan

    engine, device, step, memory_format = _trainer(network, size, kwargs)
    _reset_peak(device)
    samples_s, read = _time_steps(step, device, size, size["batch"])
    measured = _peak_gib(device)
    predicted = (
        plan(
            network=network,
            embedding_size=size["dim"],
            num_classes=size["classes"],
            sample_rate=size["rate"],
            batch_size=size["batch"],
            world_size=1,
            zero_stage=2,
            precision="bf16",
            optimizer="sgd",
            model_kwargs=kwargs,
        )["device_total"]
        / 2**30
    )
    row = {
        "status": "ok" if torch.isfinite(torch.tensor(read["loss"])) else "FAIL",
        "samples_per_s": samples_s,
        "peak_gib": measured,
        "peak_what": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "host RSS",
        "predicted_gib": predicted,
        "measured_over_predicted": measured / predicted if predicted else None,
        "batch": size["batch"],
        "loss": read["loss"],
    }
    step.accelerator.free_memory()  # the plain loop after it runs without the engine's memory
    del engine, step
    return row, (device, memory_format)


def _plain_r50(size: dict, kwargs: dict, device, memory_format) -> dict:
    """The r50 step as a plain loop: autocast bf16, dense nn.Linear head, torch SGD."""
    import torch
    import torch.nn.functional as F

    import models
    from trainer.device_batch import to_device

    torch.manual_seed(0)
    model = models.create("r50", embedding_size=size["dim"], **kwargs).to(device)
    fc = torch.nn.Linear(size["dim"], size["classes"], bias=False).to(device)
    params = list(model.parameters()) + list(fc.parameters())
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
    batches = _batches(size, device)

    def step(i: int):
        images, labels = batches[i % len(batches)]
        x = to_device(images, device, torch.float32, memory_format)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = fc(F.normalize(model(x))) * 64.0
        loss = F.cross_entropy(logits.float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    _reset_peak(device)
    samples_s, loss = _time_steps(step, device, size, size["batch"])
    return {
        "status": "ok",
        "samples_per_s": samples_s,
        "peak_gib": _peak_gib(device),
        "loss": float(loss),
        "batch": size["batch"],
        "head": f"dense nn.Linear({size['dim']}, {size['classes']})",
    }


def case_r50(size: dict, kwargs: dict) -> dict:
    ours, (device, memory_format) = _speed_row("r50", size, kwargs["r50"])
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    plain = _plain_r50(size, kwargs["r50"], device, memory_format)
    plain["ratio_ours_over_plain"] = ours["samples_per_s"] / plain["samples_per_s"]
    ours["ratio_over_plain"] = plain["ratio_ours_over_plain"]
    return {"r50_bf16": ours, "r50_plain_pytorch": plain}


def case_vit_b(size: dict, kwargs: dict) -> dict:
    row, _ = _speed_row("vit_b", size, kwargs["vit_b"])
    return {"vit_b_bf16": row}


def case_dali(size: dict, kwargs: dict) -> dict:
    """DALI `mixed` (nvJPEG) decode images/s on generated 112x112 JPEGs of aligned-face size.
    Without CUDA the same code runs DALI's CPU decoder and the row says "skipped"."""
    import numpy as np
    import torch
    from PIL import Image

    from data.dali_loader import build_dali_loader
    from data.pack_rec import convert
    from perf.loader_speed import measure

    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        samples = []
        for i in range(size["dali_images"]):  # smooth random images: face-like JPEG sizes
            small = rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)
            path = os.path.join(tmp, f"{i}.jpg")
            Image.fromarray(small).resize((112, 112), Image.BILINEAR).save(path, quality=95)
            samples.append((path, i % 256))
        convert(samples, os.path.join(tmp, "rec"), insightface_header=True, progress=False)
        rec = os.path.join(tmp, "rec", "train.rec")
        loader = build_dali_loader(
            rec, None, size["batch"], 0, 1, seed=0, device_id=0 if cuda else None, num_threads=4
        )
        loader.set_epoch(0)
        m = measure(loader, len(loader) - 1)
    row = {"images_per_s": m["img_per_s"], "startup_s": m["startup_s"], "images": m["images"]}
    if cuda:
        return {"dali_mixed": {"status": "ok", "batch": size["batch"], **row}}
    why = f"mixed decode needs a GPU; DALI's CPU decoder ran: {m['img_per_s']:.0f} img/s"
    return {"dali_mixed": {"status": "skipped", "why": why, "decode": "cpu", **row}}


# -- the command: one process per case, then the table -------------------------------------------
def _all(case: str, **row) -> dict:
    return {name: dict(row) for name in CASES[case]}


def _run_case(name: str, cpu: bool, timeout: float) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if cpu:
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    else:
        env.pop("DS_ACCELERATOR", None)  # DeepSpeed detects CUDA itself
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--case", name, "--rows", out]
        cmd += ["--cpu"] if cpu else []
        try:
            proc = subprocess.run(
                cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return _all(name, status="FAIL", why=f"timed out after {timeout:.0f} s")
        if proc.returncode != 0 or not os.path.isfile(out):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            why = f"case {name} exited {proc.returncode}: " + " | ".join(tail)
            return _all(name, status="FAIL", why=why[-1500:])
        with open(out) as f:
            return json.load(f)


def _cell(row: dict) -> str:
    keys = [
        ("ours_per_step", "{:.1f} syncs/step"),
        ("running_stat_dtypes", "{}"),
        ("samples_per_s", "{:.1f} samples/s"),
        ("images_per_s", "{:.0f} img/s"),
        ("peak_gib", "peak {:.2f} GiB"),
        ("predicted_gib", "plan {:.2f} GiB"),
        ("ratio_over_plain", "x{:.2f} of plain"),
        ("ratio_ours_over_plain", "ours x{:.2f}"),
        ("why", "{}"),
    ]
    return ", ".join(fmt.format(row[k]) for k, fmt in keys if row.get(k) is not None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="tiny sizes on CPU over gloo (CI)")
    p.add_argument("--out", default=os.path.join(REPO, "work_dirs", "gpu_check.json"))
    p.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)
    p.add_argument("--rows", help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=110.0, help="seconds per case")
    args = p.parse_args(argv)
    mode = "cpu" if args.cpu else "gpu"
    if args.case:  # child: one case, rows to --rows
        _init_process(args.cpu)
        fn = globals()[f"case_{args.case}"]
        rows = fn(SIZES[mode], MODEL_KWARGS[mode])
        with open(args.rows, "w") as f:
            json.dump(rows, f)
        return 0

    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --cpu for the CI mode)", file=sys.stderr)
        return 2
    device = "cpu" if args.cpu else torch.cuda.get_device_name(0)
    t0 = time.perf_counter()
    rows: dict = {}
    for name in CASES:
        rows.update(_run_case(name, args.cpu, args.timeout))
    ok = all(rows[r]["status"] != "FAIL" for r in ROWS)
    report = {"mode": mode, "device": device, "seconds": time.perf_counter() - t0, "rows": rows}
    report["ok"] = ok
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"| check ({mode}: {device}) | status | result |\n|---|---|---|")
    for r in ROWS:
        print(f"| {r} | {rows[r]['status']} | {_cell(rows[r])} |")
    print(f"{'all checks passed' if ok else 'FAILED'} in {report['seconds']:.0f} s; {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
