"""Front ends that hang up at awkward moments, over a real socket, with both event loops.

Whatever a front end does before it goes (leave replies unread, close in the middle of
a message, send a request and close at once, pass fds that are not eventfds), its
device must accept the next front end, and the daemon must log no traceback (the
``vhostd`` fixture checks the log at teardown).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import time
from pathlib import Path

import pytest

from vhostd_proto import vhost_user as vu

R = vu.Request
PF = vu.ProtocolFeature
LOOPS = ["uvloop", "asyncio"]


def header(request: int, size: int, flags: int = 1) -> bytes:
    return vu.Header.build({"request": request, "flags": flags, "size": size})


def u64(value: int) -> bytes:
    return value.to_bytes(8, "little")


def connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(str(path))
    return s


def serves_next_front_end(path: Path) -> bool:
    with connect(path) as s:
        s.sendall(header(R.GET_FEATURES, 0))
        try:
            reply = s.recv(20)
        except (ConnectionResetError, TimeoutError):
            return False
    return len(reply) == 20 and vu.Header.parse(reply[:12]).flags == 0x5


def wait_readable(s: socket.socket) -> None:
    assert select.select([s], [], [], 5)[0], "no reply came"


@pytest.fixture(params=LOOPS)
def daemon(request: pytest.FixtureRequest, sparse_image, vhostd, tmp_path: Path):
    sock = tmp_path / "h.sock"
    d = vhostd(f"--blk-file={sparse_image()}", f"--event-loop={request.param}",
               socket_path=sock)
    return d, sock


def test_reply_left_unread_then_close_with_an_fd_in_flight(daemon) -> None:
    """The front end leaves a reply unread and closes while a message carrying an fd is
    still unread by the daemon: with uvloop the socket then reports POLLERR and the loop
    stops watching it. The daemon must still notice the hang-up, by itself."""
    d, sock = daemon
    for _ in range(3):
        s = connect(sock)
        s.sendall(header(R.SET_OWNER, 0) + header(R.GET_FEATURES, 0))
        wait_readable(s)  # the reply is in our buffer, and stays unread
        memfd = os.memfd_create("vhostd-test-log")
        os.ftruncate(memfd, 4096)
        # Stopped, the daemon sees the rest, the fd and the hang-up in one wake-up.
        d.signal(signal.SIGSTOP)
        try:
            s.sendall(header(R.SET_PROTOCOL_FEATURES, 8) + u64(0))
            socket.send_fds(s, [header(R.SET_LOG_BASE, 16) + u64(4096) + u64(0)], [memfd])
            s.close()
            os.close(memfd)
        finally:
            d.signal(signal.SIGCONT)
        # Without a new front end knocking, the daemon notices the hang-up itself.
        deadline = time.monotonic() + 5
        while "waiting for a front end" not in d.log.split("front end connected")[-1]:
            assert time.monotonic() < deadline, f"the daemon kept a front end that left:\n{d.log}"
            time.sleep(0.05)
        assert serves_next_front_end(sock)
    assert "refusing a second front end" not in d.log


def test_front_end_that_stops_reading_replies(daemon) -> None:
    d, sock = daemon
    s = connect(sock)
    s.setblocking(False)
    sent = 0
    try:
        while sent < 4 << 20:
            sent += s.send(header(R.GET_FEATURES, 0) * 64)
    except (BlockingIOError, BrokenPipeError, ConnectionResetError):
        pass  # our buffer is full, or the daemon already gave up on us
    time.sleep(0.3)
    s.close()
    deadline = time.monotonic() + 5
    while not serves_next_front_end(sock):
        assert time.monotonic() < deadline, d.log
        time.sleep(0.1)
    assert "does not read its replies" in d.log or "went away" in d.log


@pytest.mark.parametrize("cut", [3, 12, 12 + 4])
def test_front_end_that_closes_mid_message(daemon, cut: int) -> None:
    _d, sock = daemon
    with connect(sock) as s:
        memfd = os.memfd_create("vhostd-test-log")
        socket.send_fds(s, [(header(R.SET_LOG_BASE, 16) + u64(4096) + u64(0))[:cut]], [memfd])
        os.close(memfd)
    assert serves_next_front_end(sock)


def test_front_end_that_sends_a_request_and_closes(daemon) -> None:
    """The reply meets a closed socket (EPIPE / ECONNRESET): one info line, no traceback."""
    d, sock = daemon
    for _ in range(3):
        d.signal(signal.SIGSTOP)
        try:
            s = connect(sock)
            s.sendall(header(R.GET_FEATURES, 0) + header(R.GET_PROTOCOL_FEATURES, 0))
            s.close()
        finally:
            d.signal(signal.SIGCONT)
        time.sleep(0.2)
        assert serves_next_front_end(sock)
    assert "went away before its reply" in d.log or "connection error" in d.log


def _owned(s: socket.socket) -> None:
    s.sendall(header(R.SET_OWNER, 0) + header(R.GET_FEATURES, 0))
    assert len(s.recv(20)) == 20
    s.sendall(header(R.SET_FEATURES, 8) + u64(1 << vu.VHOST_USER_F_PROTOCOL_FEATURES))
    s.sendall(header(R.SET_PROTOCOL_FEATURES, 8) + u64(0))


@pytest.mark.parametrize("request_", [R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR])
@pytest.mark.parametrize("kind", ["memfd", "file", "devnull", "directory"])
def test_ring_fd_that_is_not_an_eventfd(daemon, tmp_path: Path, kind: str,
                                        request_: R) -> None:
    d, sock = daemon
    if kind == "memfd":
        fd = os.memfd_create("vhostd-test")
    elif kind == "file":
        fd = os.open(tmp_path / "plain", os.O_RDWR | os.O_CREAT)
    elif kind == "devnull":
        fd = os.open("/dev/null", os.O_RDWR)
    else:
        fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    with connect(sock) as s:
        _owned(s)
        socket.send_fds(s, [header(request_, 8) + u64(0)], [fd])
        os.close(fd)
        assert s.recv(1) == b"", "the connection stayed open"
    assert "is not an eventfd" in d.log
    assert serves_next_front_end(sock)
