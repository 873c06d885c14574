"""Data faults in this process (docs/reliability.md): corrupt records stop the loader naming file,
key and offset, or are skipped and counted with `data.skip_corrupt`; a truncated `.rec` or a bad
label stops at startup; a resumed sampler hands out the same global batch for any world size of
equal global batch. On damaged copies of the 16-identity LFW `.rec` (tests/helpers/faults.py);
the launched fault tests are in tests/integration/test_faults.py.
"""

import os
import re
import struct

import pytest

from tests.helpers.faults import (
    CONFIG,
    NUM,
    SEED,
    copy_rec,
    corrupt_copy,
    open_dataset,
    patch_rec,
    rec_offsets,
)


@pytest.mark.parametrize("world,batch", [(1, 48), (2, 24), (3, 16), (2, 16)])
def test_resumed_global_batch_is_the_same_for_equal_global_batch(world, batch):
    """After a resume at global offset 96, the union of the ranks' next batches is positions
    96..96+W*B of the epoch permutation: the same samples for any W with equal W*B (the
    condition for an identical data order across world sizes; 2x16 shows the difference)."""
    from data.sampler import DistributedShardSampler, epoch_permutation

    got = []
    for rank in range(world):
        sampler = DistributedShardSampler(481, rank, world, SEED)
        sampler.load_state_dict({"epoch": 0, "offset": 96})
        got += list(iter(sampler))[:batch]
    perm = epoch_permutation(481, SEED, 0)
    assert sorted(got) == sorted(perm[96 : 96 + world * batch].tolist())
    assert (sorted(got) == sorted(perm[96:144].tolist())) == (world * batch == 48)


def test_corrupt_records_stop_naming_file_key_offset(lfw16, tmp_path):
    from data.datasets import CorruptRecordError

    bad = corrupt_copy(lfw16, str(tmp_path / "bad"))
    ds = open_dataset(str(tmp_path / "bad"))
    for key, offset in bad.items():
        with pytest.raises(CorruptRecordError) as info:
            ds[ds.keys.index(key)]
        msg = str(info.value)
        assert "train.rec" in msg and f"key {key}" in msg and str(offset) in msg, msg
    assert ds[ds.keys.index(6)][1] == open_dataset(lfw16)[ds.keys.index(6)][1]


def test_skip_corrupt_replaces_counts_and_keeps_batch_size(lfw16, tmp_path):
    from data.loader import build_cpu_loader

    bad = corrupt_copy(lfw16, str(tmp_path / "bad"))
    ds = open_dataset(str(tmp_path / "bad"))
    strict = build_cpu_loader(ds, 32, 0, 1, SEED, num_workers=0)
    with pytest.raises(ValueError, match="offset"):
        for _ in strict:
            pass
    loader = build_cpu_loader(ds, 32, 0, 1, SEED, num_workers=1, skip_corrupt=True)
    loader.set_epoch(0)
    sizes = [len(labels) for _, labels in loader]
    assert sizes == [32] * (len(ds) // 32)
    from data.sampler import epoch_permutation

    seen = set(epoch_permutation(len(ds), SEED, 0)[: len(sizes) * 32].tolist())
    want = sorted(k for k in bad if ds.keys.index(k) in seen)
    got = sorted(int(re.search(r"key (\d+)", m).group(1)) for m in loader.corrupt)
    assert got == want


def test_truncated_rec_and_bad_label_stop_at_startup(lfw16, tmp_path):
    from trainer.config import ConfigError, load_config
    from trainer.data_setup import build_dataset

    cut = copy_rec(lfw16, str(tmp_path / "cut"))
    off = rec_offsets(cut)
    with open(os.path.join(cut, "train.rec"), "r+b") as f:
        f.truncate(off[200] + 100)
    cfg = load_config(CONFIG, [f"data.rec={cut}", f"data.num_classes={NUM}"])
    with pytest.raises(
        ConfigError, match=r"train\.idx:\d+: key 201 offset \d+ is past the end of \S+train\.rec"
    ):
        build_dataset(cfg)

    lab = copy_rec(lfw16, str(tmp_path / "label"))
    patch_rec(lab, rec_offsets(lab)[77] + 8 + 4, struct.pack("<f", float(NUM + 4)))
    cfg = load_config(CONFIG, [f"data.rec={lab}", f"data.num_classes={NUM}"])
    with pytest.raises(ConfigError, match=rf"key 77: label {NUM + 4} outside \[0, {NUM}\)"):
        build_dataset(cfg)
    # past the sampled scan, the label stops the loader at first sight, skip_corrupt or not
    ds = open_dataset(lab)
    assert ds.scan_labels(max_keys=3) == 3
    from data.loader import build_cpu_loader

    loader = build_cpu_loader(ds, 32, 0, 1, SEED, num_workers=0, shuffle=False, skip_corrupt=True)
    with pytest.raises(ValueError, match=r"key 77: label"):
        for _ in loader:
            pass
