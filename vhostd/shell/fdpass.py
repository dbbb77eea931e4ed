"""File descriptors over unix sockets (SCM_RIGHTS), for every channel of the shell:
front-end connections and queue-worker channels."""

from __future__ import annotations

import array
import socket


def anc_space(max_fds: int) -> int:
    """Ancillary buffer size that receives up to ``max_fds`` fds."""
    return socket.CMSG_SPACE(max_fds * 4)


def take_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds received in ``ancdata`` (now the caller's to close)."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds


def fds_ancillary(fds: list[int]) -> list[tuple[int, int, array.array[int]]]:
    """Ancillary data that sends ``fds`` (nothing for none)."""
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
