"""Speed and memory of the Partial FC head vs a plain full-softmax head, world size 1.

For each class count C, one forward + backward + optimizer step is timed for
- ``reference``: ``nn.Linear(D, C)`` centers, normalized logits, the same ``CombinedMarginLoss``
  (ArcFace 64/0.5), ``F.cross_entropy`` and ``torch.optim.SGD`` (momentum 0.9, wd 5e-4);
- ``PartialFC`` with each ``--sample-rates`` value and the sparse-row ``HeadOptimizer`` (same SGD),
on the same inputs in the same process. Each PartialFC row also times its three GEMMs alone
(forward ``(N, D) x (D, K)``, grad-input ``(N, K) x (K, D)``, grad-weight ``(K, N) x (N, D)``,
in the head's logits dtype, K = its sampled classes) in the same run: ``gemm ms`` and
``step/gemm``, the head's overhead over its unavoidable arithmetic. Memory is the peak above
the level measured just before the head was built, so it includes centers, optimizer state,
gradients and activations: on CPU
from the process RSS sampled every millisecond by a thread (Linux ``/proc``), on GPU from
``torch.cuda.max_memory_allocated``. Ratios are against the reference (lower is better).

    python -m benchmarks.bench_head --classes 100000 1000000 --iters 3
    python -m benchmarks.bench_head --device cuda --classes 1000000 10000000
    python -m benchmarks.bench_head --classes 1000000 --sample-rates 0.1 --no-reference
    python -m benchmarks.bench_head --smoke
    python -m benchmarks.bench_head --classes 1000000 --sample-rates 0.1 --no-reference \
        --loss cosface arcface curricularface elasticface_arc adaface magface

With ``--loss`` (names of ``heads.LOSSES``) one PartialFC head per rate is stepped with each loss
in turn (``interleaved_seconds``: fastest of ``--iters`` rounds, memory not measured), and
``x cosface`` is each loss's step time over CosFace's on the same head (issue #16's goal:
<= 1.3). ``--subcenters 1 3`` times one head per value of K (Sub-center ArcFace: K rows per
class, so K times the sampled rows and GEMM work), one after the other, each with every loss in
turn; ``x cosface`` is then against CosFace with the first K at the same classes. With
``--same-rows`` the head with K sub-centers gets ``C // K`` classes instead, so every head holds
and samples the same number of rows (the sub-center max and its backward are then the only
extra work):

    python -m benchmarks.bench_head --classes 1000000 --sample-rates 0.1 --no-reference \
        --loss cosface arcface --subcenters 1 3 [--same-rows]
"""

from __future__ import annotations

import argparse
import gc
import os
import threading
import time

import torch
import torch.nn.functional as F

from heads import LOSSES, CombinedMarginLoss, PartialFC, build_head_optimizer, build_margin
from heads.fused import FUSED_MODES, resolve_fused

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakMemory:
    """Peak memory above the level at ``__enter__``, in bytes (``.peak`` after exit)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        self.base = rss_bytes()
        self._high = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._high = max(self._high, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._high, rss_bytes()) - self.base
        return False


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_reference(num_classes, dim, margin, device):
    fc = torch.nn.Linear(dim, num_classes, bias=False, device=device)
    torch.nn.init.normal_(fc.weight, 0.0, 0.01)
    opt = torch.optim.SGD(fc.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

    def step(x, y):
        logits = margin(F.linear(F.normalize(x), F.normalize(fc.weight)), y)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, (fc, opt)


def build_partial_fc(
    num_classes,
    dim,
    margin,
    device,
    sample_rate,
    logits_dtype="fp32",
    num_subcenters=1,
    fused=False,
):
    head = PartialFC(
        dim,
        num_classes,
        sample_rate,
        margin,
        logits_dtype=logits_dtype,
        num_subcenters=num_subcenters,
        fused=fused,
    ).to(device)
    opt = build_head_optimizer(head, "sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)

    def step(x, y):
        loss, _ = head(x, y)
        loss.backward()
        opt.unscale_()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    return step, (head, opt)


def gemm_seconds(n, k, dim, dtype, iters, device):
    """Mean seconds of the head's three GEMMs alone (one warm-up) at N=n, K=k, D=dim."""
    g = torch.Generator().manual_seed(1)
    e = torch.randn(n, dim, generator=g).to(device, dtype)
    w = torch.randn(k, dim, generator=g).to(device, dtype)
    gl = torch.randn(n, k, generator=g).to(device, dtype)

    def run():
        e @ w.t()  # forward logits
        gl @ w  # grad-input
        gl.t() @ e  # grad-weight

    run()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        run()
    sync(device)
    return (time.perf_counter() - t0) / iters


def measure(builder, x, y, iters, device):
    """Mean seconds per step (after one warm-up step) and peak memory in bytes."""
    with PeakMemory(device) as mem:
        step, keep = builder()
        step(x, y)  # warm-up: allocates optimizer state, first-call overheads
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            step(x, y)
        sync(device)
        seconds = (time.perf_counter() - t0) / iters
        del step, keep
    gc.collect()
    return seconds, mem.peak


def interleaved_seconds(
    num_classes, rate, losses, x, y, args, device, num_subcenters=1
) -> dict[str, float]:
    """Seconds per step of one head under each margin loss: the losses take turns on the same
    head (its ``margin_loss`` swapped), one step each per round, and each keeps its fastest of
    ``args.iters`` rounds after a warm-up round, so load spikes from other processes on a shared
    machine hit every loss alike instead of biasing the ratio."""
    step, keep = build_partial_fc(
        num_classes,
        args.dim,
        losses["cosface"],
        device,
        rate,
        args.logits_dtype,
        num_subcenters,
        fused=args.fused,
    )
    head = keep[0]
    best = {name: float("inf") for name in losses}
    for round_ in range(args.iters + 1):
        for name, margin in losses.items():
            head.margin_loss = margin
            sync(device)
            t0 = time.perf_counter()
            step(x, y)
            sync(device)
            if round_ > 0:
                best[name] = min(best[name], time.perf_counter() - t0)
    return best


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--classes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--sample-rates", type=float, nargs="+", default=[1.0, 0.3, 0.1])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--logits-dtype", default="fp32", choices=["fp32", "tf32", "bf16"])
    p.add_argument(
        "--no-reference", action="store_true", help="skip the full-softmax reference (slow)"
    )
    p.add_argument(
        "--loss",
        nargs="+",
        choices=list(LOSSES),
        help="time the head with these losses (CosFace added first); default ArcFace only",
    )
    p.add_argument(
        "--kernels",
        default="auto",
        choices=FUSED_MODES,
        help="row passes of the head step: compiled (heads/fused.py) or eager; auto = compiled "
        "on CUDA only. The warm-up step of each configuration pays the compile",
    )
    p.add_argument(
        "--subcenters",
        type=int,
        nargs="+",
        default=[1],
        help="with --loss: sub-centers per class, one head per value (Sub-center ArcFace)",
    )
    p.add_argument(
        "--same-rows",
        action="store_true",
        help="with --subcenters: K sub-centers get C // K classes (same rows for every head)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one iteration (CI)")
    args = p.parse_args(argv)
    args.fused = resolve_fused(args.kernels, args.device)
    if args.smoke:
        args.classes, args.batch, args.dim, args.iters = [2000], 16, 32, 1
    return args


def print_table(rows: list[dict], args, device: torch.device) -> None:
    """The result table: one line per (classes, head, rate[, loss]) row of ``main``."""
    header = (
        f"{'classes':>10} {'head':>10} {'rate':>5} {'ms/step':>9} {'peak MiB':>9} "
        f"{'time x':>7} {'mem x':>6} {'gemm ms':>8} {'step/gemm':>9}"
        + (f" {'loss':>20} {'x cosface':>9}" if args.loss else "")
    )
    print(
        f"device={device} batch={args.batch} dim={args.dim} iters={args.iters} world_size=1 "
        f"logits={args.logits_dtype} fused={args.fused}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['C']:>10} {r['impl']:>10} {r['rate']:>5.2f} {r['s'] * 1e3:>9.1f} "
            f"{r['mem'] / 2**20:>9.1f} {r['t_ratio']:>7.2f} {r['m_ratio']:>6.2f} "
            f"{r.get('gemm', float('nan')) * 1e3:>8.1f} "
            f"{r['s'] / r.get('gemm', float('nan')):>9.2f}"
            + (
                f" {r.get('loss', ''):>20} {r.get('vs_cosface', float('nan')):>9.2f}"
                if args.loss
                else ""
            )
        )


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    margin = CombinedMarginLoss(64.0, 1.0, 0.5, 0.0)
    losses = {"arcface": margin}
    if args.loss:
        names = ["cosface"] + [n for n in args.loss if n != "cosface"]
        losses = {n: build_margin(n, 64.0) for n in names}
    rows = []
    # Library start-up (thread pools, kernels) must not be billed to the first configuration.
    wx, wy = torch.randn(4, args.dim).to(device).requires_grad_(True), torch.arange(4).to(device)
    measure(lambda: build_reference(100, args.dim, margin, device), wx, wy, 1, device)
    measure(lambda: build_partial_fc(100, args.dim, margin, device, 0.5), wx, wy, 1, device)
    for num_classes in args.classes:
        g = torch.Generator().manual_seed(0)
        # The embeddings come from the backbone: their gradient (the grad-input GEMM) is part
        # of every training step, as in the three GEMMs the step is compared against.
        x = torch.randn(args.batch, args.dim, generator=g).to(device).requires_grad_(True)
        y = torch.randint(0, num_classes, (args.batch,), generator=g).to(device)
        ref_s = ref_mem = float("nan")
        if not args.no_reference:
            ref_s, ref_mem = measure(
                lambda c=num_classes: build_reference(c, args.dim, margin, device),
                x,
                y,
                args.iters,
                device,
            )
            rows.append(dict(C=num_classes, impl="reference", rate=1.0, s=ref_s, mem=ref_mem))
        for rate in args.sample_rates:
            k = min(num_classes, max(int(rate * num_classes), args.batch))
            dtype = torch.bfloat16 if args.logits_dtype == "bf16" else torch.float32
            gemm = gemm_seconds(args.batch, k, args.dim, dtype, args.iters, device)
            if args.loss:
                base = None  # CosFace with the first K
                for sub in args.subcenters:
                    c = num_classes // sub if args.same_rows else num_classes
                    times = interleaved_seconds(c, rate, losses, x, y % c, args, device, sub)
                    base = base or times["cosface"]
                    k_rows = sub * min(c, max(int(rate * c), args.batch))
                    gemm_k = gemm_seconds(args.batch, k_rows, args.dim, dtype, args.iters, device)
                    for name, sec in times.items():
                        label = name if sub == 1 else f"{name} K={sub}"
                        row = dict(C=c, impl="PartialFC", rate=rate, s=sec)
                        row |= {"mem": float("nan"), "gemm": gemm_k, "loss": label}
                        rows.append(row | {"vs_cosface": sec / base})
                continue
            s, mem = measure(
                lambda c=num_classes, r=rate: build_partial_fc(
                    c, args.dim, margin, device, r, args.logits_dtype, fused=args.fused
                ),
                x,
                y,
                args.iters,
                device,
            )
            rows.append(dict(C=num_classes, impl="PartialFC", rate=rate, s=s, mem=mem, gemm=gemm))
        for r in rows:
            if r["C"] == num_classes or "t_ratio" not in r:  # (C // K with --same-rows)
                r["t_ratio"], r["m_ratio"] = r["s"] / ref_s, r["mem"] / max(ref_mem, 1)
    print_table(rows, args, device)
    return rows


if __name__ == "__main__":
    main()
