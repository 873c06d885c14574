"""tools/prepare_lfw.py as a script on the real LFW: one fold held out, the rest packed."""

import os
import sys

from data import lfw
from data.recordio import read_property
from data.verification_bin import load_bin
from tests.helpers.launch import run_cmd
from tools import inspect_rec


def test_real_lfw_prepare_one_fold(lfw_root, tmp_path):
    out = tmp_path / "lfw1"
    cmd = [sys.executable, os.path.join("tools", "prepare_lfw.py"), "--lfw", lfw_root]
    cmd += ["--out", str(out), "--eval-folds", "10", "--workers", "2", "--no-progress"]
    done = run_cmd(cmd, timeout=600)
    assert done.returncode == 0, done.stderr
    samples, names, pairs = lfw.split_lfw(lfw_root, [10])
    assert read_property(out) == (len(names), 112, 112)
    report = inspect_rec.inspect(str(out / "train.rec"), str(out / "train.idx"), len(names))
    assert report["bad"] == [] and report["images"] == len(samples)
    assert report["sizes"] == {(112, 112): len(samples)}
    images, issame = load_bin(out / "lfw_heldout.bin")
    assert images.shape == (1200, 112, 112, 3) and issame.sum() == 300
