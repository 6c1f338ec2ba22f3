"""A free TCP port on this machine, for servers the service starts on its own (the demo's HTTP
proxy, HAProxy's stats and metrics listeners): the operating system picks one that is unused now."""

from __future__ import annotations

import socket


def free_local_port() -> int:
    """A port no process listens on now (another may take it before it is bound: bind it soon)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
