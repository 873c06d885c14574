"""Host syncs per optimizer step, counted on CPU: the calls that would make the host wait for a
CUDA device (`tests/helpers/host_syncs.py`), during steady-state 2-rank `train_step`s
(Accelerate + DeepSpeed + Partial FC): the default recipe, and every shipped recipe's features
(configs/*.yaml: dense head decay, gradient accumulation, each margin, sub-centers, AdamW, fp16,
ZeRO-3). DeepSpeed's own calls count too. Budget (issues 13, 28): the replicated finite-loss
check, one per micro-batch, plus one combined read on logging steps (`StepResult.read`);
DeepSpeed's are listed in docs/benchmarks.md.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers.distributed import run_distributed
from tests.helpers.host_syncs import HostSyncCounter
from tests.helpers.recipe_step import (
    SHIPPED,
    build_engine,
    engine_key,
    micro_batches,
    recipe_config,
)
from tests.helpers.train_step import build_step

# arcface_torch's recipe: clipping at 5, momentum, weight decay; half the classes sampled.
RECIPE = ["optim.clip_grad=5.0", "optim.momentum=0.9", "optim.weight_decay=5e-4"]
# DeepSpeed settings that remove its own syncs (no bf16 overflow check, no gradient norm).
LEAN = {"bf16": {"check_grad_overflow": False}, "zero_optimization": {"compute_grad_norm": False}}


def _count_worker(rank, world, overrides, ds_edit):
    from trainer.step import train_step

    accelerator, engine, head, head_opt, micro, _ = build_step(
        rank, world, 2, "bf16", 1, overrides=overrides, sample_rate=0.5, ds_edit=ds_edit
    )
    cpu = torch.device("cpu")
    train_step(accelerator, engine, head, head_opt, micro, "bf16", cpu)  # start-up step
    plain = HostSyncCounter()
    with plain:
        result = train_step(accelerator, engine, head, head_opt, micro, "bf16", cpu)
    logged = HostSyncCounter()
    with logged:
        train_step(accelerator, engine, head, head_opt, micro, "bf16", cpu)
        values = result.read(engine)
    return {"plain": plain.calls, "logged": logged.calls, "values": values, "ok": result.applied}


def _own(calls):
    return [c for c in calls if not c[1].startswith("deepspeed")]


def test_two_rank_step_syncs_at_most_twice():
    """bf16 ZeRO-2, 2 ranks. Our code: 1 sync per plain step, 2 on a logging step, on every
    rank (not growing with the world size). With DeepSpeed's lean settings that is the total;
    with its defaults and clipping its known syncs come on top and are bounded here."""
    lean = run_distributed(_count_worker, 2, args=([], LEAN), timeout=240)
    recipe = run_distributed(_count_worker, 2, args=(RECIPE, None), timeout=240)
    for r in lean:
        assert r["ok"]
        assert len(r["plain"]) <= 1, r["plain"]
        assert len(r["logged"]) <= 2, r["logged"]
        assert r["values"]["head_finite"] == 1.0
    for r in recipe:
        assert r["ok"]
        assert len(_own(r["plain"])) <= 1, r["plain"]
        assert len(_own(r["logged"])) <= 2, r["logged"]
        # DeepSpeed ZeRO-1/2 bf16 + clipping: overflow flag, invalid-norm check, the -1 norm
        # sentinel built from a Python number, the clip's invalid-norm check.
        assert len(r["plain"]) - len(_own(r["plain"])) <= 4, r["plain"]
        v = r["values"]
        assert set(v) >= {"loss", "grad_norm", "num_positive", "head_finite", "num_sampled"}
        assert all(isinstance(x, float) for x in v.values()), v
        assert v["head_finite"] == 1.0 and v["grad_norm"] > 0 and v["num_positive"] >= 1


def _head_key(cfg):
    h, o = cfg.head, cfg.optim
    return (
        engine_key(cfg),
        h.loss,
        repr(h.loss_kwargs),
        h.num_subcenters,
        h.sample_rate,
        h.margin_gradient,
        h.clamping,
        o.optimizer,
        o.head_decay,
        o.momentum,
        o.weight_decay,
    )


def _recipes():
    """Shipped configs with distinct features, grouped by engine: {engine key: {head key:
    [config names]}}."""
    groups: dict = {}
    for path in SHIPPED:
        cfg = recipe_config(path)
        names = groups.setdefault(engine_key(cfg), {}).setdefault(_head_key(cfg), [])
        names.append(os.path.basename(path))
    return groups


def _recipes_worker(rank, world, groups):
    from trainer.run import build_head
    from trainer.step import train_step

    cpu = torch.device("cpu")
    out = []
    for heads in groups.values():
        names = next(iter(heads.values()))
        cfg = recipe_config(os.path.join(os.path.dirname(SHIPPED[0]), names[0]))
        accelerator, engine, precision, _ = build_engine(rank, world, cfg)
        micro = micro_batches(rank, world, cfg.optim.gradient_acc)
        for names in heads.values():
            cfg = recipe_config(os.path.join(os.path.dirname(SHIPPED[0]), names[0]))
            head, head_opt = build_head(cfg, cpu, precision)
            for _ in range(2):  # start-up (batch size agreed once), then a steady step
                train_step(accelerator, engine, head, head_opt, micro, precision, cpu)
            counter = HostSyncCounter()
            with counter:
                result = train_step(accelerator, engine, head, head_opt, micro, precision, cpu)
            own = [c for c in counter.calls if not c[1].startswith("deepspeed")]
            out.append(
                {
                    "configs": names,
                    "micro": len(micro),
                    "own": own,
                    "deepspeed": len(counter.calls) - len(own),
                    "applied": result.applied,
                    "finite": bool(result.head_finite),
                }
            )
    return out


def test_every_shipped_recipe_syncs_once_per_micro_batch():
    """Every feature a shipped config turns on (compat's dense head decay at sample rate < 1,
    gradient_acc 2 and 3, each margin incl. ElasticFace's per-step draws, sub-centers, AdamW,
    fp16 ZeRO-1, bf16 ZeRO-2/3): our code reads the device once per micro-batch (the finite-loss
    check), on both ranks."""
    results = run_distributed(_recipes_worker, 2, args=(_recipes(),), timeout=600)
    for r in results[0]:  # the table in docs/benchmarks.md (pytest -s)
        own = sorted({site for _, site in r["own"]})
        print(
            f"{','.join(r['configs'])}: own {len(r['own'])}/{r['micro']} micro-batches "
            f"{own}, deepspeed {r['deepspeed']}"
        )
    assert results[0] and len(results[0]) == len(results[1])
    for rank_results in results:
        for r in rank_results:
            assert r["applied"] and r["finite"], r["configs"]
            assert len(r["own"]) <= r["micro"], (r["configs"], r["own"])
    covered = {name for r in results[0] for name in r["configs"]}
    assert covered == {os.path.basename(p) for p in SHIPPED}


@pytest.mark.parametrize("name", ["zero2_bf16.json", "zero3_bf16.json", "zero3_bf16_offload.json"])
def test_bf16_configs_drop_deepspeeds_overflow_read(name):
    """The bf16 JSONs switch DeepSpeed's bf16 overflow check off (a flag read per step, ZeRO-1/2;
    ZeRO-3 checks fp16 only) and the resolved config keeps it: the step's finite-loss check and
    the head's finiteness gate cover a non-finite loss (docs/benchmarks.md)."""
    from trainer.config import load_config
    from trainer.engine import EngineSettings, build_ds_config

    path = os.path.join(os.path.dirname(SHIPPED[0]), "..", "ds_configs", name)
    stage = 2 if "zero2" in name else 3
    cfg = load_config(None, ["data.kind=synthetic", "data.num_classes=10", "data.num_image=100"])
    ds = build_ds_config(cfg, EngineSettings(stage, "bf16", os.path.normpath(path)))
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": False}


def _sync_bn_worker(rank, world):
    from torch import nn

    from trainer.sync_bn import convert_sync_batchnorm

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.BatchNorm1d(144))
    net = convert_sync_batchnorm(net)
    x = torch.randn(3 + rank, 3, 8, 8)  # unequal per-rank batches
    net(x).sum().backward()  # start-up
    counter = HostSyncCounter()
    with counter:
        net(x).square().sum().backward()
    return counter.calls


def test_sync_bn_reads_nothing():
    """engine.sync_bn: forward and backward of two synchronized BatchNorm layers on 2 ranks
    make no host read (torch's SyncBatchNorm masks empty ranks: one sync per layer)."""
    for calls in run_distributed(_sync_bn_worker, 2, timeout=120):
        assert calls == [], calls
