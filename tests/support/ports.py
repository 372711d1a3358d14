"""Free TCP ports on loopback for servers the tests start."""
from __future__ import annotations

import socket


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (bound once and released; the caller binds it next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
