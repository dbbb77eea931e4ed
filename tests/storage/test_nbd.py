"""NBD storage against real servers (nbdkit, qemu-nbd): commands, errors, reconnect."""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from storage_support import Completions, Loop, NbdServer

from vhostd.storage.base import DONE, PENDING
from vhostd.storage.nbd import NbdError, NbdStorage, check_uri

pytest.importorskip("nbd")

Server = Callable[..., NbdServer]


def wait_stopped(server: NbdServer) -> None:
    assert server.proc is not None
    stat = Path(f"/proc/{server.proc.pid}/stat")
    deadline = time.monotonic() + 5
    while stat.read_text().rsplit(")", 1)[1].split()[0] != "T":
        assert time.monotonic() < deadline, "the server did not stop"
        time.sleep(0.01)


def started(s: NbdStorage, loop: Loop) -> Completions:
    done = Completions()
    s.on_complete = done
    s.start(loop)
    return done


def roundtrip(s: NbdStorage, loop: Loop, done: Completions, offset: int = 0) -> None:
    blob = os.urandom(8192)
    assert s.writev([memoryview(blob[:4096]), memoryview(blob[4096:])], offset, "w") == PENDING
    loop.run_until(lambda: "w" in done.done)
    buf = bytearray(8192)
    assert s.readv([memoryview(buf)[:1000], memoryview(buf)[1000:]], offset, "r") == PENDING
    loop.run_until(lambda: "r" in done.done)
    assert done.done == {"w": 0, "r": 0}
    assert buf == blob
    done.done.clear()


@pytest.mark.parametrize("uri", ["nbd://", "http://x/y", "nbd+unix:///x", "nbd://h:port/x",
                                 "nbd+unix://host/x?socket=/s"])
def test_bad_uris(uri: str) -> None:
    with pytest.raises(NbdError):
        check_uri(uri)


def test_unreachable_server_and_missing_export(tmp_path: Path, nbd_server: Server) -> None:
    with pytest.raises(NbdError, match="connect"):
        NbdStorage(f"nbd+unix:///?socket={tmp_path}/nobody.sock")
    with pytest.raises(NbdError):
        NbdStorage("nbd://127.0.0.1:1/x")
    img = tmp_path / "e.img"
    img.write_bytes(bytes(1 << 20))
    server = nbd_server("qemu-nbd", "-x", "disk", str(img))
    with pytest.raises(NbdError):
        NbdStorage(f"nbd+unix:///other?socket={server.sock}")
    s = NbdStorage(f"nbd+unix:///disk?socket={server.sock}")
    assert s.size() == 1 << 20
    s.close()


def test_memory_export_commands(loop: Loop, nbd_server: Server) -> None:
    server = nbd_server("nbdkit", "memory", "16M")
    s = NbdStorage(server.uri)
    try:
        assert s.size() == 16 << 20 and not s.read_only
        done = started(s, loop)
        roundtrip(s, loop, done, 65536)
        assert s.flush("f") in (DONE, PENDING)
        assert s.write_zeroes(65536, 4096, True, "z") == PENDING
        assert s.discard(1 << 20, 4096, "d") in (DONE, PENDING)
        loop.run_until(lambda: "z" in done.done)
        buf = bytearray(4096)
        s.readv([memoryview(buf)], 65536, "r")
        loop.run_until(lambda: "r" in done.done)
        assert buf == bytes(4096)
        assert all(e == 0 for e in done.done.values())
        assert s.in_flight() == 0
    finally:
        s.close()


def test_qemu_nbd_file_and_read_only(tmp_path: Path, loop: Loop, nbd_server: Server) -> None:
    img = tmp_path / "q.img"
    img.write_bytes(os.urandom(1 << 20))
    server = nbd_server("qemu-nbd", str(img))
    s = NbdStorage(server.uri)
    try:
        done = started(s, loop)
        roundtrip(s, loop, done, 4096)
    finally:
        s.close()
    ro = nbd_server("qemu-nbd", "-r", str(img))
    s = NbdStorage(ro.uri)
    try:
        assert s.read_only
        with pytest.raises(OSError):
            s.writev([memoryview(bytes(512))], 0, "w")
    finally:
        s.close()


def test_error_filter_fails_those_requests_only(loop: Loop, nbd_server: Server) -> None:
    server = nbd_server("nbdkit", "--filter=error", "memory", "16M", "error=EIO",
                        "error-pread-rate=100%")
    s = NbdStorage(server.uri)
    try:
        done = started(s, loop)
        assert s.writev([memoryview(bytes(4096))], 0, "w") == PENDING
        assert s.readv([memoryview(bytearray(4096))], 0, "r") == PENDING
        loop.run_until(lambda: len(done.done) == 2)
        assert done.done == {"w": 0, "r": errno.EIO}
    finally:
        s.close()


def test_a_server_that_shuts_down_but_stays_connected(loop: Loop, nbd_server: Server,
                                                      tmp_path: Path) -> None:
    """ESHUTDOWN answers on a connection the server keeps open: the requests are sent
    again on a new connection, fail with EIO once the server has said nothing else for
    the reconnect delay, and work again when it answers (before, they waited forever)."""
    trigger = tmp_path / "shutting-down"
    trigger.touch()
    server = nbd_server("nbdkit", "--filter=error", "memory", "16M", "error=ESHUTDOWN",
                        "error-pread-rate=100%", f"error-file={trigger}")
    s = NbdStorage(server.uri, reconnect_delay=1)
    try:
        done = started(s, loop)
        t0 = time.monotonic()
        assert s.readv([memoryview(bytearray(4096))], 0, "r") == PENDING
        loop.run_until(lambda: "r" in done.done, timeout=10)
        assert done.done["r"] == errno.EIO
        assert 1 <= time.monotonic() - t0 < 8
        # Back to normal (a fresh server: nbdkit may not answer a connection opened
        # while it was refusing everything).
        trigger.unlink()
        before = list(s.conns)
        server.kill()
        server.start()
        loop.run_until(lambda: any(c.ready and c not in before for c in s.conns), timeout=10)
        assert s.readv([memoryview(bytearray(4096))], 0, "r2") == PENDING
        loop.run_until(lambda: "r2" in done.done, timeout=10)
        assert done.done["r2"] == 0
    finally:
        s.close()


def test_delay_filter_keeps_many_in_flight(loop: Loop, nbd_server: Server) -> None:
    server = nbd_server("nbdkit", "--filter=delay", "memory", "16M", "rdelay=50ms")
    s = NbdStorage(server.uri)
    try:
        done = started(s, loop)
        t0 = time.monotonic()
        for i in range(16):
            assert s.readv([memoryview(bytearray(4096))], 4096 * i, i) == PENDING
        assert s.in_flight() == 16
        loop.run_until(lambda: len(done.done) == 16)
        # nbdkit serves them in parallel: far less than 16 x 50 ms.
        assert time.monotonic() - t0 < 0.5
    finally:
        s.close()


def test_server_restarted_within_the_delay(tmp_path: Path, loop: Loop,
                                           nbd_server: Server) -> None:
    img = tmp_path / "r.img"
    img.write_bytes(bytes(1 << 20))
    server = nbd_server("nbdkit", "file", str(img))
    s = NbdStorage(server.uri, reconnect_delay=10)
    try:
        done = started(s, loop)
        server.kill()
        blob = os.urandom(4096)
        assert s.writev([memoryview(blob)], 8192, "w") == PENDING
        with pytest.raises(TimeoutError):
            loop.run_until(lambda: "w" in done.done, timeout=1.0)  # waits, does not fail
        server.start()
        loop.run_until(lambda: "w" in done.done, timeout=8)
        assert done.done["w"] == 0
        assert img.read_bytes()[8192:8192 + 4096] == blob
    finally:
        s.close()


def test_server_gone_longer_than_the_delay(loop: Loop, nbd_server: Server) -> None:
    server = nbd_server("nbdkit", "memory", "1M")
    s = NbdStorage(server.uri, reconnect_delay=1)
    try:
        done = started(s, loop)
        server.kill()
        assert s.readv([memoryview(bytearray(512))], 0, "r") == PENDING
        loop.run_until(lambda: "r" in done.done, timeout=6)
        assert done.done["r"] == errno.EIO
        with pytest.raises(OSError):
            s.readv([memoryview(bytearray(512))], 0, "r2")
        server.start()  # back: requests work again
        loop.run_until(lambda: any(c.ready for c in s.conns), timeout=6)
        assert s.readv([memoryview(bytearray(512))], 0, "r3") == PENDING
        loop.run_until(lambda: "r3" in done.done)
        assert done.done["r3"] == 0
    finally:
        s.close()


def test_stopped_server_blocks_only_its_requests(loop: Loop, nbd_server: Server) -> None:
    a = nbd_server("nbdkit", "memory", "1M")
    b = nbd_server("nbdkit", "memory", "1M")
    sa, sb = NbdStorage(a.uri), NbdStorage(b.uri)
    try:
        da, db = started(sa, loop), started(sb, loop)
        a.signal(signal.SIGSTOP)
        wait_stopped(a)
        try:
            sa.readv([memoryview(bytearray(512))], 0, "stuck")
            t0 = time.monotonic()
            sb.readv([memoryview(bytearray(512))], 0, "ok")
            loop.run_until(lambda: "ok" in db.done)
            assert time.monotonic() - t0 < 0.5 and "stuck" not in da.done
        finally:
            a.signal(signal.SIGCONT)
        loop.run_until(lambda: "stuck" in da.done)
    finally:
        sa.close()
        sb.close()


def test_refresh_size_sees_a_shrunk_export(tmp_path: Path, loop: Loop,
                                           nbd_server: Server) -> None:
    img = tmp_path / "s.img"
    img.write_bytes(bytes(2 << 20))
    server = nbd_server("nbdkit", "file", str(img))
    s = NbdStorage(server.uri)
    try:
        done = started(s, loop)
        os.truncate(img, 1 << 20)
        # The served connection still believes 2 MiB: the server fails the read.
        s.readv([memoryview(bytearray(4096))], (2 << 20) - 4096, "beyond")
        loop.run_until(lambda: "beyond" in done.done)
        assert done.done["beyond"] != 0
        results: list[int] = []
        s.refresh_size(results.append)
        loop.run_until(lambda: bool(results))
        assert results == [0] and s.size() == 1 << 20
    finally:
        s.close()


def test_worker_spec_opens_its_own_connection(loop: Loop, nbd_server: Server) -> None:
    server = nbd_server("nbdkit", "memory", "1M")
    s = NbdStorage(server.uri)
    try:
        spec, fds = s.worker_spec()
        assert fds == []
        w = NbdStorage.from_spec(spec, [])
        try:
            done = started(w, loop)  # connects asynchronously; requests wait for it
            roundtrip(w, loop, done)
        finally:
            w.close()
    finally:
        s.close()
