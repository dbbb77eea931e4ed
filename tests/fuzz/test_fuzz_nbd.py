"""Fuzz target: an NBD member's storage (NbdStorage) against a hostile NBD server.

libnbd parses the protocol; what vhostd adds on top is the request bookkeeping, the
reconnects and the resending. The server here completes the handshake properly, then
answers each request as the example says: properly, with an error code, with a wrong
cookie or magic, with a reply cut short, with garbage, or not at all (it hangs up).
Properties: every request completes exactly once, within the reconnect delay and a
margin, with 0 or an errno; a read that succeeds brings the data the server holds; no
traceback is logged; the storage closes cleanly afterwards.
"""

from __future__ import annotations

import os
import socket
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fuzz_support import CATCHER, count
from hypothesis import given, settings
from hypothesis import strategies as st

nbd_storage = pytest.importorskip("vhostd.storage.nbd")
if nbd_storage.nbd is None:
    pytest.skip("libnbd's Python binding (python3-libnbd) is not installed",
                allow_module_level=True)

from vhostd.shell.worker import EpollLoop  # noqa: E402
from vhostd.storage.base import PENDING  # noqa: E402

SIZE = 1 << 20
RECONNECT_DELAY = 0.3
# Each example reconnects a few times at most: fewer of them than the other targets.
EXAMPLES = (int(os.environ.get("VHOSTD_FUZZ_EXAMPLES", "20000"))
            if os.environ.get("VHOSTD_FUZZ", "") == "long" else 25)

NBDMAGIC, IHAVEOPT, REPLY_MAGIC = 0x4E42444D41474943, 0x49484156454F5054, 0x3E889045565A9
REQUEST_MAGIC, SIMPLE_REPLY_MAGIC = 0x25609513, 0x67446698
OPT_ABORT, OPT_INFO, OPT_GO = 2, 6, 7
REP_ACK, REP_INFO, REP_ERR_UNSUP = 1, 3, 0x80000001
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = 0, 1, 2, 3
FLAG_HAS_FLAGS, FLAG_SEND_FLUSH = 1, 4


def _recv(conn: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = conn.recv(n - len(out))
        if not chunk:
            raise EOFError
        out += chunk
    return out


class HostileServer:
    """An NBD server on a unix socket, one connection at a time, answering requests as
    ``script`` says (then properly, once the script is used up)."""

    def __init__(self, path: Path, script: list[Any]) -> None:
        self.path = path
        self.script = list(script)
        self.data = bytearray(os.urandom(SIZE))
        self.lock = threading.Lock()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                self._session(conn)
            except (OSError, EOFError):
                pass
            finally:
                conn.close()

    def _session(self, conn: socket.socket) -> None:
        conn.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 1 | 2))  # fixed newstyle
        _recv(conn, 4)
        while True:
            _magic, opt, length = struct.unpack(">QII", _recv(conn, 16))
            _recv(conn, length)
            if opt == OPT_ABORT:
                return
            if opt in (OPT_INFO, OPT_GO):
                info = struct.pack(">HQH", 0, SIZE, FLAG_HAS_FLAGS | FLAG_SEND_FLUSH)
                conn.sendall(struct.pack(">QIII", REPLY_MAGIC, opt, REP_INFO, len(info)) + info
                             + struct.pack(">QIII", REPLY_MAGIC, opt, REP_ACK, 0))
                if opt == OPT_GO:
                    break
                continue
            conn.sendall(struct.pack(">QIII", REPLY_MAGIC, opt, REP_ERR_UNSUP, 0))
        while True:
            magic, _flags, cmd, cookie, offset, length = struct.unpack(">IHHQQI",
                                                                       _recv(conn, 28))
            if magic != REQUEST_MAGIC or cmd == CMD_DISC:
                return
            payload = _recv(conn, length) if cmd == CMD_WRITE else b""
            with self.lock:
                how = self.script.pop(0) if self.script else ("ok",)
            kind = how[0]
            if kind == "close":
                return
            if kind == "garbage":
                conn.sendall(how[1])
                return
            if kind == "error":
                conn.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, how[1], cookie))
                continue
            if kind == "wrong-cookie":
                cookie ^= 0xDEAD_BEEF
            magic = 0x12345678 if kind == "wrong-magic" else SIMPLE_REPLY_MAGIC
            body = b""
            if cmd == CMD_READ:
                with self.lock:
                    body = bytes(self.data[offset:offset + length])
            elif cmd == CMD_WRITE:
                with self.lock:
                    self.data[offset:offset + length] = payload
            reply = struct.pack(">IIQ", magic, 0, cookie) + body
            if kind == "short":
                conn.sendall(reply[:len(reply) // 2])
                return
            conn.sendall(reply)


behaviour = st.one_of(
    st.just(("ok",)),
    st.just(("close",)),
    st.tuples(st.just("error"), st.sampled_from([1, 5, 12, 22, 28, 108])
              | st.integers(1, 0xFFFFFFFF)),
    st.just(("wrong-cookie",)),
    st.just(("wrong-magic",)),
    st.just(("short",)),
    st.tuples(st.just("garbage"), st.binary(min_size=1, max_size=40)),
)
request = st.tuples(st.sampled_from(["read", "write", "flush"]),
                    st.integers(0, SIZE // 512 - 16), st.integers(1, 16))


@settings(max_examples=EXAMPLES)
@given(script=st.lists(behaviour, max_size=4), requests=st.lists(request, min_size=1,
                                                                   max_size=4))
def test_nbd_storage_survives_a_hostile_server(script: list[Any],
                                               requests: list[tuple[str, int, int]]) -> None:
    count("nbd storage", len(requests))
    with tempfile.TemporaryDirectory(prefix="vfz-") as d:
        server = HostileServer(Path(d) / "nbd.sock", script)
        storage = nbd_storage.NbdStorage(f"nbd+unix:///?socket={d}/nbd.sock",
                                         reconnect_delay=RECONNECT_DELAY)
        loop = EpollLoop()
        done: dict[int, int] = {}

        def complete(token: int, error: int) -> None:
            assert token not in done, f"request {token} completed twice"
            done[token] = error

        storage.on_complete = complete
        reads: dict[int, tuple[memoryview, int]] = {}
        try:
            storage.start(loop)
            for i, (op, sector, sectors) in enumerate(requests):
                offset, length = sector * 512, sectors * 512
                try:
                    if op == "read":
                        buf = memoryview(bytearray(length))
                        reads[i] = (buf, offset)
                        r = storage.readv([buf], offset, i)
                    elif op == "write":
                        r = storage.writev([memoryview(os.urandom(length))], offset, i)
                    else:
                        r = storage.flush(i)
                except OSError as e:  # refused at once (the server is being reconnected)
                    complete(i, e.errno or -1)
                    continue
                if r != PENDING:
                    complete(i, 0)
            # Every request ends: answered, or failed once the reconnect delay is over.
            deadline = time.monotonic() + RECONNECT_DELAY * (len(script) + 2) + 10
            while len(done) < len(requests):
                assert time.monotonic() < deadline, f"requests never completed: {done}"
                loop.run_once(0.05)
            for i, err in done.items():
                assert err >= 0, (i, err)
            for i, (buf, offset) in reads.items():
                if done[i] == 0:
                    with server.lock:
                        # Writes in the same batch may have landed on these sectors
                        # since; only untouched reads can be compared byte for byte.
                        overlapped = any(
                            op == "write" and s * 512 < offset + len(buf)
                            and offset < (s + n) * 512
                            for op, s, n in requests)
                        if not overlapped:
                            assert bytes(buf) == bytes(server.data[offset:offset + len(buf)])
        finally:
            storage.close()
            server.close()
        CATCHER.check()
