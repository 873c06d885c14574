"""Backbone step time eager vs `engine.compile` (torch.compile), same process, same input.

    python benchmarks/bench_compile.py [--networks r18,mbf] [--batch 8] [--steps 5]
        [--precision fp32|bf16|fp16] [--model-kwargs '{"base_width": 16}'] [--checkpointing]

For each network one seeded backbone is built, prepared as `trainer.engine.prepare_backbone`
prepares it before DeepSpeed (CPU BatchNorm forwards, the fp32 tail under bf16/fp16, parameters
cast to the engine dtype as DeepSpeed casts them), copied, and the copy compiled the way
`engine.compile()` compiles it (`module.compile(backend=<DeepSpeed accelerator's backend>)`).
A step is forward + backward of `embedding.float().pow(2).mean()` on one fixed batch (the
backbone's share of a training step; the head and the optimizer are not compiled). The first
compiled step (graph capture + code generation) is reported apart; then eager and compiled steps
alternate, `--steps` each, and the table gives median times and their ratio (eager / compiled:
> 1 means compile is faster), with the largest embedding and gradient difference as a check.
Speed only, never pass/fail.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch

import models
from trainer.engine import keep_batchnorm_stats_fp32
from trainer.precision import DTYPES, keep_tail_fp32

__all__ = ["main", "measure"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(net: torch.nn.Module, x: torch.Tensor) -> float:
    """One forward + backward; returns seconds (device synchronized)."""
    _sync(x.device)
    t0 = time.perf_counter()
    net(x).float().pow(2).mean().backward()
    _sync(x.device)
    return time.perf_counter() - t0


def _prepare(network: str, kwargs: dict, precision: str, device: torch.device, ckpt: bool):
    torch.manual_seed(0)
    net = models.create(network, **kwargs)
    net.set_grad_checkpointing(ckpt)
    keep_batchnorm_stats_fp32(net, device)
    if precision != "fp32":
        keep_tail_fp32(net)
    for p in net.parameters():  # DeepSpeed's cast: parameters only, buffers stay fp32
        p.data = p.data.to(device, DTYPES[precision])
    return net.to(device)


def measure(
    network: str,
    batch: int,
    steps: int,
    precision: str = "fp32",
    kwargs: dict | None = None,
    ckpt: bool = False,
) -> dict:
    """Eager and compiled step times of one backbone on one fixed batch (see module docstring).

    Returns:
        ``eager_ms``, ``compiled_ms`` (medians), ``ratio`` (eager / compiled), ``compile_s``
        (first compiled step), ``max_diff_emb`` and ``max_diff_grad`` (compiled vs eager after
        the same number of steps; float).
    """
    from deepspeed.accelerator import get_accelerator

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    eager = _prepare(network, kwargs or {}, precision, device, ckpt)
    compiled = copy.deepcopy(eager)
    compiled.compile(backend=get_accelerator().get_compile_backend())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 112, 112, generator=g).to(device, DTYPES[precision])
    compile_s = _step(compiled, x)
    _step(eager, x)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(steps):
        times["eager"].append(_step(eager, x))
        times["compiled"].append(_step(compiled, x))
    with torch.no_grad():
        diff_emb = float((eager(x).float() - compiled(x).float()).abs().max())
    pairs = zip(eager.parameters(), compiled.parameters())
    diff_grad = max(
        float((a.grad.float() - b.grad.float()).abs().max()) for a, b in pairs if a.grad is not None
    )
    e_ms = 1e3 * statistics.median(times["eager"])
    c_ms = 1e3 * statistics.median(times["compiled"])
    return {
        "eager_ms": e_ms,
        "compiled_ms": c_ms,
        "ratio": e_ms / c_ms,
        "compile_s": compile_s,
        "max_diff_emb": diff_emb,
        "max_diff_grad": diff_grad,
    }


def main(argv: list[str] | None = None) -> int:
    """Measures every network and prints one markdown table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--networks", default="r18,mbf", help="comma list of models.list_models()")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed steps per mode")
    p.add_argument("--precision", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--model-kwargs", default="", help="JSON, e.g. '{\"base_width\": 16}'")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing on")
    p.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1:
        p.error("--steps and --batch must be >= 1")
    kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    rows = []
    for net in [n.strip() for n in args.networks.split(",") if n.strip()]:
        print(f"[bench_compile] {net} ...", file=sys.stderr, flush=True)
        r = measure(net, args.batch, args.steps, args.precision, kwargs, args.checkpointing)
        rows.append({"network": net, **r})
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(
        f"Backbone forward+backward, eager vs torch.compile, {where}, torch {torch.__version__}, "
        f"{args.precision}, batch {args.batch}, {torch.get_num_threads()} threads, "
        f"checkpointing {'on' if args.checkpointing else 'off'}, kwargs {kwargs or '-'}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(
        "| network | eager ms | compiled ms | eager/compiled | first compiled step s |"
        " max diff emb | max diff grad |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['network']} | {r['eager_ms']:.0f} | {r['compiled_ms']:.0f} | "
            f"{r['ratio']:.2f} | {r['compile_s']:.0f} | {r['max_diff_emb']:.1e} | "
            f"{r['max_diff_grad']:.1e} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
