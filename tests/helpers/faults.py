"""Fault builders shared by the in-process fault tests (tests/unit/data/test_data_faults.py,
tests/unit/trainer/test_config_faults.py) and the launched ones (tests/integration/
test_faults.py): damaged copies of the 16-identity LFW `.rec` and bad configs on it."""

from __future__ import annotations

import json
import os
import shutil
import struct

from tests.helpers.lfw_rec import LFW16_CLASSES as NUM
from tests.helpers.paths import REPO

CONFIG = os.path.join(REPO, "configs", "lfw_demo_r18.yaml")
SEED = 2048  # configs/lfw_demo_r18.yaml


def copy_rec(src, dst):
    """`train.rec|idx` and `property` of `src` copied into a new folder `dst`; returns `dst`."""
    os.makedirs(dst)
    for name in ("train.rec", "train.idx", "property"):
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    return dst


def rec_offsets(folder):
    """{key: byte offset} from `folder/train.idx`."""
    with open(os.path.join(folder, "train.idx")) as f:
        return {int(k): int(o) for k, o in (line.split() for line in f if line.strip())}


def patch_rec(folder, offset, data):
    """Overwrites `folder/train.rec` at `offset` with `data`."""
    with open(os.path.join(folder, "train.rec"), "r+b") as f:
        f.seek(offset)
        f.write(data)


def corrupt_copy(src, dst):
    """Key 5: bad magic; key 40: JPEG bytes zeroed; key 300: part length past the file end.
    Returns {key: offset} of the three damaged records."""
    copy_rec(src, dst)
    off = rec_offsets(dst)
    patch_rec(dst, off[5], b"\0\0\0\0")
    patch_rec(dst, off[40] + 8 + 24, b"\0" * 64)  # part head (8) + IRHeader (24), then the JPEG
    size = os.path.getsize(os.path.join(dst, "train.rec"))
    patch_rec(dst, off[300] + 4, struct.pack("<I", size))  # lrec: cflag 0, length > what is left
    return {5: off[5], 40: off[40], 300: off[300]}


def open_dataset(folder):
    """`RecordDataset` of `folder/train.rec` with the 16 classes."""
    from data.datasets import RecordDataset

    return RecordDataset(os.path.join(folder, "train.rec"), num_classes=NUM)


def bad_configs(lfw16, tmp_path):
    """{case: (overrides of CONFIG, text the one-line error must hold)} on the `.rec` `lfw16`."""
    ds_json = tmp_path / "fixed_batch.json"
    ds_json.write_text(json.dumps({"train_batch_size": 100, "zero_optimization": {"stage": 2}}))
    # Its own output: the demo config's default (work_dirs/lfw_demo_r18) may hold the demo's run.
    out = f"output={tmp_path / 'out'}"
    base = [out, f"data.rec={lfw16}", f"data.num_classes={NUM}", "eval.val_targets=[]"]
    return {
        "unknown key": ([*base, "data.bogus=1"], "data.bogus"),
        "wrong type": ([*base, "data.batch_size=abc"], "data.batch_size"),
        "batch of one": ([*base, "data.batch_size=1"], "must be >= 2"),
        "num_classes": ([*base, "data.num_classes=17"], "data.num_classes"),
        "missing bin": ([*base, "eval.val_targets=[nope]"], "nope.bin"),
        "ds batch": ([*base, f"engine.ds_config={ds_json}"], "train_batch_size 100"),
    }
