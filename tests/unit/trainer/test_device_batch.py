"""Loader -> device input path: uint8 copy, normalization on the device, prefetch and resume."""

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from data.datasets import SyntheticDataset
from data.decode import normalize
from data.loader import build_cpu_loader, flip_mask
from trainer.device_batch import DevicePrefetcher, StreamOps, to_device

N, B, SEED = 16, 4, 5
CPU = torch.device("cpu")


def _reference(ds, labels, epoch):
    """The float32 batch the loader produced before (flip, then ``(x/255 - 0.5)/0.5``), in
    float64 from the dataset, for SyntheticDataset samples whose label is their index."""
    out = []
    for i, flip in zip(labels.tolist(), flip_mask(labels.numpy(), SEED, epoch)):
        img = ds[i][0].astype(np.float64)
        img = img[:, ::-1] if flip else img
        out.append(((img / 255 - 0.5) / 0.5).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(out))


def test_device_normalized_batch_equals_old_float_batch():
    ds = SyntheticDataset(N, num_classes=N, image_size=112, seed=3)  # label == index
    loader = build_cpu_loader(ds, B, 0, 1, SEED, num_workers=1, persistent_workers=True)
    batches = DevicePrefetcher(loader, torch.device("cpu"))
    for epoch in (0, 1):  # persistent workers must flip with the current epoch
        batches.set_epoch(epoch)
        for images, labels in batches:
            assert images.dtype == torch.float32 and images.shape == (B, 3, 112, 112)
            assert images.is_contiguous(memory_format=torch.channels_last)
            ref = _reference(ds, labels, epoch)
            torch.testing.assert_close(images.double(), ref, rtol=0, atol=1e-6)
    u8 = torch.from_numpy(np.stack([ds[i][0] for i in range(B)]))
    x = to_device(u8, torch.device("cpu"), torch.bfloat16, torch.contiguous_format)
    assert x.dtype == torch.bfloat16 and x.is_contiguous()
    assert torch.equal(x, normalize(u8).to(torch.bfloat16))  # cast of the float32 values


def test_float_batches_pass_through_unchanged():
    x = torch.rand(2, 3, 8, 8) * 2 - 1  # e.g. DALI's normalized output
    assert to_device(x, torch.device("cpu")) is x
    assert torch.equal(to_device(x, torch.device("cpu"), torch.bfloat16), x.to(torch.bfloat16))


class _ToCalls(TorchFunctionMode):
    """Records ``Tensor.to`` calls as ``(input tensor, args, kwargs)``."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            self.calls.append((args[0], args[1:], kwargs))
        return func(*args, **kwargs)


class _Stop(Exception):
    pass


class _Engine:
    """Stands in for the DeepSpeed engine: records its input and stops the step there."""

    def __call__(self, images):
        self.images = images
        raise _Stop


class _Accelerator:
    sync_gradients = True

    @contextmanager
    def accumulate(self, engine):
        yield


def test_step_copies_uint8_and_normalizes_on_the_device():
    from trainer.step import train_step

    u8 = torch.randint(0, 256, (B, 112, 112, 3), dtype=torch.uint8)
    labels = torch.arange(B)
    engine, calls = _Engine(), _ToCalls()
    with calls, pytest.raises(_Stop):
        train_step(
            _Accelerator(),
            engine,
            None,
            None,
            [(u8, labels)],
            "bf16",
            torch.device("cpu"),
            memory_format=torch.channels_last,
        )
    moves = [(a, k) for t, a, k in calls.calls if t is u8]
    assert len(moves) == 1, moves  # one copy of the loader's batch ...
    args, kwargs = moves[0]
    dtypes = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.dtype)]
    assert dtypes == [] and kwargs.get("non_blocking") is True  # ... same dtype, asynchronous
    x = engine.images
    assert x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x, normalize(u8).to(torch.bfloat16))


class _Stream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_event(self, event):
        self.log.append(("wait", self.name, event.batch))

    def wait_stream(self, stream):  # what the old prefetcher did: wait for all side work
        self.log.append(("wait_stream", self.name, stream.name))


def _fake_ops(log):
    """CPU stand-ins for the CUDA stream calls that log their order: ``("issue", k)`` when
    batch k's copy starts on the side stream, ``("record", stream, k)`` for its event,
    ``("wait", stream, k)`` when a stream waits on batch k's event."""
    issued = [0]

    class Event:
        def record(self, stream):
            self.batch = issued[0]
            log.append(("record", stream.name, self.batch))

    @contextmanager
    def use_stream(stream):
        issued[0] += 1
        log.append(("issue", issued[0]))
        yield

    main, side = _Stream("main", log), _Stream("side", log)
    return StreamOps(lambda device: side, use_stream, lambda device: main, Event)


def test_each_batch_waits_for_its_own_copy_only():
    ds = SyntheticDataset(N, num_classes=N, image_size=112, seed=3)
    plain = list(DevicePrefetcher(build_cpu_loader(ds, B, 0, 1, SEED, num_workers=0), CPU))
    log = []
    loader = build_cpu_loader(ds, B, 0, 1, SEED, num_workers=0)
    batches = DevicePrefetcher(loader, CPU, stream_ops=_fake_ops(log))
    for k, (x, y) in enumerate(batches, start=1):
        assert log[-1] == ("wait", "main", k)  # the step waits on batch k's event ...
        if k < len(plain):  # ... while batch k+1's copy is already issued behind it
            assert log[-3:-1] == [("issue", k + 1), ("record", "side", k + 1)]
        assert torch.equal(x, plain[k - 1][0]) and torch.equal(y, plain[k - 1][1])
    assert k == len(plain) == N // B
    assert [e for e in log if e[0] == "wait_stream"] == []


def test_prefetch_ahead_state_counts_only_handed_out_batches():
    ds = SyntheticDataset(N, num_classes=N, image_size=112, seed=3)
    loader = build_cpu_loader(ds, B, 0, 1, SEED, num_workers=0)
    ref = [y for _, y in DevicePrefetcher(loader, torch.device("cpu"))]
    batches = DevicePrefetcher(loader, CPU, stream_ops=_fake_ops([]))  # prefetches like CUDA
    it = iter(batches)
    got = [next(it)[1] for _ in range(2)]
    assert loader.state_dict()["offset"] == 3 * B  # the loader ran one batch ahead
    state = batches.state_dict()
    assert state == {"epoch": 0, "offset": 2 * B}
    del it
    cpu = torch.device("cpu")
    resumed = DevicePrefetcher(build_cpu_loader(ds, B, 0, 1, SEED, num_workers=0), cpu)
    resumed.load_state_dict(state)
    resumed.set_epoch(0)
    got += [y for _, y in resumed]
    assert [y.tolist() for y in got] == [y.tolist() for y in ref]


@pytest.mark.gpu
def test_pinned_uint8_batches_prefetched_on_a_side_stream():
    device = torch.device("cuda", torch.cuda.current_device())
    ds = SyntheticDataset(N, num_classes=N, image_size=112, seed=3)
    loader = build_cpu_loader(ds, B, 0, 1, SEED, num_workers=1, pin_memory=True)
    host = [(x, y) for x, y in loader]
    assert all(x.dtype == torch.uint8 and x.is_pinned() and y.is_pinned() for x, y in host)
    torch.cuda.set_sync_debug_mode("error")  # a pageable or dtype-changing copy would sync
    try:
        x = to_device(host[0][0], device, torch.bfloat16, torch.channels_last)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(x.cpu(), normalize(host[0][0]).to(torch.bfloat16))
    batches = DevicePrefetcher(loader, device, torch.bfloat16, torch.channels_last)
    assert batches.stream is not None and batches.stream != torch.cuda.current_stream(device)
    it = iter(batches)
    images, labels = next(it)
    assert batches.state_dict()["offset"] == B and loader.state_dict()["offset"] == 2 * B
    assert images.is_cuda and labels.is_cuda and images.dtype == torch.bfloat16
    out = [images.cpu()] + [x.cpu() for x, _ in it]
    assert len(out) == len(host)
    for x, (u8, _) in zip(out, host):
        assert torch.equal(x, normalize(u8).to(torch.bfloat16))
