"""Tools never overwrite their source (#32 item 3): `same_place` sees symlinks and inodes, and
`check_output_folder` (shuffle_rec, clean_subcenters) refuses a link to the source folder."""

import os

import pytest

from data.atomic import same_place
from data.rec_copy import check_output_folder


def test_same_place_resolves_links_dots_and_inodes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (tmp_path / "link").symlink_to(src)
    assert same_place(tmp_path / "link", src)
    assert same_place(tmp_path / "src" / ".." / "src", src)
    (src / "a").write_text("x")
    os.link(src / "a", tmp_path / "hard")  # one inode, two names
    assert same_place(tmp_path / "hard", src / "a")
    assert not same_place(tmp_path / "other", src)  # not there (yet): not the same place
    assert not same_place(tmp_path / "link" / "sub", src)


def test_output_folder_that_links_to_the_source_is_refused(tmp_path):
    src = tmp_path / "data"
    src.mkdir()
    (tmp_path / "link").symlink_to(src)
    with pytest.raises(ValueError, match="must differ from the source folder"):
        check_output_folder(str(src / "train.rec"), str(tmp_path / "link"))
    assert check_output_folder(str(src / "train.rec"), str(tmp_path / "out")) == str(src)
