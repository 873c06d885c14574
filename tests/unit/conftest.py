"""Fixtures shared by unit tests of several packages (tests/conftest.py has the session-wide
ones: lfw_root, lfw_demo, lfw16, one_thread)."""

import os

import pytest


@pytest.fixture(scope="session")
def ijb_release(lfw_root, tmp_path_factory):
    """A synthetic IJB-C release from real LFW faces (tests/helpers/ijb_release.py): (root,
    Truth). Read by the data (meta parsing), evaluation (pooling) and tools (eval_ijb) tests;
    a test that changes it works on a copy."""
    from tests.helpers.ijb_release import build_release

    root = str(tmp_path_factory.mktemp("IJB_release") / "IJBC")
    return root, build_release(lfw_root, root)


@pytest.fixture
def umask_027():
    """Runs the test with umask 027, so default permissions differ from mkstemp's 0600 and from
    a hard-coded 0644."""
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)
