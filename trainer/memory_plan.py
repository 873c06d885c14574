"""Per-device memory model of backbone (DeepSpeed ZeRO) + Partial FC head training.

Used by ``tools/plan_memory.py`` (the command line) and ``benchmarks/bench_memory.py`` (predicted
vs measured).

Model (bytes per device; P backbone parameters, b = 2 for fp16/bf16 and 4 for fp32, W ranks,
B per-device batch, N = B*W gathered rows, n = ceil(C/W) classes of the largest shard, K sampled
centers of that shard = max(int(sample_rate*n), expected positives N/W), at most n):

- backbone weights: b*P working copy (/W at ZeRO-3) + fp32 master 4*P (/W at ZeRO >= 1; ZeRO
  keeps an fp32 partition even in fp32 training; stage 0 fp32 has none);
- gradients: b*P (/W at ZeRO >= 2) + the fp32 gradient partition 4*P/W built at the step;
- optimizer state: SGD momentum 4*P, AdamW 8*P (/W at ZeRO >= 1);
- ZeRO buffers: the contiguous-gradient bucket min(5e7, P)*b at ZeRO >= 2 (+ the ZeRO-3 prefetch
  bucket);
- `--offload` moves master weights, fp32 gradients and optimizer state (and the ZeRO-3 working
  weights) to host memory;
- activations: the saved tensors of one forward, measured once on CPU at batch 2 with
  ``torch.autograd.graph.saved_tensors_hooks`` (parameters excluded, fp32 sizes scaled by b/4),
  times B, plus a backward workspace of twice the largest saved tensor. With checkpointing:
  tensors saved outside checkpointed units + the units' inputs + the largest unit (recomputed);
- head: centers 4*n*D, optimizer state (momentum 4*n*D or AdamW 8*n*D + step 8*n), the sampled
  rows (copy, normalized copy, gradient: 3*4*K*D; 2* when sample_rate = 1 shares storage) and
  the logits: cosines + softmax buffer that becomes the gradient in place 2*4*N*K, plus the
  gathered embeddings 2*4*N*D. With S sub-centers per class (Sub-center ArcFace,
  ``heads/subcenter.py``) every class holds S rows (n and K rows become n*S and K*S) and the
  logits are the GEMM's 4*N*K*S, its per-class maxima and the softmax buffer 2*4*N*K, and the
  uint8 arg-max N*K.

Items are tagged by when they are alive: persistent (weights, state, gradients), backward
(activations, buckets, head rows and logits) or step (the fp32 gradient partition; the head
optimizer's gathered rows: gradient, weight, momentum and update temporaries, 4*4*K*D for SGD,
7*4*K*D for AdamW). The predicted peak is persistent + max(backward, step).

The largest `num_classes` that fits `--device-memory-gb` (GiB) is solved from the linear
dependence on C. Memory the model leaves out: the CUDA context (~0.5 GiB, outside
``max_memory_allocated``), allocator fragmentation, NCCL buffers, transient ZeRO-3 gathers of
large layers. See docs/benchmarks.md for measured accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypedDict

import torch
from torch import nn

from trainer.precision import DTYPES

__all__ = ["PRECISION_BYTES", "OPTIMIZER_STATES", "measure_activations", "plan",
           "max_num_classes"]  # fmt: skip

PRECISION_BYTES = {name: dtype.itemsize for name, dtype in DTYPES.items()}
OPTIMIZER_STATES = {"sgd": 1, "adamw": 2}  # fp32 tensors per parameter
BUCKET_ELEMENTS = 50_000_000  # reduce/prefetch bucket size of ds_configs/*.json
GIB = 2**30
PHASES = ("persistent", "backward", "step")
HEAD_STEP_COPIES = {"sgd": 4, "adamw": 7}  # (K, D) fp32 tensors alive in HeadOptimizer.step

Where = Literal["device", "host"]
Phase = Literal["persistent", "backward", "step"]
Item = tuple[int, Where, Phase]  # (bytes, where it is held, when it is alive)


class ActivationProfile(TypedDict):
    """``measure_activations``: backbone parameters and per-sample saved-tensor bytes (fp32)."""

    params: int
    float_bytes: float
    other_bytes: float
    largest_float_bytes: float


class PlanArguments(TypedDict):
    """The arguments of ``plan``, repeated in its result."""

    network: str
    embedding_size: int
    num_classes: int
    sample_rate: float
    batch_size: int
    world_size: int
    zero_stage: int
    precision: str
    optimizer: str
    offload: bool
    grad_checkpointing: bool
    device_memory_gb: float | None
    num_subcenters: int


class MemoryPlan(PlanArguments):
    """``plan``'s result: the arguments, then the prediction (bytes per device)."""

    params: int
    classes_per_rank: int
    sampled_per_rank: int
    device: dict[str, int]
    host: dict[str, int]
    phase: dict[str, Phase]
    device_total: int
    host_total: int
    max_num_classes: int | None


_PROFILES: dict[tuple[object, ...], ActivationProfile] = {}


# -- activations --------------------------------------------------------------------------------
class _SavedCounter:
    """saved_tensors_hooks pair recording each distinct storage once (excluded ones never)."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.storages: dict[int, tuple[int, bool]] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in self.exclude and ptr not in self.storages:
            self.storages[ptr] = (storage.nbytes(), t.is_floating_point())
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def bytes(self) -> tuple[int, int, int]:
        """(float bytes, other bytes, largest float storage)."""
        floats = [n for n, is_float in self.storages.values() if is_float]
        other = sum(n for n, is_float in self.storages.values() if not is_float)
        return sum(floats), other, max(floats, default=0)


def measure_activations(
    network: str,
    embedding_size: int = 512,
    grad_checkpointing: bool = False,
    model_kwargs: Mapping[str, Any] | None = None,
    batch: int = 2,
) -> ActivationProfile:
    """Per-sample activation memory of one training forward of `network`, fp32, on CPU.

    Counts the distinct storages autograd saves for the backward (parameters and buffers
    excluded). With `grad_checkpointing`, ``models.checkpointing``'s checkpoint call is replaced
    by a plain call that records each unit's input and its own saved tensors, so the result is
    what non-reentrant checkpointing keeps: tensors outside the units + unit inputs + the largest
    unit, alive again during its recompute. Results are cached per argument set.

    Returns:
        dict: ``params`` (P), ``float_bytes`` and ``other_bytes`` per sample (fp32 floats; ints
        and bools as saved), ``largest_float_bytes`` per sample (the biggest saved tensor).

    Raises:
        models.UnknownModelError: unknown network. ValueError: batch < 2 (BatchNorm needs 2).
    """
    import models
    from models.checkpointing import units_run_by

    if batch < 2:
        raise ValueError(f"memory plan: activation batch must be >= 2, got {batch}")
    kwargs = dict(model_kwargs or {})
    key = (network, embedding_size, grad_checkpointing, tuple(sorted(kwargs.items())), batch)
    if key in _PROFILES:
        return _PROFILES[key]
    torch.manual_seed(0)
    model = models.create(network, embedding_size, **kwargs).train()
    model.set_grad_checkpointing(grad_checkpointing)
    exclude = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    outer = _SavedCounter(exclude)
    unit_inputs: dict[int, int] = {}
    unit_peaks: list[tuple[int, int, int]] = []

    def plain_checkpoint(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        inner = _SavedCounter(exclude | {x.untyped_storage().data_ptr()})
        unit_inputs.setdefault(x.untyped_storage().data_ptr(), x.untyped_storage().nbytes())
        with torch.autograd.graph.saved_tensors_hooks(inner.pack, inner.unpack):
            out: torch.Tensor = module(x)
        unit_peaks.append(inner.bytes())
        return out

    images = torch.randn(batch, 3, 112, 112)
    with (
        units_run_by(plain_checkpoint),
        torch.autograd.graph.saved_tensors_hooks(outer.pack, outer.unpack),
    ):
        out = model(images)
    floats, other, largest = outer.bytes()
    if unit_peaks:  # inputs of units not already saved outside them
        floats += sum(n for ptr, n in unit_inputs.items() if ptr not in outer.storages)
        big = max(unit_peaks)
        floats, other = floats + big[0], other + big[1]
        largest = max(largest, *(peak[2] for peak in unit_peaks))
    del out
    profile: ActivationProfile = {
        "params": sum(p.numel() for p in model.parameters()),
        "float_bytes": floats / batch,
        "other_bytes": other / batch,
        "largest_float_bytes": largest / batch,
    }
    _PROFILES[key] = profile
    return profile


# -- the model ----------------------------------------------------------------------------------
def _check(name: str, ok: bool, value: object) -> None:
    if not ok:
        raise ValueError(f"memory plan: {name}: invalid value {value!r}")


def plan(
    network: str = "r100",
    embedding_size: int = 512,
    num_classes: int = 2_059_906,
    sample_rate: float = 0.3,
    batch_size: int = 128,
    world_size: int = 8,
    zero_stage: int = 2,
    precision: str = "bf16",
    optimizer: str = "sgd",
    offload: bool = False,
    grad_checkpointing: bool = False,
    device_memory_gb: float | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    profile: ActivationProfile | None = None,
    num_subcenters: int = 1,
) -> MemoryPlan:
    """Predicted per-device memory of one training step (see the module docstring).

    Args:
        network, embedding_size (D), model_kwargs: the backbone (``models.create``).
        num_classes (C), sample_rate: the Partial FC head, sharded over `world_size` (W).
        batch_size: per-device micro-batch B.
        zero_stage: 0-3; precision: fp32/fp16/bf16; optimizer: sgd/adamw (backbone and head).
        offload: ZeRO-Offload (optimizer state, master weights; parameters at stage 3) to host.
        grad_checkpointing: activation checkpointing of the backbone.
        device_memory_gb: device memory in GiB; when given, ``max_num_classes`` is solved.
        profile: a ``measure_activations`` result to reuse (else measured, cached).
        num_subcenters: S rows per class (Sub-center ArcFace); 1 for every other loss.

    Returns:
        ``MemoryPlan``: the arguments, ``device`` and ``host`` (item name -> bytes),
        ``device_total`` and ``host_total`` (bytes), ``params``, ``sampled_per_rank`` (K),
        ``classes_per_rank`` (n), ``max_num_classes`` (int or None).

    Raises:
        ValueError: an argument out of range (the message names it).
    """
    args: PlanArguments = {
        "network": network, "embedding_size": embedding_size, "num_classes": num_classes,
        "sample_rate": sample_rate, "batch_size": batch_size, "world_size": world_size,
        "zero_stage": zero_stage, "precision": precision, "optimizer": optimizer,
        "offload": offload, "grad_checkpointing": grad_checkpointing,
        "device_memory_gb": device_memory_gb, "num_subcenters": num_subcenters,
    }  # fmt: skip
    _check_arguments(args)
    if profile is None:
        profile = measure_activations(network, embedding_size, grad_checkpointing, model_kwargs)
    backbone = _backbone_items(
        profile, batch_size, world_size, zero_stage, precision, optimizer, offload
    )
    result = _prediction(args, profile, backbone)
    if device_memory_gb is not None:

        def total_of(c: int) -> int:
            head_c = _head_items(
                embedding_size, c, sample_rate, batch_size, world_size, optimizer, num_subcenters
            )
            return _peak({**backbone, **head_c[0]}, "device")

        result["max_num_classes"] = max_num_classes(device_memory_gb * GIB, total_of, world_size)
    return result


def _check_arguments(args: PlanArguments) -> None:
    """ValueError naming the first argument of ``plan`` out of range."""
    _check("precision", args["precision"] in PRECISION_BYTES, args["precision"])
    _check("optimizer", args["optimizer"] in OPTIMIZER_STATES, args["optimizer"])
    _check("zero_stage", args["zero_stage"] in (0, 1, 2, 3), args["zero_stage"])
    _check("sample_rate", 0.0 < args["sample_rate"] <= 1.0, args["sample_rate"])
    for name in ("embedding_size", "num_classes", "batch_size", "world_size", "num_subcenters"):
        value = args[name]
        _check(name, isinstance(value, int) and value >= 1, value)
    gb = args["device_memory_gb"]
    if gb is not None:
        _check("device_memory_gb", gb > 0, gb)


def _prediction(
    args: PlanArguments, profile: ActivationProfile, backbone: dict[str, Item]
) -> MemoryPlan:
    """``plan``'s result for the backbone items and the head of ``args`` (no class solve)."""
    head, n, k = _head_items(
        args["embedding_size"], args["num_classes"], args["sample_rate"], args["batch_size"],
        args["world_size"], args["optimizer"], args["num_subcenters"],
    )  # fmt: skip
    items = {**backbone, **head}
    return {
        **args,
        "params": profile["params"],
        "classes_per_rank": n,
        "sampled_per_rank": k,
        "device": {name: b for name, (b, where, _) in items.items() if where == "device"},
        "host": {name: b for name, (b, where, _) in items.items() if where == "host"},
        "phase": {name: phase for name, (_, _, phase) in items.items()},
        "device_total": _peak(items, "device"),
        "host_total": _peak(items, "host"),
        "max_num_classes": None,
    }


def _peak(items: Mapping[str, Item], where: Where) -> int:
    """persistent + max(backward, step) of the items held at `where`."""
    sums = {phase: 0 for phase in PHASES}
    for b, at, phase in items.values():
        if at == where:
            sums[phase] += b
    return sums["persistent"] + max(sums["backward"], sums["step"])


def _backbone_items(
    profile: ActivationProfile,
    batch: int,
    world: int,
    stage: int,
    precision: str,
    optimizer: str,
    offload: bool,
) -> dict[str, Item]:
    """name -> (bytes, "device"|"host", phase) for the backbone and its ZeRO engine."""
    p, b = profile["params"], PRECISION_BYTES[precision]
    mixed = precision != "fp32"
    part = world if stage >= 1 else 1  # optimizer-state partitioning
    host: Where = "host" if offload else "device"
    items: dict[str, tuple[float, Where, Phase]] = {
        f"backbone weights ({precision})": (
            b * p / (world if stage == 3 else 1),
            host if stage == 3 else "device",
            "persistent",
        ),
        "fp32 master weights": (4 * p / part if (stage >= 1 or mixed) else 0, host, "persistent"),
        f"backbone gradients ({precision})": (
            b * p / (world if stage >= 2 else 1),
            "device",
            "persistent",
        ),
        "fp32 gradient partition": (4 * p / part if (stage >= 1 or mixed) else 0, host, "step"),
        f"optimizer state ({optimizer})": (
            4 * OPTIMIZER_STATES[optimizer] * p / part,
            host,
            "persistent",
        ),
        "ZeRO buckets": (
            b * min(BUCKET_ELEMENTS, p) * ((stage >= 2) + (stage == 3)),
            "device",
            "backward",
        ),  # fmt: skip
    }
    act = profile["float_bytes"] * b / 4 + profile["other_bytes"]
    workspace = 2 * profile["largest_float_bytes"] * b / 4
    items["activations + backward workspace"] = (batch * (act + workspace), "device", "backward")
    return {name: (int(v), where, phase) for name, (v, where, phase) in items.items()}


def _head_items(
    dim: int, classes: int, rate: float, batch: int, world: int, optimizer: str, subcenters: int
) -> tuple[dict[str, Item], int, int]:
    """(name -> (bytes, "device", phase), n, K) of the largest head shard (rank 0); n and K
    count classes, each of ``subcenters`` rows."""
    n = math.ceil(classes / world)
    rows = batch * world
    full = int(rate * n) >= n
    k = n if full else min(n, max(int(rate * n), math.ceil(rows / world)))
    s = subcenters
    state = 4 * n * s * dim if optimizer == "sgd" else 8 * n * s * dim + 8 * n * s
    logits = 2 * 4 * rows * k + 2 * 4 * rows * dim
    if s > 1:  # the GEMM's (N, K S) output and the uint8 arg-max live until the backward
        logits += 4 * rows * k * s + rows * k
    items: dict[str, tuple[int, Phase]] = {
        "head centers (fp32)": (4 * n * s * dim, "persistent"),
        f"head optimizer state ({optimizer})": (state, "persistent"),
        # backward: sampled copy (shared when sample_rate = 1), normalized copy, gradient
        "head sampled rows + gradient": ((2 if full else 3) * 4 * k * s * dim, "backward"),
        "logits + softmax buffer (fp32)": (logits, "backward"),
        # step: gradient + gathered rows of weight and state + update temporaries
        "head step (gathered rows)": (HEAD_STEP_COPIES[optimizer] * 4 * k * s * dim, "step"),
    }
    return {name: (v, "device", phase) for name, (v, phase) in items.items()}, n, k


def max_num_classes(budget_bytes: float, total_of: Callable[[int], int], world_size: int) -> int:
    """Largest C with ``total_of(C) <= budget_bytes``, solved from the linear dependence on C.

    Memory is piecewise affine in C (one piece per peak phase, once ``sample_rate * C / W``
    exceeds the positives of a batch): the line through two large C gives the guess, which is
    then corrected with the local slope and finally checked by bisection against `total_of`.
    Returns 0 when even C = W does not fit.
    """
    if total_of(world_size) > budget_bytes:
        return 0
    c = 1_000_000 * world_size
    for _ in range(4):  # Newton steps on a piecewise-linear function
        slope = (total_of(2 * c) - total_of(c)) / c
        if slope <= 0:
            return 0
        c = max(world_size, int(c + (budget_bytes - total_of(c)) / slope))
    lo, hi = world_size, c
    while total_of(hi) <= budget_bytes:  # rounding: make hi an upper bound
        lo, hi = hi, hi + world_size
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if total_of(mid) <= budget_bytes else (lo, mid)
    return lo
