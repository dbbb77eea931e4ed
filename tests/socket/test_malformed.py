"""Malformed vhost-user messages over a real socket to a real vhostd process.

Each must give a clear log line and a closed connection, and the daemon must accept
the next front end as if nothing happened.
"""

from __future__ import annotations

import array
import os
import socket
import time
from pathlib import Path

import pytest

from vhostd_proto import vhost_user as vu

R = vu.Request


def header(request: int, size: int, flags: int = 1) -> bytes:
    return vu.Header.build({"request": request, "flags": flags, "size": size})


def connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(str(path))
    return s


def send(s: socket.socket, data: bytes, nfds: int = 0) -> None:
    fds = [os.eventfd(0) for _ in range(nfds)]
    try:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        s.sendmsg([data], anc)
    finally:
        for fd in fds:
            os.close(fd)


def closed_by_peer(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def still_serves(path: Path) -> None:
    with connect(path) as s:
        send(s, header(R.GET_FEATURES, 0))
        reply = s.recv(20)
    assert vu.Header.parse(reply[:12]).flags == 0x5


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


CASES = {
    "unknown request id": (header(99, 0), 0, "unknown request id 99"),
    "known but unsupported": (header(R.SEND_RARP, 8) + bytes(8), 0, "SEND_RARP is not supported"),
    "wrong size": (header(R.SET_FEATURES, 4) + bytes(4), 0, "payload is 4 bytes, expected 8"),
    "size beyond any payload": (header(R.GET_FEATURES, 1 << 20), 0, "declares 1048576 payload"),
    "reply flag": (header(R.GET_FEATURES, 0, flags=5), 0, "with the REPLY flag"),
    "bad version": (header(R.GET_FEATURES, 0, flags=2), 0, "unsupported version"),
    "fd where none belongs": (header(R.SET_OWNER, 0), 1, "carries 1 fds, expected 0"),
    "too many fds": (header(R.SET_OWNER, 0), 9, "more than 8 fds"),
    "garbage": (bytes(range(7, 7 + 64)), 0, "front end protocol error"),
    "before owner": (header(R.SET_VRING_NUM, 8) + bytes(8), 0, "before SET_OWNER"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_message_closes_only_that_connection(case: str, sparse_image, vhostd,
                                                       tmp_path: Path) -> None:
    data, nfds, logged = CASES[case]
    sock_path = tmp_path / "m.sock"
    d = vhostd(f"--blk-file={sparse_image()}", socket_path=sock_path)
    fds_before = open_fds(d.proc.pid)
    with connect(sock_path) as s:
        send(s, data, nfds)
        assert closed_by_peer(s), "the back end kept a connection that broke the protocol"
    time.sleep(0.1)
    assert open_fds(d.proc.pid) == fds_before, "fds of the bad message leaked"
    assert logged in d.log
    assert "closing the connection" in d.log
    still_serves(sock_path)
    assert d.alive()


def test_truncated_message_then_disconnect(sparse_image, vhostd, tmp_path: Path) -> None:
    sock_path = tmp_path / "m.sock"
    d = vhostd(f"--blk-file={sparse_image()}", socket_path=sock_path)
    with connect(sock_path) as s:
        send(s, header(R.SET_MEM_TABLE, 40)[:8])
    time.sleep(0.2)
    still_serves(sock_path)
    assert "front end disconnected" in d.log


def test_second_front_end_is_refused_while_first_is_connected(sparse_image, vhostd,
                                                              tmp_path: Path) -> None:
    sock_path = tmp_path / "m.sock"
    d = vhostd(f"--blk-file={sparse_image()}", socket_path=sock_path)
    with connect(sock_path) as first:
        send(first, header(R.GET_FEATURES, 0))
        assert len(first.recv(20)) == 20
        with connect(sock_path) as second:
            assert closed_by_peer(second)
        send(first, header(R.GET_FEATURES, 0))
        assert len(first.recv(20)) == 20
    assert "refusing a second front end" in d.log
