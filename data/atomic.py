"""Atomic file writes: write under a temporary name in the target's folder, then ``os.replace``.

A reader (or a crash) never sees a partial file: ``path`` holds either its old content or the
complete new one. The one helper for every file the project writes that others read (configs,
checkpoints, head shards, ``.rec``/``.bin`` datasets, ONNX exports, index caches, manifests).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["atomic_path", "same_place", "write_text_atomic"]


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike[str], fsync: bool = True) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on a clean exit move it onto ``path``.

    The temporary name is hidden (``.NAME.PID-RANDOM.tmpEXT``, keeping the extension for writers
    that add or check one, e.g. ``np.save``) and unique per process, so ranks or nodes sharing a
    folder do not collide. The caller creates the file with ``open()`` (or ``torch.save``...), so
    it gets the user's umask permissions. On an exception (KeyboardInterrupt included) the
    temporary file is removed and ``path`` is left as it was.

    Args:
        path: final file path; its folder must exist.
        fsync: flush the data to disk before the rename (so a crash cannot leave an empty file).
    Yields:
        the temporary path (str).
    Raises:
        OSError: from the rename (e.g. ``path`` is a directory); the temporary file is removed.
    """
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    ext = os.path.splitext(name)[1]
    tmp = os.path.join(folder, f".{name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{ext}")
    try:
        yield tmp
        if fsync:
            _fsync(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def write_text_atomic(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (see ``atomic_path``)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding=encoding) as f:
        f.write(text)


def same_place(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether paths ``a`` and ``b`` name one file or folder: the same real path (symlinks and
    ``..`` resolved) or, when both exist, the same inode (bind mounts, hard links). The check
    every tool runs before writing where it reads: comparing ``abspath`` let a symlink to the
    source folder pass, and the source was overwritten."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): not the same place
        return False


def make_writable_folder(path: str | os.PathLike[str]) -> None:
    """Create folder `path` (and its parents) and prove a file can be written in it.

    Raises:
        OSError: the folder cannot be created, or a temporary file cannot be written there.
    """
    import tempfile

    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
        pass
