"""Small networking helpers shared by the launchers, the trainer and the tests (no heavy imports)."""
from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the OS picks it). Another process may take it
    before the caller binds it; callers that cannot retry use it at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
