"""Whether a program listens on a unix socket yet.

A server's socket file appears at bind(), before listen(); a client that connects
in between is refused. Waiting for the file is not enough: wait for a connection.
"""

from __future__ import annotations

import socket
from pathlib import Path


def accepts(path: Path) -> bool:
    """True once a connection to ``path`` is accepted (the probe is closed at once)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return False
    return True
