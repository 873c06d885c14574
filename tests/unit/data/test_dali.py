"""DALI loader: the CPU loader's sample order and pixels, sharding, flips, resume, GPU decode."""

from __future__ import annotations

import sys

import pytest
import torch

from data.dali_loader import build_dali_loader
from data.datasets import RecordDataset
from data.decode import normalize
from data.loader import build_cpu_loader
from tests.helpers.lfw_rec import lfw_faces, write_lfw_rec

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI not installed (extra 'dali')")

B = 4


@pytest.fixture(scope="module")
def lfw_rec(lfw_root, tmp_path_factory):
    """24 real LFW faces (8 people x 3) in insightface layout (header + identity records)."""
    folder = tmp_path_factory.mktemp("dali_rec")
    rec, idx, labels, _ = write_lfw_rec(str(folder), lfw_faces(lfw_root, 8, 3))
    ds = RecordDataset(rec, idx)
    cpu = build_cpu_loader(ds, B, 0, 1, seed=0, num_workers=0, shuffle=False, flip=False)
    ref = torch.cat([normalize(x) for x, _ in cpu])  # the CPU loader hands over uint8
    ref_labels = torch.cat([y for _, y in cpu])
    assert ref_labels.tolist() == labels
    return {"rec": rec, "idx": idx, "ref": ref, "labels": ref_labels, "cache": str(folder / "c")}


def _epoch(loader):
    """One epoch, images normalized as the step does (the loader hands over uint8 NHWC)."""
    images, labels = zip(*list(loader))
    return normalize(torch.cat(images)), torch.cat(labels)


def _match(images, ref):
    """Index of the nearest reference image and mean abs diff in uint8 units, per image."""
    d = (images[:, None] - ref[None]).abs().mean(dim=(2, 3, 4)) * 127.5
    best = d.min(dim=1)
    return best.indices, best.values


def test_dali_index_has_only_images(lfw_rec):
    kw = {"rank": 0, "world_size": 1, "seed": 0, "cache_dir": lfw_rec["cache"]}
    loader = build_dali_loader(lfw_rec["rec"], lfw_rec["idx"], B, **kw)
    assert loader.index.keys == range(1, 25)  # no header (0) nor identity records (25..32)
    again = build_dali_loader(lfw_rec["rec"], lfw_rec["idx"], B, **kw)  # from the .npy cache
    assert again.index.offsets.tolist() == loader.index.offsets.tolist()


def test_dali_num_threads_zero_builds_and_runs(lfw_rec):
    # data.num_workers: 0 is passed as num_threads; DALI itself refuses num_threads < 1
    loader = build_dali_loader(
        lfw_rec["rec"], lfw_rec["idx"], B, 0, 1, seed=1, num_threads=0, cache_dir=lfw_rec["cache"]
    )
    images, labels = _epoch(loader)
    assert images.shape == (24, 3, 112, 112) and sorted(labels.tolist()) == sorted(
        lfw_rec["labels"].tolist()
    )


def test_dali_cpu_matches_cpu_loader(lfw_rec):
    loader = build_dali_loader(
        lfw_rec["rec"], lfw_rec["idx"], B, 0, 1, seed=3, flip=False, cache_dir=lfw_rec["cache"]
    )
    assert len(loader) == 24 // B
    raw = next(iter(loader))[0]  # the CPU loader's hand-over: uint8 NHWC, no float copy
    assert raw.dtype == torch.uint8 and raw.shape == (B, 112, 112, 3) and raw.is_contiguous()
    images, labels = _epoch(loader)
    assert images.shape == (24, 3, 112, 112)
    assert labels.dtype == torch.int64 and images.device.type == "cpu"
    idx, diff = _match(images, lfw_rec["ref"])
    assert diff.max() < 2.0  # JPEG decoder tolerance, in 0..255 units
    assert sorted(idx.tolist()) == list(range(24))  # each sample exactly once per epoch
    assert torch.equal(labels, lfw_rec["labels"][idx])
    assert idx.tolist() != list(range(24))  # shuffled


def test_dali_two_ranks_cover_epoch_and_flip(lfw_rec):
    seen = []
    for rank in range(2):
        kw = {"rank": rank, "world_size": 2, "seed": 5, "cache_dir": lfw_rec["cache"]}
        loader = build_dali_loader(lfw_rec["rec"], lfw_rec["idx"], B, **kw)
        assert len(loader) == 24 // 2 // B
        loader.set_epoch(1)
        images, labels = _epoch(loader)
        again = _epoch(build_dali_loader(lfw_rec["rec"], lfw_rec["idx"], B, **kw))
        assert not torch.equal(again[0], images)  # epoch 0 differs from epoch 1
        loader.set_epoch(1)
        assert torch.equal(_epoch(loader)[0], images)  # same (seed, epoch, rank): same batches
        unflipped, diff = _match(images, lfw_rec["ref"])
        mirrored, mdiff = _match(images.flip(3), lfw_rec["ref"])
        is_flip = mdiff < diff
        idx = torch.where(is_flip, mirrored, unflipped)
        assert torch.minimum(diff, mdiff).max() < 2.0
        assert torch.equal(labels, lfw_rec["labels"][idx])
        assert 0 < int(is_flip.sum()) < len(is_flip)
        seen += idx.tolist()
    assert sorted(seen) == list(range(24))


def test_dali_order_is_the_cpu_loaders_global_permutation(lfw_rec):
    # identity-sorted file (8 people x 3): the old buffer shuffle over DALI's contiguous shards
    # drew another order; now both loaders take rank r's every W-th position of one permutation
    # and flip the same samples
    ds = RecordDataset(lfw_rec["rec"], lfw_rec["idx"])
    for rank in range(2):
        cpu = build_cpu_loader(ds, B, rank, 2, seed=11, num_workers=0)
        kw = {"rank": rank, "world_size": 2, "seed": 11, "cache_dir": lfw_rec["cache"]}
        dali = build_dali_loader(lfw_rec["rec"], lfw_rec["idx"], B, **kw)  # flips too
        for epoch in (0, 1):
            cpu.set_epoch(epoch)
            dali.set_epoch(epoch)
            pairs = list(zip(cpu, dali))
            assert len(pairs) == len(dali) == len(cpu) == 3
            for (x, y), (xd, yd) in pairs:
                assert torch.equal(y, yd) and xd.dtype == torch.uint8
                assert (normalize(x) - normalize(xd)).abs().mean() * 127.5 < 2.0
            distinct = [len(set(yd.tolist())) for _, (_, yd) in pairs]
            assert distinct == [len(set(y.tolist())) for (_, y), _ in pairs]


def test_dali_resume_reads_from_the_offset(lfw_rec):
    def make(world_size=1, rank=0):
        kw = {"rank": rank, "world_size": world_size, "seed": 8, "cache_dir": lfw_rec["cache"]}
        return build_dali_loader(lfw_rec["rec"], lfw_rec["idx"], B, **kw)

    full = make()
    ref = list(full)
    assert full.records_read == len(ref) * B == 24
    first = make()
    it = iter(first)
    got = [next(it) for _ in range(2)]
    state = first.state_dict()
    assert state == {"epoch": 0, "offset": 2 * B}
    resumed = make()
    resumed.load_state_dict(state)
    resumed.set_epoch(0)
    assert resumed.state_dict() == state
    got += list(resumed)
    assert resumed.records_read == (len(ref) - 2) * B  # the skipped batches were never read
    assert len(got) == len(ref)
    for (x, y), (xr, yr) in zip(got, ref):
        assert torch.equal(y, yr) and torch.equal(x, xr)
    assert resumed.state_dict() == {"epoch": 0, "offset": 24}
    # another world size continues with the not-yet-seen samples, each once (as the CPU loader)
    rest = []
    for rank in range(2):
        other = make(world_size=2, rank=rank)
        other.load_state_dict(state)
        rest += [y for _, y in other]
    assert sorted(torch.cat(rest).tolist()) == sorted(torch.cat([y for _, y in ref[2:]]).tolist())
    with pytest.raises(ValueError, match="missing"):
        resumed.load_state_dict({"offset": 3})


def test_missing_dali_gives_clear_error(monkeypatch, lfw_rec):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(ImportError, match="needs NVIDIA DALI"):
        build_dali_loader(lfw_rec["rec"], lfw_rec["idx"], B, 0, 1, seed=0)


@pytest.mark.slow
def test_dali_cpu_matches_cpu_loader_on_lfw_demo(lfw_demo):
    rec = f"{lfw_demo}/train.rec"
    ds = RecordDataset(rec)
    batches = 4
    cpu = build_cpu_loader(ds, 32, 0, 1, seed=0, num_workers=0, shuffle=False, flip=False)
    dali = build_dali_loader(rec, None, 32, 0, 1, seed=0, flip=False, shuffle=False)
    assert len(dali) == len(cpu) == len(ds) // 32
    for i, ((x, y), (xd, yd)) in enumerate(zip(cpu, dali)):
        assert torch.equal(y, yd)
        assert (normalize(x) - normalize(xd)).abs().mean() * 127.5 < 2.0
        if i + 1 == batches:
            break
    else:
        raise AssertionError("fewer batches than expected")


@pytest.mark.gpu
def test_dali_mixed_decoder_on_gpu(lfw_rec):
    loader = build_dali_loader(
        lfw_rec["rec"],
        lfw_rec["idx"],
        B,
        0,
        1,
        seed=3,
        device_id=0,
        flip=False,
        cache_dir=lfw_rec["cache"],
    )
    images, labels = _epoch(loader)
    assert images.is_cuda and labels.is_cuda and labels.dtype == torch.int64
    idx, diff = _match(images.cpu(), lfw_rec["ref"])
    assert diff.max() < 2.0  # nvJPEG vs libjpeg-turbo
    assert sorted(idx.tolist()) == list(range(24))
    assert torch.equal(labels.cpu(), lfw_rec["labels"][idx])


def test_trainer_builds_dali_loader_from_the_dataset_index(lfw_rec, monkeypatch):
    # the DALI branch of trainer/data_setup.py (taken on a CUDA device; the pipeline is built
    # at the first iter(), so the loader can be built here): num_workers 0 and one shared index
    import os

    from data.dali_loader import DaliLoader
    from tests.helpers.paths import REPO
    from trainer.config import load_config
    from trainer.data_setup import build_dataset, build_loader

    config = os.path.join(REPO, "configs", "lfw_demo_r18.yaml")
    folder = os.path.dirname(lfw_rec["rec"])
    cfg = load_config(
        config,
        [f"data.rec={folder}", "data.num_classes=8", "data.dali=true", "data.num_workers=0"]
        + ["data.batch_size=4"],
    )
    monkeypatch.setenv("LOCAL_RANK", "0")
    ds = build_dataset(cfg)
    loader = build_loader(cfg, ds, 0, 1, torch.device("cuda", 0))
    assert isinstance(loader, DaliLoader) and loader.num_threads == 1 and loader.device_id == 0
    assert loader.index is ds.index and len(loader) == 24 // cfg.data.batch_size


def test_dali_batches_reach_the_step_in_its_dtype_and_layout(lfw_rec):
    # the step's side of the hand-over (trainer/device_batch.py): one normalization pass into
    # the engine's dtype and channels_last, the CPU loader's path
    from trainer.device_batch import DevicePrefetcher

    def make():
        kw = {"seed": 2, "cache_dir": lfw_rec["cache"]}
        return build_dali_loader(lfw_rec["rec"], lfw_rec["idx"], B, 0, 1, **kw)

    raw = list(make())
    steps = list(DevicePrefetcher(make(), torch.device("cpu"), torch.bfloat16))
    assert len(steps) == len(raw) == 24 // B
    for (x, y), (xs, ys) in zip(raw, steps):
        assert xs.dtype == torch.bfloat16 and xs.shape == (B, 3, 112, 112)
        assert xs.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(xs, normalize(x).to(torch.bfloat16)) and torch.equal(y, ys)
