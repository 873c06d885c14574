"""The session guard of tests/conftest.py (tests/helpers/tree_guard.py) sees every kind of
change to a tree."""

import os

from tests.helpers.tree_guard import tree_changes, tree_snapshot


def test_snapshot_sees_added_changed_removed_but_not_caches(tmp_path):
    (tmp_path / "kept.txt").write_text("a")
    (tmp_path / "gone.txt").write_text("b")
    (tmp_path / "work_dirs").mkdir()
    before = tree_snapshot(str(tmp_path))
    (tmp_path / "kept.txt").write_text("longer")
    os.remove(tmp_path / "gone.txt")
    (tmp_path / "work_dirs" / "run").mkdir()
    (tmp_path / "work_dirs" / "run" / "training.log").write_text("x")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "m.pyc").write_text("cache")
    changes = tree_changes(before, tree_snapshot(str(tmp_path)))
    want = ["added work_dirs/run/training.log", "changed kept.txt", "removed gone.txt"]
    assert changes == want
    assert tree_changes(before, before) == []
