"""perf/sync_probe.py: syncs attributed to project call sites (a head backward included) and the
compiled-head-kernel verdict of the GPU check, driven on CPU."""

from __future__ import annotations

import os
import threading
import warnings

import torch

from perf.sync_probe import SyncProbe, attribute, kernel_verdict, summarize
from tests.helpers.paths import REPO

SITE = os.path.join(REPO, ".venv", "lib", "python3.11", "site-packages")
SYNC = "called a synchronizing CUDA operation"

# Compiled under a file name inside heads/, so its frames look like the head's own code.
_HEAD_SRC = """
import warnings
import torch

class Sum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.sum()

    @staticmethod
    def backward(ctx, g):
        warnings.warn(SYNC)
        return g.expand(3)
"""


def test_attribution_blames_the_innermost_caller_outside_torch():
    step = (os.path.join(REPO, "trainer", "step.py"), 140, "train_step")
    torch_fn = (os.path.join(SITE, "torch", "nn", "functional.py"), 10, "softmax")
    head = (os.path.join(REPO, "heads", "dist_softmax.py"), 88, "backward")
    ds = (os.path.join(SITE, "deepspeed", "runtime", "engine.py"), 5, "step")
    bwd = [(os.path.join(SITE, "torch", "autograd", "__init__.py"), 300, "backward")]
    assert attribute([step, head, torch_fn], REPO) == (
        "ours",
        "heads/dist_softmax.py:88 (backward)",
    )
    assert attribute([step, ds, torch_fn], REPO) == (
        "deepspeed",
        "trainer/step.py:140 (train_step)",
    )
    assert attribute([step, ds] + bwd, REPO) == ("backward_cpp", "trainer/step.py:140 (train_step)")
    assert attribute([torch_fn], REPO) == (
        "torch",
        "-",
    )  # e.g. an autograd thread, no frame of ours


def test_probe_attributes_a_sync_inside_a_head_backward_on_another_thread():
    scope = {"SYNC": SYNC}
    exec(compile(_HEAD_SRC, os.path.join(REPO, "heads", "fake_head.py"), "exec"), scope)
    modes, other = [], []
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *rest: other.append(str(message))
        with SyncProbe(REPO, set_mode=modes.append) as probe:
            x = torch.ones(3, requires_grad=True)

            def backward():  # CUDA runs a backward on the autograd engine's own thread
                scope["Sum"].apply(x).backward()

            t = threading.Thread(target=backward)
            t.start()
            t.join()
            warnings.warn("something else", stacklevel=1)  # not a sync: passed on
    assert modes == ["warn", 0]
    assert probe.records == [("ours", "heads/fake_head.py:12 (backward)")]
    assert other == ["something else"]
    summary = summarize(probe.records * 3, steps=1, allowed=2.0)
    assert summary["status"] == "FAIL" and summary["ours_per_step"] == 3.0
    assert summary["sites"] == {"ours: heads/fake_head.py:12 (backward)": 3}
    assert summarize(probe.records, steps=1, allowed=2.0)["status"] == "ok"


def test_kernel_verdict_fails_on_any_eager_fallback():
    good = {"radial": (True, False), "sgd": (True, False)}
    assert kernel_verdict(True, good, [])["status"] == "ok"
    assert kernel_verdict(False, good, [])["status"] == "FAIL"  # head built eager on CUDA
    assert kernel_verdict(True, {**good, "sgd": (True, True)}, [])["status"] == "FAIL"
    assert kernel_verdict(True, {**good, "sgd": (False, False)}, [])["status"] == "FAIL"
    bad = kernel_verdict(True, good, ["torch.compile of _sgd_rows_math failed"])
    assert bad["status"] == "FAIL" and "_sgd_rows_math" in bad["why"]
