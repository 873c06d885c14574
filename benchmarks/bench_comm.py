"""Communication per training step, before and after issue 28 item 9: bytes and gloo time.

    python -m benchmarks.bench_comm [--network r50] [--batch 128] [--dim 512] [--reps 5]

Two CPU processes join one gloo group (this host) and time, on the same tensors, each path the
training step takes through the network (median of ``--reps`` after one warm-up, the slower rank):

- head forward: the old path gathered ``x.float()`` then, separately, the int64 labels (two
  collectives, fp32 on the wire); ``heads.comm.gather_batch`` gathers the bf16 embeddings with
  the labels' bytes appended to each row (one collective, half the embedding bytes).
- head backward: the old path all-reduced the whole ``(N, D)`` fp32 embedding gradient; the new
  one reduce-scatters it (each rank receives only its rows, still fp32: see ``gather_batch``).
- backbone gradients (ZeRO-1/2, fp32 on the wire as ``communication_data_type`` says): the
  network's P gradients all-reduced in buckets of ``reduce_bucket_size`` elements, 5e7 (before)
  and ``ds_configs/zero2_bf16.json``'s (after). With ``overlap_comm`` a bucket is reduced as
  soon as the backward has filled it, so only the last bucket waits after the backward
  ("exposed" = one full bucket's time, an upper bound for the last one, assuming the backward
  that fills a bucket takes at least as long as reducing the one before); one bucket exposes
  all of it.

Bytes are what one rank sends per step under ring algorithms (NCCL's and gloo's): an all-gather
or a reduce-scatter of a ``T``-byte result sends ``(W-1)/W * T``, an all-reduce ``2 (W-1)/W * T``.
Gloo on one CPU host is far slower than NCCL, so the milliseconds compare paths with each
other, not with a GPU; the bytes and collective counts carry over.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD_BUCKET = 50_000_000  # reduce_bucket_size of ds_configs/*.json before issue 28


def ring_bytes(op: str, result_bytes: int, world: int) -> int:
    """Bytes one rank sends for a ring collective whose full result is ``result_bytes``."""
    share = (world - 1) * result_bytes // world
    return 2 * share if op == "all_reduce" else share


def _timed(fn: Callable[[], object], reps: int) -> float:
    """Median seconds of ``fn`` over ``reps`` runs after one warm-up, the slowest rank's."""
    fn()
    times = []
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    t = torch.tensor([statistics.median(times)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _head_rows(rank: int, world: int, batch: int, dim: int, reps: int) -> list[dict]:
    from heads.comm import gather_batch, resolve_group

    topo, sizes, n = resolve_group(), [batch] * world, batch * world
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(batch, dim, generator=g).bfloat16()
    labels = torch.randint(0, 10**6, (batch,), generator=g)
    grad = torch.randn(n, dim, generator=g)

    def old_forward() -> None:
        emb = [torch.empty(batch, dim) for _ in range(world)]
        dist.all_gather(emb, x.float())
        lab = [torch.empty_like(labels) for _ in range(world)]
        dist.all_gather(lab, labels)
        torch.cat(emb), torch.cat(lab)

    def new_forward() -> None:
        with torch.no_grad():
            gather_batch(x, labels, topo, sizes)

    def old_backward() -> None:
        dist.all_reduce(grad.clone())

    def new_backward() -> None:  # what gather_batch's backward runs
        dist.reduce_scatter_single(torch.empty(batch, dim), grad)

    e, lab = n * dim, n * 8  # embedding elements, label bytes
    paths = [  # (what, when, collectives, collective, bytes of its result, fn)
        ("head fwd: gather fp32 x + labels", "before", 2, "all_gather", e * 4 + lab, old_forward),
        ("head fwd: 1 gather, bf16 x + labels", "after", 1, "all_gather", e * 2 + lab, new_forward),
        ("head bwd: all-reduce (N, D) fp32", "before", 1, "all_reduce", e * 4, old_backward),
        ("head bwd: reduce-scatter (N, D) fp32", "after", 1, "reduce_scatter", e * 4, new_backward),
    ]  # fmt: skip
    return [
        _row(what, when, count, ring_bytes(op, size, world), _timed(fn, reps))
        for what, when, count, op, size, fn in paths
    ]


def _bucket_rows(world: int, params: int, new_bucket: int, reps: int) -> list[dict]:
    rows = []
    for label, bucket in (("before", OLD_BUCKET), ("after", new_bucket)):
        sizes = [min(bucket, params - i) for i in range(0, params, bucket)]
        buffers = [torch.ones(s) for s in sizes]  # fp32: communication_data_type
        total = _timed(lambda bufs=buffers: [dist.all_reduce(b) for b in bufs], reps)
        one = _timed(lambda bufs=buffers: dist.all_reduce(bufs[0]), reps)  # a full bucket
        row = _row(
            f"backbone grads: buckets of {bucket:.0e}",
            label,
            len(sizes),
            ring_bytes("all_reduce", params * 4, world),
            total,
        )
        row["exposed_ms"] = 1e3 * (total if len(sizes) == 1 else one)
        rows.append(row)
    return rows


def _row(what: str, when: str, collectives: int, sent: int, seconds: float) -> dict:
    return {
        "what": what,
        "when": when,
        "collectives": collectives,
        "mb_sent": sent / 1e6,
        "ms": 1e3 * seconds,
    }


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        rows = _head_rows(rank, world, args.batch, args.dim, args.reps)
        rows += _bucket_rows(world, args.params, args.bucket, args.reps)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(rows, f)
    finally:
        dist.destroy_process_group()


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(
        f"gloo, W=2 CPU processes; head: N = {args.batch} x 2 rows, D = {args.dim}; backbone: "
        f"{args.network} P = {args.params / 1e6:.2f}M gradients"
    )
    print("| path | when | collectives | MB sent/rank | ms (gloo) | exposed ms | after/before |")
    print("|---|---|---|---|---|---|---|")
    for i, r in enumerate(rows):
        before = rows[i - 1] if r["when"] == "after" else None
        ratio = ""
        if before is not None:
            ratio = f"bytes x{r['mb_sent'] / before['mb_sent']:.2f}, "
            ratio += f"ms x{r['ms'] / before['ms']:.2f}"
            if "exposed_ms" in r:
                ratio += f", exposed x{r['exposed_ms'] / before['exposed_ms']:.2f}"
        exposed = f"{r['exposed_ms']:.1f}" if "exposed_ms" in r else ""
        print(
            f"| {r['what']} | {r['when']} | {r['collectives']} | {r['mb_sent']:.2f} | "
            f"{r['ms']:.2f} | {exposed} | {ratio} |"
        )


def main(argv: list[str] | None = None) -> None:
    import tempfile

    import models
    from trainer.ports import free_port

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--network", default="r50")
    p.add_argument("--batch", type=int, default=128, help="per-rank batch")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    net = models.create(args.network, embedding_size=args.dim)
    args.params = sum(t.numel() for t in net.parameters())
    with open(os.path.join(REPO, "ds_configs", "zero2_bf16.json")) as f:
        args.bucket = int(json.load(f)["zero_optimization"]["reduce_bucket_size"])
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.spawn(_worker, args=(2, free_port(), args, out), nprocs=2)
        with open(out) as f:
            rows = json.load(f)
    print_table(rows, args)


if __name__ == "__main__":
    main()
