"""Shared pytest setup: the `gpu` marker skips without CUDA; DeepSpeed runs on CPU here."""

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
