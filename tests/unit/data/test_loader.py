"""Distributed sampler (sharding, resume, world-size change) and the CPU training loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.datasets import RecordDataset, SyntheticDataset
from data.loader import build_cpu_loader, flip_mask
from data.sampler import DistributedShardSampler, epoch_permutation
from tests.helpers.lfw_rec import lfw_faces, write_lfw_rec


def _all(sampler_list):
    return [list(s) for s in sampler_list]


# ---------------------------------------------------------------- sampler


@pytest.mark.parametrize("n", [100, 101])
def test_two_ranks_cover_epoch_once(n):
    for drop_last in (True, False):
        ranks = [DistributedShardSampler(n, r, 2, seed=5, drop_last=drop_last) for r in range(2)]
        for epoch in (0, 1):
            for s in ranks:
                s.set_epoch(epoch)
            a, b = _all(ranks)
            assert len(a) == len(b) == len(ranks[0])
            if drop_last:
                assert not set(a) & set(b) and len(set(a) | set(b)) == n - n % 2
            else:  # padded: every sample at least once, only the pad repeats
                assert set(a) | set(b) == set(range(n)) and len(a) + len(b) == n + n % 2
        # shared permutation: interleaving the ranks restores it
        perm = epoch_permutation(n, 5, 1)
        inter = [x for pair in zip(a, b) for x in pair]
        k = min(len(inter), n)  # beyond n: the wrapped pad
        assert inter[:k] == perm[:k].tolist()
    assert epoch_permutation(n, 5, 0).tolist() != epoch_permutation(n, 5, 1).tolist()
    assert sorted(epoch_permutation(n, 5, 0).tolist()) == list(range(n))


def test_resume_mid_epoch_same_world_size():
    full = _all([DistributedShardSampler(97, r, 3, seed=1) for r in range(3)])
    firsts, states = [], []
    for r in range(3):
        s = DistributedShardSampler(97, r, 3, seed=1)
        it = iter(s)
        firsts.append([next(it) for _ in range(10)])
        states.append(s.state_dict())
    assert all(st == {"epoch": 0, "offset": 30} for st in states)
    for r in range(3):
        s = DistributedShardSampler(97, r, 3, seed=1)
        s.load_state_dict(states[r])
        s.set_epoch(0)  # the training loop calls this again on resume: must keep the offset
        rest = list(s)
        assert firsts[r] + rest == full[r]
        assert list(s) == full[r]  # the offset applies to one iteration only


def test_resume_with_other_world_size_sees_each_remaining_sample_once():
    n = 103
    before = []
    for r in range(2):  # two ranks consume 7 samples each, then the job stops
        s = DistributedShardSampler(n, r, 2, seed=9)
        s.set_epoch(4)
        it = iter(s)
        before += [next(it) for _ in range(7)]
        state = s.state_dict()
    assert state == {"epoch": 4, "offset": 14}
    after = []
    for r in range(3):  # resumed on three ranks
        s = DistributedShardSampler(n, r, 3, seed=9)
        s.load_state_dict(state)
        s.set_epoch(4)
        after += list(s)
    assert not set(before) & set(after) and len(after) == len(set(after))
    assert len(set(before) | set(after)) == 14 + (n - 14) // 3 * 3  # only the short tail dropped
    s.set_epoch(5)  # another epoch: the resume offset no longer applies
    assert len(list(s)) == n // 3


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rank 2 not in"):
        DistributedShardSampler(10, 2, 2, 0)
    s = DistributedShardSampler(10, 0, 2, 0)
    with pytest.raises(ValueError, match="offset 11 outside"):
        s.load_state_dict({"epoch": 0, "offset": 11})
    with pytest.raises(ValueError, match="missing"):
        s.load_state_dict({"epoch": 0})


# ---------------------------------------------------------------- CPU loader


def _ids(batch_images, flat_ref):
    """Dataset indices of (unflipped) uint8 images, by exact match against ``flat_ref``."""
    return [int((flat_ref == x.flatten()).all(1).nonzero()[0]) for x in batch_images]


def test_loader_two_ranks_with_workers_cover_epoch_once():
    n, b = 40, 4
    ds = SyntheticDataset(n, num_classes=n, image_size=112, seed=2)  # label == index
    flat_ref = torch.stack([torch.from_numpy(ds[i][0]) for i in range(n)]).flatten(1)
    seen = []
    for r in range(2):
        loader = build_cpu_loader(ds, b, r, 2, seed=3, num_workers=2, flip=False)
        assert len(loader) == n // 2 // b
        loader.set_epoch(1)
        labels = []
        for images, lab in loader:
            # uint8 NHWC: the step copies it as is and normalizes on the device
            assert images.dtype == torch.uint8 and images.shape == (b, 112, 112, 3)
            assert images.is_contiguous() and not images.is_pinned()  # pinned on CUDA only
            assert lab.dtype == torch.int64 and lab.shape == (b,)
            assert _ids(images, flat_ref) == lab.tolist()  # pixels belong to their label's sample
            labels += lab.tolist()
        assert len(labels) == n // 2
        seen += labels
    assert sorted(seen) == list(range(n))


def test_flip_reproducible_and_exact_mirror():
    ds = SyntheticDataset(24, num_classes=24, image_size=112, seed=0)
    kw = {"rank": 0, "world_size": 1, "seed": 11}
    a = list(build_cpu_loader(ds, 6, num_workers=2, **kw))
    b = list(build_cpu_loader(ds, 6, num_workers=0, **kw))  # any worker count, same flips
    plain = list(build_cpu_loader(ds, 6, num_workers=0, flip=False, **kw))
    flipped = 0
    for (xa, la), (xb, lb), (xp, lp) in zip(a, b, plain):
        assert torch.equal(xa, xb) and torch.equal(la, lb) and torch.equal(la, lp)
        assert xa.dtype == torch.uint8 and xa.is_contiguous()
        expect = flip_mask(la.numpy(), 11, 0)  # label == dataset index here
        for img, ref, want in zip(xa, xp, expect):
            is_flip = torch.equal(img, ref.flip(1))  # (H, W, 3): dim 1 is the width
            assert is_flip == want and (is_flip or torch.equal(img, ref))
            flipped += is_flip
    assert 4 <= flipped <= 20  # p = 0.5 over 24 samples
    masks = [flip_mask(np.arange(1000), 11, e) for e in (0, 1)]
    assert 400 < masks[0].sum() < 600 and (masks[0] != masks[1]).any()
    assert np.array_equal(masks[0], flip_mask(np.arange(1000), 11, 0))


def test_loader_resume_mid_epoch_continues_exactly():
    ds = SyntheticDataset(30, num_classes=30, image_size=112, seed=1)
    full = build_cpu_loader(ds, 4, 0, 1, seed=7, num_workers=2)
    full.set_epoch(2)
    ref = list(full)
    first = build_cpu_loader(ds, 4, 0, 1, seed=7, num_workers=2)
    first.set_epoch(2)
    it = iter(first)
    got = [next(it) for _ in range(3)]  # workers have prefetched more than 3 batches
    state = first.state_dict()
    del it
    assert state == {"epoch": 2, "offset": 12}
    resumed = build_cpu_loader(ds, 4, 0, 1, seed=7, num_workers=1, persistent_workers=True)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    resumed.set_epoch(2)
    got += list(resumed)
    assert len(got) == len(ref) == len(full)
    for (x, y), (xr, yr) in zip(got, ref):
        assert torch.equal(x, xr) and torch.equal(y, yr)
    assert resumed.state_dict() == {"epoch": 2, "offset": len(full) * 4}
    resumed.set_epoch(3)  # persistent workers carry on into the next epoch
    assert sum(len(y) for _, y in resumed) == len(full) * 4


def test_loader_on_lfw_record_file(lfw_root, tmp_path):
    faces = lfw_faces(lfw_root, num_people=4, per_person=3)
    rec, idx, labels, _ = write_lfw_rec(str(tmp_path), faces)
    ds = RecordDataset(rec, idx)
    loader = build_cpu_loader(ds, 4, 0, 1, seed=0, num_workers=2, shuffle=False, flip=False)
    images, lab = next(iter(loader))
    assert lab.tolist() == labels[:4]
    expect = torch.stack([torch.from_numpy(ds[i][0]) for i in range(4)])
    assert torch.equal(images, expect)


def test_loader_rejects_wrong_image_shape():
    loader = build_cpu_loader(SyntheticDataset(8, 2, image_size=64), 4, 0, 1, 0, num_workers=0)
    with pytest.raises(ValueError, match=r"SyntheticDataset index \d+: the CPU loader needs uint8"):
        next(iter(loader))
