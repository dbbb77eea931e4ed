"""Fuzz target: the vhost-user message handler (VhostUserHandler.handle) with real memory.

A blk back end serves one front end after another, as the daemon does. Each example
is one front end: a sequence of vhost-user messages on the wire (through the protocol
core), with real fds (sealed and unsealed memfds, eventfds, /dev/null), guest RAM of
random content, and looks at the rings in between (what a kick does). The inflight
region handed back at "reconnect" has random content too. Properties: nothing but
ProtocolError escapes (the shell closes the connection on that, and so does this
target); after the front end is gone every fd is closed again.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Iterator

import pytest
from fuzz_support import CATCHER, QVA_BASE, RAM_SIZE, Ram, blk_backend, count, open_fds
from hypothesis import given
from hypothesis import strategies as st

from vhostd.core.pending import Pending
from vhostd.core.protocol import ProtocolError
from vhostd.engine.loop import close_fds
from vhostd.engine.seals import sealed_memfd
from vhostd.vhost_user.handler import ENGINE_FEATURES, PROTOCOL_FEATURES, VhostUserHandler
from vhostd_proto import inflight as inf
from vhostd_proto import vhost_user as vu
from vhostd_proto.virtio import Feature

R = vu.Request
NUM_QUEUES = 2


def frame(request: int, payload: bytes, flags: int = 1) -> bytes:
    return (int(request).to_bytes(4, "little") + flags.to_bytes(4, "little")
            + len(payload).to_bytes(4, "little") + payload)


def u64(v: int) -> bytes:
    return (v & (1 << 64) - 1).to_bytes(8, "little")


def state(index: int, num: int) -> bytes:
    return struct.pack("<II", index & 0xFFFFFFFF, num & 0xFFFFFFFF)


def region(gpa: int, size: int, qva: int, offset: int) -> bytes:
    return struct.pack("<QQQQ", *(v & (1 << 64) - 1 for v in (gpa, size, qva, offset)))


addr = st.one_of(st.integers(0, RAM_SIZE // 16 - 1).map(lambda i: QVA_BASE + 16 * i),
                 st.integers(0, (1 << 64) - 1))
ring_index = st.integers(0, NUM_QUEUES - 1) | st.integers(0, 300)
features = st.one_of(st.just(ENGINE_FEATURES), st.integers(0, (1 << 64) - 1).map(
    lambda v: v & (ENGINE_FEATURES | 1 << Feature.VIRTIO_F_VERSION_1 | 0xFFFF)))


DESC, AVAIL, USED, DATA = 0x0, 0x4000, 0x8000, 0x10000
QSIZE = 64


def setup_steps() -> list[tuple]:
    """What QEMU sends to start queue 0 on this RAM (the rings at DESC, AVAIL, USED)."""
    return [("msg", R.SET_OWNER, b"", [], 1),
            ("msg", R.SET_FEATURES, u64(ENGINE_FEATURES & ~(1 << Feature.VIRTIO_F_RING_PACKED)),
             [], 1),
            ("msg", R.SET_PROTOCOL_FEATURES, u64(PROTOCOL_FEATURES), [], 1),
            ("msg", R.SET_MEM_TABLE, struct.pack("<II", 1, 0) + region(0, RAM_SIZE, QVA_BASE, 0),
             ["ram"], 9),
            ("msg", R.SET_VRING_NUM, state(0, QSIZE), [], 1),
            ("msg", R.SET_VRING_BASE, state(0, 0), [], 1),
            ("msg", R.SET_VRING_ADDR, state(0, 0) + u64(QVA_BASE + DESC) + u64(QVA_BASE + USED)
             + u64(QVA_BASE + AVAIL) + u64(0), [], 1),
            ("msg", R.SET_VRING_CALL, u64(0), ["eventfd"], 1),
            ("msg", R.SET_VRING_KICK, u64(0), ["eventfd"], 1),
            ("msg", R.SET_VRING_ENABLE, state(0, 1), [], 1)]


@st.composite
def blk_request(draw: st.DrawFn) -> tuple:
    """A virtio-blk request chain written into the split ring of queue 0 and made
    available: plausible, with any field possibly wrong."""
    head = draw(st.integers(0, QSIZE - 3))
    rtype = draw(st.sampled_from([0, 1, 4, 8, 11, 13]) | st.integers(0, 0xFFFFFFFF))
    sector = draw(st.integers(0, 4096) | st.integers(0, (1 << 64) - 1))
    n = draw(st.sampled_from([0, 1, 512, 4096, 0x10000]) | st.integers(0, 1 << 33))
    data_flags = draw(st.sampled_from([2, 0, 3, 4]))
    descs = struct.pack("<QIHH", DATA, 16, 1, head + 1)
    descs += struct.pack("<QIHH", DATA + 0x1000, n & 0xFFFFFFFF, data_flags | 1, head + 2)
    descs += struct.pack("<QIHH", DATA + 0x800, 1, 2, 0)
    avail_idx = draw(st.integers(1, 3))
    avail = struct.pack("<HH", 0, avail_idx) + struct.pack("<H", head) * avail_idx
    return ("request", head, struct.pack("<IIQ", rtype, 0, sector), descs, avail)


@st.composite
def step(draw: st.DrawFn) -> tuple:
    """(kind, request, payload, fd kinds) or ("kick",) or ("poke", gpa, bytes)."""
    k = draw(st.integers(0, 24))
    if k == 0:
        return ("kick",)
    if k == 1:
        return ("poke", draw(st.integers(0, RAM_SIZE - 1)), draw(st.binary(max_size=512)))
    if k in (2, 3, 4):
        return draw(blk_request())
    flags = draw(st.sampled_from([1, 1, 1, 9]))
    i = draw(ring_index)
    choices: list[tuple[R, bytes, list[str]]] = [
        (R.SET_OWNER, b"", []),
        (R.GET_FEATURES, b"", []),
        (R.SET_FEATURES, u64(draw(features)), []),
        (R.SET_PROTOCOL_FEATURES, u64(draw(st.sampled_from([PROTOCOL_FEATURES, 0])
                                         | st.integers(0, (1 << 64) - 1))), []),
        (R.SET_MEM_TABLE, struct.pack("<II", 1, 0) + region(
            draw(st.sampled_from([0, 0x1000]) | st.integers(0, (1 << 64) - 1)),
            draw(st.sampled_from([RAM_SIZE, RAM_SIZE // 2, 0, RAM_SIZE * 2])),
            QVA_BASE, draw(st.sampled_from([0, 0x1000, RAM_SIZE]))),
         [draw(st.sampled_from(["ram", "ram", "unsealed", "devnull"]))]),
        (R.ADD_MEM_REG, u64(0) + region(draw(st.sampled_from([0, RAM_SIZE, 1 << 40])),
                                        RAM_SIZE, QVA_BASE + draw(st.sampled_from(
                                            [0, RAM_SIZE, 1 << 40])), 0),
         [draw(st.sampled_from(["ram", "unsealed"]))]),
        (R.REM_MEM_REG, u64(0) + region(0, RAM_SIZE, QVA_BASE, 0), []),
        (R.SET_VRING_NUM, state(i, draw(st.sampled_from([0, 1, 2, 8, 64, 65, 256, 1 << 20]))),
         []),
        (R.SET_VRING_BASE, state(i, draw(st.integers(0, 0x1FFFF))), []),
        (R.SET_VRING_ADDR, state(i, draw(st.integers(0, 1))) + u64(draw(addr)) + u64(draw(addr))
         + u64(draw(addr)) + u64(draw(st.integers(0, RAM_SIZE))), []),
        (R.SET_VRING_KICK, u64(i), [draw(st.sampled_from(["eventfd", "eventfd", "memfd",
                                                          "devnull"]))]),
        (R.SET_VRING_KICK, u64(i | 0x100), []),
        (R.SET_VRING_CALL, u64(i), ["eventfd"]),
        (R.SET_VRING_ERR, u64(i), ["eventfd"]),
        (R.SET_VRING_ENABLE, state(i, draw(st.integers(0, 2))), []),
        (R.GET_VRING_BASE, state(i, 0), []),
        (R.GET_CONFIG, struct.pack("<III", draw(st.integers(0, 300)), n := draw(
            st.integers(0, 256)), 0) + bytes(n), []),
        (R.SET_CONFIG, struct.pack("<III", draw(st.integers(0, 60)), n2 := draw(
            st.integers(0, 16)), 0) + draw(st.binary(min_size=n2, max_size=n2)), []),
        (R.GET_INFLIGHT_FD, struct.pack("<QQHH4x", 0, 0, draw(st.integers(0, 3)),
                                        draw(st.sampled_from([0, 8, 64, 100]))), []),
        (R.SET_INFLIGHT_FD, struct.pack("<QQHH4x", draw(st.sampled_from(
            [0, 4096, 1 << 16, 1 << 40])), draw(st.sampled_from([0, 4096])),
            draw(st.integers(0, 3)), draw(st.sampled_from([8, 64, 100]))),
         [draw(st.sampled_from(["inflight", "inflight", "unsealed"]))]),
        (R.SET_LOG_BASE, u64(draw(st.sampled_from([0, 4096, 1 << 16, 1 << 40])))
         + u64(draw(st.sampled_from([0, 4096]))), [draw(st.sampled_from(["log", "unsealed"]))]),
        (R.RESET_DEVICE, b"", []),
        (R.RESET_OWNER, b"", []),
    ]
    request, payload, fds = draw(st.sampled_from(choices))
    return ("msg", request, payload, fds, flags)


class Fds:
    """Real fds of the kinds a front end can pass."""

    def __init__(self, ram: Ram, inflight_bytes: bytes) -> None:
        self.ram = ram
        self.inflight_bytes = inflight_bytes

    def make(self, kind: str) -> int:
        if kind == "ram":
            return os.dup(self.ram.fd)
        if kind == "eventfd":
            return os.eventfd(0, os.EFD_CLOEXEC)
        if kind == "unsealed" or kind == "memfd":
            fd = os.memfd_create("vhostd-fuzz-unsealed")
            os.ftruncate(fd, RAM_SIZE)
            return fd
        if kind == "devnull":
            return os.open("/dev/null", os.O_RDWR)
        if kind == "log":
            return sealed_memfd("vhostd-fuzz-log", 1 << 16)
        if kind == "inflight":
            # A region as a previous back end may have left it: random content.
            size = inf.inflight_queue_stride(64) * 3
            fd = os.memfd_create("vhostd-fuzz-inflight", os.MFD_ALLOW_SEALING)
            os.ftruncate(fd, size)
            os.pwrite(fd, self.inflight_bytes[:size], 0)
            import fcntl
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            return fd
        raise AssertionError(kind)


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[VhostUserHandler, asyncio.AbstractEventLoop]]:
    loop = asyncio.new_event_loop()  # a real watcher; the target calls what a kick calls
    backend = blk_backend(loop, num_queues=NUM_QUEUES)
    yield backend, loop
    backend.device.close()
    loop.close()


@given(steps=st.lists(step(), max_size=40), ram_bytes=st.binary(max_size=4096),
       ram_at=st.integers(0, RAM_SIZE - 1), inflight_bytes=st.binary(max_size=4096),
       setup=st.booleans())
def test_message_handler_survives_any_front_end(served, steps: list[tuple], ram_bytes: bytes,
                                                ram_at: int, inflight_bytes: bytes,
                                                setup: bool) -> None:
    backend, _loop = served
    if setup:
        steps = setup_steps() + steps
    count("message handler", len(steps))
    before = open_fds()
    ram = Ram()
    ram.write(ram_at, ram_bytes)
    fdmaker = Fds(ram, inflight_bytes)
    proto = backend.connect()
    try:
        for s in steps:
            if s[0] == "kick":
                for q in backend.queues:
                    q.process()
                continue
            if s[0] == "poke":
                ram.write(s[1], s[2])
                continue
            if s[0] == "request":
                _, head, header, descs, avail = s
                ram.write(DATA, header)
                ram.write(DESC + 16 * head, descs)
                ram.write(AVAIL, avail)
                for q in backend.queues:
                    q.process()
                continue
            _, request, payload, kinds, flags = s
            fds = [fdmaker.make(k) for k in kinds]
            try:
                for msg in proto.receive(frame(request, payload, flags), fds):
                    if msg.request is R.SET_BACKEND_REQ_FD:  # the shell's business
                        close_fds(msg.fds)
                        continue
                    out = backend.handle(msg)
                    # The blk device completes inline and no ring is in a worker:
                    # nothing makes a reply wait.
                    assert not isinstance(out, Pending) or out.done
                    if isinstance(out, Pending):
                        out = out.result()
                    if out is not None:
                        close_fds(out[1])
            except ProtocolError as e:
                # The shell closes the connection; the next front end comes.
                close_fds(e.fds)
                backend.disconnect()
                proto = backend.connect()
    finally:
        if backend.protocol is not None:
            backend.disconnect()
        ram.close()
    CATCHER.check()
    after = open_fds()
    if after != before:
        after = open_fds(collect=True)
    assert after == before, f"fds leaked: {set(after.items()) - set(before.items())}"
