"""Shared pytest setup: the `gpu` marker skips without CUDA; DeepSpeed runs on CPU here; the
suite fails if it changed the checkout's tree (tests write under `tmp_path` or the test cache)."""

import os

import pytest
import torch

from data.lfw import DEFAULT_LFW

# DeepSpeed picks its accelerator at import; without CUDA it must be told to use the CPU one.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/arcscale/torch_extensions")
)

LFW_ROOT = DEFAULT_LFW
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Built data that several test runs reuse (the LFW demo split, ~40 s to build): outside the
# checkout, whose work_dirs/ belong to the user's own runs (README's command 1).
TEST_CACHE = os.environ.get("ARCSCALE_TEST_CACHE", os.path.expanduser("~/.cache/arcscale/tests"))
# Caches that tools write into the working directory by design, never a test's output.
_TREE_IGNORED = {
    ".git",
    ".venv",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    ".hypothesis",
}


def tree_snapshot(root=REPO):
    """{relative path: (size, mtime_ns)} of every file under `root` but VCS/tool caches."""
    files = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [
            d for d in dirnames if d not in _TREE_IGNORED and not d.endswith(".egg-info")
        ]
        for name in filenames:
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:  # removed while walking: it will show as a change
                continue
            files[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns)
    return files


def tree_changes(before, after):
    """Sorted 'added X' / 'removed X' / 'changed X' lines between two `tree_snapshot`s."""
    lines = [f"added {p}" for p in after.keys() - before.keys()]
    lines += [f"removed {p}" for p in before.keys() - after.keys()]
    lines += [f"changed {p}" for p in before.keys() & after.keys() if before[p] != after[p]]
    return sorted(lines)


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
