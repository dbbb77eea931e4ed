"""A virtio-blk queue on an NBD export: the replies one read of the socket brings are
published as one batch (one used-index store, one interrupt), and the inflight region
stays exact while they are being completed."""

from __future__ import annotations

import fcntl
import os
import select
import struct
import sys
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from storage_support import Loop, NbdServer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from unit_support import (
    F_WRITE,
    GuestRam,
    PackedRing,
    Ring,
    UsedDesc,
    eventfd_count,
    packed_used_flags,
)

from vhostd.devices.blk import BlkDevice, BlkOptions
from vhostd.engine.inflight import InflightRegion
from vhostd.storage.nbd import NbdStorage
from vhostd_proto.inflight import InflightSplitRegion, inflight_queue_stride

pytest.importorskip("nbd")

QS = 32
REQUESTS = 8
T_IN, T_OUT = 0, 1
HDR = 0x1000  # request headers and status bytes
DATA = 0x4000  # 4 KiB read buffers


@pytest.fixture
def ram() -> Iterator[GuestRam]:
    g = GuestRam()
    g.add(0x0, 0x10000, 0x7F00_0000_0000)
    yield g
    g.close()


@pytest.fixture
def inflight_fd() -> Iterator[int]:
    fd, _ = InflightRegion.create(1, QS)
    yield fd
    os.close(fd)


def flagged(fd: int) -> set[int]:
    raw = os.pread(fd, 16 + 16 * QS, 0)
    return {i for i, d in enumerate(InflightSplitRegion(QS).parse(raw)["desc"]) if d["inflight"]}


def poll_once(loop: Loop) -> int:
    """One turn of the loop: dispatch what is ready now; how many fds were."""
    ready = loop.epoll.poll(1.0)
    for fd, _ in ready:
        entry = loop.readers.get(fd)
        if entry is not None:
            entry[0](*entry[1])
    return len(ready)


def wait_for_bytes(fd: int, n: int) -> None:
    """Until the socket holds ``n`` bytes (every reply has arrived)."""
    deadline = time.monotonic() + 5
    buf = bytearray(4)
    while True:
        select.select([fd], [], [], 0.05)
        fcntl.ioctl(fd, termios.FIONREAD, buf)
        if struct.unpack("i", buf)[0] >= n:
            return
        assert time.monotonic() < deadline, "the replies did not arrive"


def test_replies_of_one_read_are_published_once(
        ram: GuestRam, inflight_fd: int, loop: Loop,
        nbd_server: Callable[..., NbdServer]) -> None:
    server = nbd_server("nbdkit", "pattern", "1M")  # every 8 bytes: their own offset
    storage = NbdStorage(server.uri)
    dev = BlkDevice("nbd0", storage, BlkOptions())
    ring = Ring(ram, QS, 0x0, 0x200, 0x400)
    call = os.eventfd(0, os.EFD_NONBLOCK)
    region = InflightRegion(inflight_fd, inflight_queue_stride(QS), 0, 1, QS)
    try:
        q = ring.queue(lambda h, r, w: 0, call_fd=call, inflight=region.queues[0],
                       start=False)
        q.handler = dev.make_handler(q)
        q.start(ram.memory)
        dev.start(loop)
        heads = [3 * i for i in range(REQUESTS)]
        for i, head in enumerate(heads):
            ram.write(HDR + 0x100 * i, struct.pack("<IIQ", T_IN, 0, 8 * i))
            ram.write(HDR + 0x100 * i + 0x80, b"\xee")
            ring.chain(head, [(HDR + 0x100 * i, 16, 0), (DATA + 0x1000 * i, 4096, F_WRITE),
                              (HDR + 0x100 * i + 0x80, 1, F_WRITE)])
        ring.publish(*heads)
        q.process()
        assert q.outstanding == REQUESTS and flagged(inflight_fd) == set(heads)
        assert eventfd_count(call) == 0

        # What each completion leaves visible to the driver, as it is reported.
        seen: list[tuple[int, int]] = []
        complete = storage.on_complete

        def watch(token: object, error: int) -> None:
            complete(token, error)
            seen.append((ring.used_idx, len(flagged(inflight_fd))))

        storage.on_complete = watch
        wait_for_bytes(storage.conns[0].fd, REQUESTS * 4096)
        assert poll_once(loop) == 1
        # One read of the socket brought every reply; none was visible before the
        # last, and every request stayed flagged for a restart until then.
        assert seen == [(0, REQUESTS)] * REQUESTS
        assert ring.used_idx == REQUESTS
        assert sorted(h for h, _ in ring.used_elems()) == heads
        assert all(n == 4097 for _, n in ring.used_elems())
        assert eventfd_count(call) == 1
        assert flagged(inflight_fd) == set()
        for i in range(REQUESTS):
            assert ram.read(HDR + 0x100 * i + 0x80, 1) == b"\0"
            assert ram.read(DATA + 0x1000 * i, 8) == struct.pack(">Q", 4096 * i)
    finally:
        storage.close()
        region.close()
        os.close(call)


def test_packed_ring_batch_in_take_order(ram: GuestRam, loop: Loop,
                                         nbd_server: Callable[..., NbdServer]) -> None:
    """On a packed ring the batch is published in take order with one interrupt."""
    server = nbd_server("nbdkit", "pattern", "1M")
    storage = NbdStorage(server.uri)
    dev = BlkDevice("nbd0", storage, BlkOptions())
    ring = PackedRing(ram, QS, 0x0, 0x200, 0x400)
    call = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        q = ring.queue(lambda h, r, w: 0, call_fd=call, start=False)
        q.handler = dev.make_handler(q)
        q.start(ram.memory)
        dev.start(loop)
        ids = list(range(1, REQUESTS + 1))
        for i, buf_id in enumerate(ids):
            ram.write(HDR + 0x100 * i, struct.pack("<IIQ", T_IN, 0, 8 * i))
            ring.add(buf_id, [(HDR + 0x100 * i, 16, 0), (DATA + 0x1000 * i, 4096, F_WRITE),
                              (HDR + 0x100 * i + 0x80, 1, F_WRITE)])
        q.process()
        assert q.outstanding == REQUESTS and eventfd_count(call) == 0
        wait_for_bytes(storage.conns[0].fd, REQUESTS * 4096)
        assert poll_once(loop) == 1
        assert q.outstanding == 0
        assert ring.take_used() == [UsedDesc(3 * i, buf_id, 4097, packed_used_flags(1))
                                    for i, buf_id in enumerate(ids)]
        assert eventfd_count(call) == 1
    finally:
        storage.close()
        os.close(call)


def test_writethrough_writes_complete_after_their_flush(
        ram: GuestRam, loop: Loop, tmp_path: Path,
        nbd_server: Callable[..., NbdServer]) -> None:
    """wce=0: each write's completion submits a flush from inside the batch; the
    requests are published once their flushes completed, in a later batch."""
    log_path = tmp_path / "nbdkit.log"
    server = nbd_server("nbdkit", "--filter=log", "memory", "1M", f"logfile={log_path}")
    storage = NbdStorage(server.uri)
    assert storage.info["flush"]
    dev = BlkDevice("nbd0", storage, BlkOptions(writeback=False))
    ring = Ring(ram, QS, 0x0, 0x200, 0x400)
    call = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        q = ring.queue(lambda h, r, w: 0, call_fd=call, start=False)
        q.handler = dev.make_handler(q)
        q.start(ram.memory)
        dev.start(loop)
        heads = [3 * i for i in range(4)]
        for i, head in enumerate(heads):
            ram.write(HDR + 0x100 * i, struct.pack("<IIQ", T_OUT, 0, 8 * i))
            ram.write(DATA + 0x1000 * i, bytes([i + 1]) * 4096)
            ring.chain(head, [(HDR + 0x100 * i, 16, 0), (DATA + 0x1000 * i, 4096, 0),
                              (HDR + 0x100 * i + 0x80, 1, F_WRITE)])
        ring.publish(*heads)
        q.process()
        assert q.outstanding == 4
        loop.run_until(lambda: q.outstanding == 0)
        assert sorted(h for h, _ in ring.used_elems()) == heads
        assert all(ram.read(HDR + 0x100 * i + 0x80, 1) == b"\0" for i in range(4))
        assert eventfd_count(call) >= 1
        log_text = log_path.read_text()
        assert log_text.count("Flush") >= 4 and log_text.count("Write") >= 4
    finally:
        storage.close()
        os.close(call)


def test_a_refused_request_fails_inline(loop: Loop,
                                        nbd_server: Callable[..., NbdServer]) -> None:
    """libnbd refuses a read beyond the export (one that shrank under the device):
    the storage raises at once, instead of reporting a completion before the device
    knew the request was pending."""
    server = nbd_server("nbdkit", "memory", "1M")
    storage = NbdStorage(server.uri)
    done: list[object] = []
    storage.on_complete = lambda token, error: done.append(token)
    storage.start(loop)
    try:
        with pytest.raises(OSError):
            storage.readv([memoryview(bytearray(4096))], 1 << 20, "beyond")
        assert done == [] and storage.in_flight() == 0
    finally:
        storage.close()
