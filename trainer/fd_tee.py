"""File-descriptor level copy of a process's output into the run log, native writes included.

`sys.stdout`/`sys.stderr` only see what Python prints. NCCL (`NCCL_DEBUG=WARN` lines), c10
warnings, CUDA and DeepSpeed's C++ ops write to file descriptors 1 and 2 directly, as do
forked loader workers. `FdTee` points the descriptor at a pipe; a thread copies every byte to
the original target (the terminal, a batch system's file) and, per line, to the log.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import threading
from collections.abc import Callable


def flush_native() -> None:
    """`fflush(NULL)`: C stdio buffers (printf from native code) reach their descriptors."""
    with contextlib.suppress(OSError, AttributeError):  # no C library to ask
        ctypes.CDLL(None).fflush(None)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


class FdTee:
    """Copies what is written to descriptor `fd` to `log_line` too, as text lines.

    Args:
        fd: 1 or 2.
        log_line: receives each complete line (with its newline; a last partial line at
            `close`), prefixed with `prefix`; called from the copying thread.
        prefix: e.g. "[rank 1] ".

    Attributes:
        saved: a duplicate of the original descriptor (write there to bypass the log).
    """

    def __init__(self, fd: int, log_line: Callable[[str], None], prefix: str = "") -> None:
        self.fd, self.log_line, self.prefix = fd, log_line, prefix
        self.saved = os.dup(fd)
        read_end, write_end = os.pipe()
        os.dup2(write_end, fd)
        os.close(write_end)
        self._read_end = read_end
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._copy, name=f"fd{fd}-tee", daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        pending = b""
        while True:
            ready, _, _ = select.select([self._read_end], [], [], 0.05)
            if not ready:
                if self._closing.is_set():  # restored and drained: what a forked child
                    break  # still holding the pipe writes later is not waited for
                continue
            try:
                chunk = os.read(self._read_end, 65536)
            except OSError:
                break
            if not chunk:
                break
            with contextlib.suppress(OSError):  # the original target went away: keep logging
                _write_all(self.saved, chunk)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                self.log_line(self.prefix + line.decode("utf-8", "replace") + "\n")
        if pending:
            self.log_line(self.prefix + pending.decode("utf-8", "replace") + "\n")

    def close(self) -> None:
        """Flushes C stdio, restores the descriptor, copies what the pipe still holds, stops."""
        flush_native()
        os.dup2(self.saved, self.fd)
        self._closing.set()
        self._thread.join()
        os.close(self._read_end)
        os.close(self.saved)
