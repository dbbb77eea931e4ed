"""Dirty logging for live migration (reference 5.1, 6.2) over a real socket to a real vhostd.

The test plays QEMU 7.2's source side: SET_LOG_BASE with a memfd, SET_FEATURES with
VHOST_F_LOG_ALL (NEED_REPLY, REPLY_ACK negotiated), SET_VRING_ADDR with VHOST_VRING_F_LOG on
the running ring, and the stop sequence; the log is read from the test's own mapping of the
memfd, as QEMU reads its copy.
"""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from frontend_support import MiB

from vhostd.engine.seals import sealed_memfd
from vhostd.frontend.blk import BlkFrontend
from vhostd.frontend.memory import PAGE_SIZE
from vhostd_proto.vhost_user import (
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_VRING_F_LOG,
    LogBase,
    Request,
)
from vhostd_proto.vhost_user import ProtocolFeature as PF

VRING_F_LOG = 1 << VHOST_VRING_F_LOG
READ_LEN = 3 * PAGE_SIZE  # a read whose data covers three pages, its status a fourth


class MigrationLog:
    """The dirty log QEMU allocates: a memfd the test maps too."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.fd = sealed_memfd("vhostd-test-dirty-log", size)
        self.mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    @property
    def pages(self) -> set[int]:
        raw = self.mm[:]
        return {8 * i + b for i, byte in enumerate(raw) if byte for b in range(8) if byte >> b & 1}

    def harvest(self) -> set[int]:
        """QEMU's log sync: take the set bits, clear them."""
        got = self.pages
        self.mm[:] = bytes(self.size)
        return got

    def close(self) -> None:
        self.mm.close()
        os.close(self.fd)


@pytest.fixture
def make_log() -> Iterator[Callable[[int], MigrationLog]]:
    logs: list[MigrationLog] = []

    def make(size: int) -> MigrationLog:
        lg = MigrationLog(size)
        logs.append(lg)
        return lg

    yield make
    for lg in logs:
        lg.close()


@pytest.fixture
def fe(vhostd: Callable[..., Any], sparse_image: Callable[..., Path]) -> Iterator[BlkFrontend]:
    """A started one-queue front end on a fresh vhostd (checked for a clean log and exit at
    teardown by the ``vhostd`` fixture)."""
    image = sparse_image(16 * MiB)
    # One queue: always in the main process (tests/frontend/test_queue_workers.py logs
    # from a queue served in a worker process).
    proc = vhostd(f"--blk-file={image}", "--queue-workers=0")
    f = BlkFrontend(proc.socket_path, num_queues=1, queue_size=32, max_io=READ_LEN,
                    timeout=2.0)
    yield f
    f.close()


def mem_pages(fe: BlkFrontend) -> int:
    return max(r.end for r in fe.mem.regions) // PAGE_SIZE


def log_size(pages: int) -> int:
    """Bytes of bitmap for ``pages`` pages, in 64-bit chunks as QEMU sizes it."""
    return (pages + 63) // 64 * 8


def log_addr(fe: BlkFrontend) -> int:
    """A log_guest_addr for the used ring away from the ring itself: 16 pages past RAM."""
    return (mem_pages(fe) + 16) * PAGE_SIZE


def new_log(fe: BlkFrontend, make_log: Callable[[int], MigrationLog],
            extra_pages: int = 64) -> MigrationLog:
    return make_log(log_size(mem_pages(fe) + extra_pages))


def set_log_all(fe: BlkFrontend, on: bool) -> None:
    """SET_FEATURES with or without LOG_ALL, as QEMU 7.2 sends it: NEED_REPLY (REPLY_ACK) only
    when turning logging on; otherwise a GET_FEATURES round trip makes the test synchronous."""
    features = fe.features | 1 << VHOST_USER_F_PROTOCOL_FEATURES
    if on:
        fe.client.set_features(features | 1 << VHOST_F_LOG_ALL, need_reply=True)
    else:
        fe.client.set_features(features)
        fe.client.get_features()


def set_ring_log(fe: BlkFrontend, addr: int, on: bool) -> None:
    """SET_VRING_ADDR re-sent for the running queue 0 with the LOG flag (reference 6.2)."""
    vq = fe.vqs[0]
    fe.client.set_vring_addr(0, vq.desc_qva, vq.used_qva, vq.avail_qva, log=addr,
                             flags=VRING_F_LOG if on else 0, need_reply=True)


def submit(fe: BlkFrontend, sector: int, **kw: Any) -> tuple[int, set[int]]:
    """Queue a read of READ_LEN bytes; return its token and the pages the device must write
    (data and status byte), from the descriptors the front end built."""
    token = fe.submit_read(0, sector, READ_LEN, **kw)
    entry = next(e for e in fe.queues[0].inflight.values() if e[0] == token)
    _, _, in_gpa, in_len, status, _ = entry
    pages = set(range(in_gpa // PAGE_SIZE, (in_gpa + in_len - 1) // PAGE_SIZE + 1))
    return token, pages | {status // PAGE_SIZE}


def read(fe: BlkFrontend, sector: int = 0) -> set[int]:
    """One read request, waited for; returns the pages it made the device write."""
    token, pages = submit(fe, sector)
    fe.kick(0)
    _, status, _, used_len = fe.wait(0, token)
    assert status == 0 and used_len == READ_LEN + 1
    return pages


def ring_page(fe: BlkFrontend) -> int:
    return fe.vqs[0].used_gpa // PAGE_SIZE


# ---- SET_LOG_BASE ---------------------------------------------------------------------


def test_log_base_is_answered_with_u64_zero_without_need_reply(
        fe: BlkFrontend, make_log: Callable[[int], MigrationLog]) -> None:
    assert fe.offered_features >> VHOST_F_LOG_ALL & 1
    assert fe.has_protocol(PF.LOG_SHMFD) and fe.has_protocol(PF.REPLY_ACK)
    lg = new_log(fe, make_log)
    c = fe.client
    payload = LogBase.build({"mmap_size": lg.size, "mmap_offset": 0})
    c.request(Request.SET_LOG_BASE, payload, [lg.fd])  # flags 0x1, as QEMU sends it
    body, fds = c.recv_reply(Request.SET_LOG_BASE, 8)  # flags 0x5, same id
    assert fds == [] and body == bytes(8)
    # With NEED_REPLY too there is exactly one reply: the next reply belongs to GET_FEATURES.
    lg2 = new_log(fe, make_log)
    c.request(Request.SET_LOG_BASE, payload, [lg2.fd], need_reply=True)
    body, fds = c.recv_reply(Request.SET_LOG_BASE, 8)
    assert fds == [] and body == bytes(8)
    assert c.get_features() == fe.offered_features
    # The connection keeps serving I/O.
    read(fe)


def test_client_set_log_base_helper(fe: BlkFrontend,
                                    make_log: Callable[[int], MigrationLog]) -> None:
    lg = new_log(fe, make_log)
    fe.client.set_log_base(lg.fd, lg.size, 0)
    assert fe.client.get_features() == fe.offered_features


# ---- LOG_ALL on and off ---------------------------------------------------------------


def test_log_all_turns_logging_on_and_off(fe: BlkFrontend,
                                          make_log: Callable[[int], MigrationLog]) -> None:
    lg = new_log(fe, make_log)
    fe.client.set_log_base(lg.fd, lg.size, 0)
    read(fe)
    assert lg.pages == set(), "logged before LOG_ALL was acked"

    set_log_all(fe, True)
    expect = read(fe, 8)
    assert len(expect) == 4
    # The ring was set up with flags 0: only the request's own writable pages are logged.
    assert lg.harvest() == expect
    assert read(fe, 16) == expect  # the same slot again: logged again after the harvest
    assert lg.harvest() == expect

    set_log_all(fe, False)
    read(fe, 24)
    read(fe, 32)
    assert lg.pages == set(), "logged after LOG_ALL was cleared"

    set_log_all(fe, True)  # a second migration attempt on the same log
    assert lg.harvest() == set()
    expect = read(fe, 40)
    assert lg.pages == expect


def test_many_requests_in_one_batch_are_all_logged(
        fe: BlkFrontend, make_log: Callable[[int], MigrationLog]) -> None:
    lg = new_log(fe, make_log)
    fe.client.set_log_base(lg.fd, lg.size, 0)
    set_log_all(fe, True)
    expect: set[int] = set()
    tokens = []
    for k in range(8):
        # Every other request through an indirect table, some split per page or two.
        token, pages = submit(fe, 8 * k, use_indirect=bool(k % 2), seg_size=PAGE_SIZE * (k % 3))
        tokens.append(token)
        expect |= pages
    fe.kick(0)
    for token in tokens:
        assert fe.wait(0, token)[1] == 0
    assert lg.pages == expect


# ---- a new SET_LOG_BASE replaces the log ----------------------------------------------


def test_second_log_base_replaces_the_log(fe: BlkFrontend,
                                          make_log: Callable[[int], MigrationLog]) -> None:
    small = new_log(fe, make_log, extra_pages=64)
    fe.client.set_log_base(small.fd, small.size, 0)
    set_log_all(fe, True)
    set_ring_log(fe, log_addr(fe), True)
    expect = read(fe)
    assert expect <= small.harvest()

    # Guest memory grew: QEMU sends a bigger log while the rings run.
    big = new_log(fe, make_log, extra_pages=4096)
    assert big.size > small.size
    fe.client.set_log_base(big.fd, big.size, 0)
    expect = read(fe, 8)
    used = log_addr(fe) // PAGE_SIZE
    assert big.pages == expect | {used}
    assert small.pages == set(), "the replaced log is still written"


# ---- SET_VRING_ADDR with VHOST_VRING_F_LOG on a running ring --------------------------


def test_ring_log_flag_logs_the_used_ring_at_log_guest_addr(
        fe: BlkFrontend, make_log: Callable[[int], MigrationLog]) -> None:
    lg = new_log(fe, make_log)
    addr = log_addr(fe)
    used = addr // PAGE_SIZE
    assert used != ring_page(fe)
    # Reference 6.2 steps 1-3, the device running all along.
    fe.client.set_log_base(lg.fd, lg.size, 0)
    set_log_all(fe, True)
    expect = read(fe)
    assert lg.harvest() == expect  # flags 0 (from start): the used ring is not logged

    set_ring_log(fe, addr, True)
    expect = read(fe, 8)
    # The used ring is written at its own GPA (the front end reaped the request from
    # there) but logged at log_guest_addr, which is not even guest memory.
    assert lg.harvest() == expect | {used}

    # Migration cancelled while running: flags 0 again, then LOG_ALL off.
    set_ring_log(fe, addr, False)
    expect = read(fe, 16)
    assert lg.harvest() == expect
    set_log_all(fe, False)
    read(fe, 24)
    assert lg.pages == set()


# ---- stop: GET_VRING_BASE -------------------------------------------------------------


def test_get_vring_base_replies_after_requests_are_complete_and_logged(
        fe: BlkFrontend, make_log: Callable[[int], MigrationLog]) -> None:
    lg = new_log(fe, make_log)
    addr = log_addr(fe)
    fe.client.set_log_base(lg.fd, lg.size, 0)
    set_log_all(fe, True)
    set_ring_log(fe, addr, True)
    vq = fe.vqs[0]
    assert vq.event_idx
    expect: set[int] = set()
    n = 6
    for k in range(n):
        expect |= submit(fe, 8 * k)[1]
    fe.kick(0)
    # Wait until the back end has taken every chain (it asks for the next kick by writing
    # avail_event), not for the used index or the call: the stop sequence follows at once.
    deadline = time.monotonic() + 2
    while vq.avail_event() != n:
        assert time.monotonic() < deadline, "the back end did not take the requests"
        time.sleep(0.001)
    bases = fe.stop()  # ENABLE 0, GET_VRING_BASE
    assert bases == [n]
    # By the reply every taken request is complete and published, and logged.
    assert vq.used_idx() == n
    assert lg.harvest() == expect | {addr // PAGE_SIZE}

    # After the reply the back end touches no guest memory: a late request is not served.
    token, _ = submit(fe, 0)
    fe.kick(0, force=True)
    time.sleep(0.1)
    assert vq.used_idx() == n
    assert lg.pages == set()
    done = fe.complete(0, timeout=0.05)
    assert len(done) == n and token not in {t for t, _, _ in done}
