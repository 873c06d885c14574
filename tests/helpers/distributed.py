"""Run a function on N fresh CPU processes joined in a gloo group; collect results or errors.

Usage (``fn`` must be importable, i.e. defined at module level)::

    results = run_distributed(fn, world_size=2, args=(x,))   # [fn(0, 2, x), fn(1, 2, x)]

Workers start from a fork server (``multiprocessing`` "forkserver" context, torch preloaded), so
they are fresh processes without the parent's state or threads, and cheap to start. Each worker
joins ``torch.distributed`` (gloo, TCP on a free localhost port), runs
``fn(rank, world_size, *args)`` and sends back its return value serialized with ``torch.save``
(tensors, dicts, lists, numbers). A worker's exception is re-raised in the parent as
``DistributedError`` with the rank and the worker's traceback. Workers use one intra-op thread
each so N processes share the 2-core test machines without oversubscription.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import time
import traceback

import torch

from trainer.ports import free_port

__all__ = ["run_distributed", "DistributedError"]


class DistributedError(RuntimeError):
    """A worker raised, exited without a result, or the run timed out."""


def _worker(rank, world_size, port, fn, args, results, env):
    import torch.distributed as dist

    os.environ.update(env)
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
        )
        out = fn(rank, world_size, *args)
        buf = io.BytesIO()
        torch.save(out, buf)
        results.put((rank, True, buf.getvalue()))
    except BaseException:  # everything goes back to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _collect(procs, results, world_size, timeout):
    outputs: dict[int, object] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    while len(outputs) + len(errors) < world_size:
        try:
            rank, ok, payload = results.get(timeout=1.0)
        except queue.Empty:
            silent = [r for r in range(world_size) if r not in outputs]
            dead = [r for r in silent if not procs[r].is_alive()]
            if dead and results.empty():
                codes = {r: procs[r].exitcode for r in dead}
                raise DistributedError(
                    f"tests/helpers/distributed.py: ranks {dead} exited without a result "
                    f"(exit codes {codes})"
                ) from None
            if time.monotonic() > deadline:
                raise DistributedError(
                    f"tests/helpers/distributed.py: ranks {silent} gave no result within {timeout}s"
                ) from None
            continue
        if ok:
            outputs[rank] = torch.load(io.BytesIO(payload), weights_only=False)
        else:
            errors[rank] = payload
            break  # the other ranks are probably blocked in a collective
    return outputs, errors


def run_distributed(fn, world_size: int, args: tuple = (), timeout: float = 120.0, env=None):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo processes.

    Args:
        fn: module-level callable (pickled by reference into the workers).
        world_size: number of processes (>= 1).
        args: extra positional arguments, picklable.
        timeout: seconds to wait for all results.
        env: extra environment variables for the workers (``DS_ACCELERATOR=cpu`` and
            ``OMP_NUM_THREADS=1`` are always set).

    Returns:
        list of the ``world_size`` return values, indexed by rank.

    Raises:
        ValueError: ``world_size`` < 1.
        DistributedError: a worker raised (the failing rank's traceback is in the message),
            died without reporting, or the run exceeded ``timeout``.
    """
    if world_size < 1:
        raise ValueError(f"tests/helpers/distributed.py: world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("forkserver")
    # The fork server imports torch once per test session; each worker then forks from it in
    # milliseconds instead of paying a fresh interpreter + torch import (seconds) per rank.
    ctx.set_forkserver_preload(["torch", "torch.distributed"])
    results = ctx.Queue()
    port = free_port()
    # CPU ranks even on a GPU host: hide CUDA so torch agrees with DS_ACCELERATOR=cpu.
    worker_env = {
        "DS_ACCELERATOR": "cpu",
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    procs = [
        ctx.Process(
            target=_worker, args=(r, world_size, port, fn, args, results, worker_env), daemon=True
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    errors: dict[int, str] = {}
    try:
        outputs, errors = _collect(procs, results, world_size, timeout)
    finally:
        for p in procs:
            p.join(timeout=0.5 if errors else 10)
        for p in procs:  # only the workers started above
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        rank = min(errors)
        raise DistributedError(f"rank {rank} of {world_size} failed:\n{errors[rank]}")
    return [outputs[r] for r in range(world_size)]
