"""A free TCP port for a process group's rendezvous (``MASTER_PORT``) on this host."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (the OS picks it; bind to port 0).

    Another process may take it before the caller binds it; launches on a shared host retry.
    """
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port
