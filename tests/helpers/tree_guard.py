"""Snapshots of a file tree, for the session guard in tests/conftest.py: the suite must not
change the checkout (tests write under `tmp_path` or the test cache)."""

from __future__ import annotations

import os

from tests.helpers.paths import REPO

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
