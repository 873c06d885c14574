"""Fake-CUDA dry run of the training step (issue 28): `trainer.step.train_step` on FakeTensorMode
tensors with ``device="cuda"`` at world size 1, for every backbone family, engine precision,
margin (with and without sub-centers), head logits dtype and head feature (dense decay, gradient
accumulation). A device or dtype mismatch raises as on a GPU; a host read raises too, except the
step's one budgeted read per micro-batch (the replicated finite-loss check), and every other call
that would sync on CUDA (`tests/helpers/host_syncs.py`) fails the test. What needs a driver is
replaced at world size 1 (tests/helpers/fake_cuda.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import DataDependentOutputException

import models
from heads import LOGITS_DTYPES, PartialFC, build_head_optimizer, build_margin
from heads.margins import LOSSES, CombinedMarginLoss
from tests.helpers.fake_cuda import (
    CUDA,
    AllowedReads,
    OneRankAccelerator,
    PlainEngine,
    cast_like_deepspeed,
    cpu_generators,
    fake_cuda,
)
from tests.helpers.host_syncs import HostSyncCounter
from trainer.precision import DTYPES, keep_tail_fp32
from trainer.step import train_step

D, C, B = 16, 40, 4  # embedding, classes, per-rank micro-batch
FINITE_CHECK = ("trainer/step.py", "torch.isfinite(loss)")  # the budgeted read
# Tiny members of each family (the classes the registry's builders call).
FAMILIES = {
    "iresnet": lambda: models.IResNet([1, 1, 1, 1], D, base_width=4),
    "mobilefacenet": lambda: models.MobileFaceNet(D, blocks=(1, 1, 1, 1), scale=1),
    "vit": lambda: models.create("vit_t", embedding_size=D, embed_dim=16, depth=1, num_heads=2),
}


def _tiny_backbone():
    return nn.Sequential(nn.Conv2d(3, 4, 16, stride=16), nn.Flatten(), nn.Linear(4 * 7 * 7, D))


def _build(backbone, precision, margin, logits, subcenters, dense, sample_rate):
    with torch.device(CUDA):  # as `.to(device)` leaves them (a fake module cannot swap params)
        net = backbone()
        margin = margin() if margin is not None else None
        head = PartialFC(D, C, sample_rate, margin, logits_dtype=logits, num_subcenters=subcenters)
    if precision != "fp32":
        keep_tail_fp32(net)  # as trainer.engine.prepare_backbone, then DeepSpeed's cast
        cast_like_deepspeed(net, DTYPES[precision])
    cpu_generators(head)
    opt = build_head_optimizer(
        head, "sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, dense_decay=dense
    )
    return net, head, opt


def dry_step(
    backbone=_tiny_backbone,
    precision="bf16",
    margin=None,
    logits="fp32",
    subcenters=1,
    dense=False,
    gas=1,
    sample_rate=0.5,
    steps=2,
):
    """`steps` training steps on fake CUDA; returns (budgeted reads taken, other syncs)."""
    with fake_cuda():
        net, head, opt = _build(backbone, precision, margin, logits, subcenters, dense, sample_rate)
        # uint8 NHWC on the host, as the CPU loader hands them over (normalized on the device)
        micro = [
            (torch.randint(0, 256, (B, 112, 112, 3), dtype=torch.uint8), torch.randint(0, C, (B,)))
            for _ in range(gas)
        ]
        syncs, reads = HostSyncCounter(), AllowedReads([FINITE_CHECK])
        with syncs, reads:
            for _ in range(steps):
                result = train_step(
                    OneRankAccelerator(gas), PlainEngine(net), head, opt, micro, precision, CUDA
                )
        assert result.applied and result.loss.device == CUDA and result.loss.dtype == torch.float32
        for p in (p for p in net.parameters() if p.requires_grad):
            assert p.grad is not None and p.grad.device == CUDA and p.grad.dtype == p.dtype
        assert head.weight.device == CUDA and head.weight.dtype == torch.float32
        return reads.taken, syncs.calls


def _clean(reads, calls, micro_batches):
    assert len(reads) == micro_batches, reads  # one finite-loss check per micro-batch
    assert calls == [], calls


@pytest.mark.parametrize("precision", list(DTYPES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_backbone_families_step_on_fake_cuda(family, precision):
    reads, calls = dry_step(FAMILIES[family], precision, steps=1)
    _clean(reads, calls, 1)


@pytest.mark.parametrize("subcenters", [1, 3])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_every_margin_steps_on_fake_cuda(loss, subcenters):
    reads, calls = dry_step(margin=lambda: build_margin(loss, 32.0), subcenters=subcenters, steps=1)
    _clean(reads, calls, 1)


@pytest.mark.parametrize("precision", list(DTYPES))
@pytest.mark.parametrize("logits", LOGITS_DTYPES)
def test_logits_dtypes_and_precisions_on_fake_cuda(logits, precision):
    reads, calls = dry_step(precision=precision, logits=logits, steps=1)
    _clean(reads, calls, 1)


def test_dense_decay_and_gradient_accumulation_on_fake_cuda():
    """compat's dense head decay, gradient_acc 3, sub-centers and ElasticFace+ together."""
    margin = lambda: build_margin("elasticface_arc_plus", 32.0)  # noqa: E731
    reads, calls = dry_step(margin=margin, dense=True, gas=3, subcenters=2)
    _clean(reads, calls, 6)


def test_planted_cpu_tensor_fails_the_dry_run():
    class Planted(nn.Module):  # a CPU constant inside the backbone's forward
        def __init__(self):
            super().__init__()
            self.net = _tiny_backbone()

        def forward(self, x):
            return self.net(x) + torch.ones(D)

    with pytest.raises(RuntimeError, match="devices"):
        dry_step(Planted)


def test_planted_host_read_fails_the_dry_run(monkeypatch):
    def margin_cosine(self, cos_t, norms, rows):  # a host read inside the head's margin
        return cos_t - 0.1 * float(cos_t.max().item())

    monkeypatch.setattr(CombinedMarginLoss, "margin_cosine", margin_cosine)
    with pytest.raises(DataDependentOutputException):
        dry_step(margin=lambda: CombinedMarginLoss(32.0, 1.0, 0.0, 0.1), steps=1)


def test_planted_pageable_copy_is_counted():
    """A tensor built from Python data on the device is a blocking copy on CUDA: counted."""

    class Planted(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _tiny_backbone()

        def forward(self, x):
            return self.net(x) * torch.tensor([1.0], device=x.device)

    reads, calls = dry_step(Planted, steps=1)
    assert [name for name, _ in calls] == ["tensor"], calls


def test_planted_blocking_host_to_device_copy_is_counted():
    """A CPU tensor copied to the device without non_blocking waits for the stream: counted
    (ElasticFace's CPU-drawn margins did this at every forward)."""

    class Planted(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _tiny_backbone()

        def forward(self, x):
            return self.net(x) * torch.ones(D).to(x.device)

    reads, calls = dry_step(Planted, steps=1)
    assert [name for name, _ in calls] == ["h2d"], calls
