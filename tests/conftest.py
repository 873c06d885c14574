"""Shared pytest setup: the `gpu` marker skips without CUDA; DeepSpeed runs on CPU here; the
suite fails if it changed the checkout's tree (tests write under `tmp_path` or the test cache).
Session fixtures used across tests/unit and tests/integration live here; helpers that are not
fixtures live in tests/helpers/ (tests/README.md)."""

import os

import pytest
import torch

from tests.helpers.lfw_rec import write_lfw16
from tests.helpers.paths import LFW_ROOT, REPO, TEST_CACHE, TORCH_EXTENSIONS
from tests.helpers.tree_guard import tree_changes, tree_snapshot

# DeepSpeed picks its accelerator at import; without CUDA it must be told to use the CPU one.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", TORCH_EXTENSIONS)


@pytest.fixture(scope="session", autouse=True)
def _checkout_unchanged():
    """Fails the suite when a test wrote into (or deleted from) the checkout: a test's output
    belongs under its `tmp_path`, shared built data under TEST_CACHE."""
    before = tree_snapshot()
    yield
    changes = tree_changes(before, tree_snapshot())
    if changes:
        shown = "\n  ".join(changes[:20]) + ("\n  ..." if len(changes) > 20 else "")
        pytest.fail(f"the test session changed the checkout {REPO}:\n  {shown}", pytrace=False)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def lfw_root():
    """Path to the real LFW data (../shared/data/lfw); the tests that need it fail without it."""
    if not os.path.isdir(os.path.join(LFW_ROOT, "lfw-deepfunneled")):
        pytest.fail(f"LFW data not found at {LFW_ROOT} (set ARCSCALE_LFW)")
    return LFW_ROOT


@pytest.fixture(scope="module")
def one_thread():
    """Small CPU ops run 5-10x faster single-threaded on a busy 2-core machine (no OpenMP spin);
    use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def lfw_demo(lfw_root):
    """The demo's LFW split (tools/prepare_lfw.py: train.rec + identity-disjoint
    lfw_heldout.bin) under TEST_CACHE, built once (~40 s) and reused while up to date."""
    from tools import prepare_lfw

    out = os.path.join(TEST_CACHE, "lfw_demo")
    assert prepare_lfw.main(["--lfw", lfw_root, "--out", out, "--no-progress"]) == 0
    return out


@pytest.fixture(scope="session")
def lfw16(lfw_root, tmp_path_factory):
    """The 16-identity LFW `.rec` (tests/helpers/lfw_rec.py `write_lfw16`: 481 real faces,
    insightface layout) built once per session; tests read it and copy it before changing it."""
    return write_lfw16(lfw_root, str(tmp_path_factory.mktemp("lfw16")))
