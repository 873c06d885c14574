"""Integration tests: each starts the trainer, a launcher (`accelerate launch`, `deepspeed`,
sshd/pdsh) or a tool as a subprocess (tests/helpers/launch.py). Every test collected under this
folder is marked `slow` here, so `pytest -m "not slow"` (the inner loop) leaves them out and no
file needs its own mark."""

import os

import pytest

from tests.helpers.launch import stop_launches

_HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    # This hook sees the whole session's items: mark only the ones collected from this folder.
    slow = pytest.mark.slow
    for item in items:
        if os.path.commonpath([str(item.path), _HERE]) == _HERE:
            item.add_marker(slow)


@pytest.fixture(autouse=True)
def _no_stray_launches():
    """A failing test must not leave its `Launch`es training in the background."""
    yield
    stop_launches()


@pytest.fixture(scope="session")
def lfw16_heldout(lfw16, lfw_demo, tmp_path_factory):
    """The 16-identity `.rec` (people with 20-60 images: a loss that can fall in 20 steps) beside
    the demo's identity-disjoint `lfw_heldout.bin` for the verification callback (links to both,
    so the shared `lfw16` folder is left as it is)."""
    out = tmp_path_factory.mktemp("lfw16_heldout")
    for name in os.listdir(lfw16):
        os.symlink(os.path.join(lfw16, name), out / name)
    os.symlink(os.path.join(lfw_demo, "lfw_heldout.bin"), out / "lfw_heldout.bin")
    return str(out)
