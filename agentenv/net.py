"""Small network helpers shared by the services, the Ray actors, replay, the scripts and the tests."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now (the OS's pick). Another process may take it before it is bound:
    a caller that starts a server there retries on a failed start."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
