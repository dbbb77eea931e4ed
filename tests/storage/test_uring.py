"""The pure-Python io_uring (vhostd/storage/uring.py) against real files: results,
data, errors, many operations in flight, and closing with some still in the kernel."""

from __future__ import annotations

import errno
import mmap
import os
import random
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vhostd.storage import uring

SIZE = 1 << 20

pytestmark = pytest.mark.skipif(uring.unavailable() is not None,
                                reason=str(uring.unavailable()))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(SIZE))
    return path


@pytest.fixture
def ring() -> Iterator[uring.Ring]:
    r = uring.Ring(64)
    r.register_eventfd()
    yield r
    r.close()


class Results:
    def __init__(self, ring: uring.Ring) -> None:
        self.got: dict[Any, int] = {}
        self.order: list[Any] = []
        ring.report = self

    def __call__(self, token: Any, res: int) -> None:
        assert token not in self.got, f"{token} reported twice"
        self.got[token] = res
        self.order.append(token)


def wait_all(ring: uring.Ring, results: Results, n: int, timeout: float = 5.0) -> None:
    """Reap through the eventfd, as the loop does, until ``n`` results are in."""
    ring.submit()
    while len(results.got) < n:
        r, _, _ = select.select([ring.efd], [], [], timeout)
        assert r, "no completion in time"
        os.eventfd_read(ring.efd)
        ring.reap()


def test_read_write_and_vectored(image: Path, ring: uring.Ring) -> None:
    res = Results(ring)
    fd = os.open(image, os.O_RDWR)
    try:
        buf = bytearray(4096)
        ring.prep_rw(False, fd, uring.address(buf), 4096, 8192, "r", buf)
        blob = os.urandom(3000)
        wbuf = bytearray(blob)
        ring.prep_rw(True, fd, uring.address(wbuf), len(wbuf), 100_000, "w", wbuf)
        a, b = bytearray(1000), bytearray(2000)
        arr, keep = uring.pack_iovecs([a, b])
        ring.prep_rwv(False, fd, arr, 2, 50_000, "rv", keep)
        assert ring.queued == 3
        assert ring.submit() == 3 and ring.queued == 0
        wait_all(ring, res, 3)
        assert res.got == {"r": 4096, "w": 3000, "rv": 3000}
        data = image.read_bytes()
        assert buf == data[8192:12288]
        assert data[100_000:103_000] == blob
        assert a + b == data[50_000:53_000]
        c, d = bytearray(b"x" * 10), bytearray(b"y" * 20)
        arr, keep = uring.pack_iovecs([c, d])
        ring.prep_rwv(True, fd, arr, 2, 0, "wv", keep)
        ring.prep_fsync(fd, True, "sync")
        wait_all(ring, res, 5)
        assert res.got["wv"] == 30 and res.got["sync"] == 0
        assert image.read_bytes()[:30] == b"x" * 10 + b"y" * 20
        assert ring.in_kernel == 0
    finally:
        os.close(fd)


def test_direct_aligned(image: Path, ring: uring.Ring) -> None:
    try:
        fd = os.open(image, os.O_RDWR | os.O_DIRECT)
    except OSError as e:
        pytest.skip(f"no O_DIRECT here: {e}")
    res = Results(ring)
    mem = mmap.mmap(-1, 3 * 4096)
    view = memoryview(mem)
    try:
        blob = os.urandom(4096)
        view[0:4096] = blob
        ring.prep_rw(True, fd, uring.address(view[0:4096]), 4096, 65536, "w", None)
        wait_all(ring, res, 1)
        ring.prep_fsync(fd, True, "f")
        wait_all(ring, res, 2)
        ring.prep_rw(False, fd, uring.address(view[4096:8192]), 4096, 65536, "r", None)
        # An offset that is not a multiple of the block size: O_DIRECT refuses it.
        ring.prep_rw(False, fd, uring.address(view[8192:]), 4096, 100, "bad", None)
        wait_all(ring, res, 4)
        assert res.got["w"] == 4096 and res.got["f"] == 0 and res.got["r"] == 4096
        assert bytes(view[4096:8192]) == blob
        assert res.got["bad"] == -errno.EINVAL
    finally:
        view.release()
        mem.close()
        os.close(fd)


def test_error_completions(image: Path, ring: uring.Ring) -> None:
    res = Results(ring)
    fd = os.open(image, os.O_RDONLY)
    closed = os.open(image, os.O_RDONLY)
    os.close(closed)
    try:
        buf = bytearray(4096)
        ring.prep_rw(False, closed, uring.address(buf), 4096, 0, "ebadf", buf)
        ring.prep_rw(True, fd, uring.address(buf), 4096, 0, "read-only", buf)
        ring.prep_rw(False, fd, uring.address(buf), 4096, SIZE, "eof", buf)
        ring.prep_rw(False, fd, uring.address(buf), 4096, SIZE - 1000, "short", buf)
        ring.prep_fsync(closed, True, "fsync-ebadf")
        wait_all(ring, res, 5)
        assert res.got == {"ebadf": -errno.EBADF, "read-only": -errno.EBADF, "eof": 0,
                           "short": 1000, "fsync-ebadf": -errno.EBADF}
    finally:
        os.close(fd)


def test_many_in_flight_complete_in_any_order(image: Path) -> None:
    ring = uring.Ring(32)  # fewer entries than operations: prepare in rounds
    ring.register_eventfd()
    res = Results(ring)
    fd = os.open(image, os.O_RDONLY)
    rnd = random.Random(7)
    data = image.read_bytes()
    bufs: dict[int, tuple[bytearray, int]] = {}
    try:
        n = 200
        for i in range(n):
            while not ring.space():
                ring.submit()
                select.select([ring.efd], [], [], 5)
                os.eventfd_read(ring.efd)
                ring.reap()
            off = rnd.randrange(SIZE // 512 - 8) * 512
            size = rnd.choice([512, 4096, 1000])
            buf = bytearray(size)
            bufs[i] = (buf, off)
            ring.prep_rw(False, fd, uring.address(buf), size, off, i, buf)
            if rnd.random() < 0.3:
                ring.submit()
        wait_all(ring, res, n)
        assert sorted(res.got) == list(range(n))
        for i, (buf, off) in bufs.items():
            assert res.got[i] == len(buf)
            assert buf == data[off:off + len(buf)]
        assert ring.in_kernel == 0 and ring.queued == 0
        assert ring.space() == min(ring.sq_entries, ring.cq_entries)
    finally:
        ring.close()
        os.close(fd)


def test_close_with_operations_outstanding(image: Path) -> None:
    """A read of an empty pipe never completes: closing the ring neither hangs nor
    crashes, and keeps that read's buffer alive (the kernel may still fill it)."""
    ring = uring.Ring(8)
    ring.register_eventfd()
    got: list[Any] = []
    ring.report = lambda token, res: got.append(token)
    r, w = os.pipe()
    fd = os.open(image, os.O_RDONLY)
    try:
        stuck = bytearray(16)
        ring.prep_rw(False, r, uring.address(stuck), 16, 0, "pipe", stuck)
        buf = bytearray(4096)
        ring.prep_rw(False, fd, uring.address(buf), 4096, 0, "file", buf)
        ring.submit()
        before = len(uring._abandoned)
        ring.close(settle=0.2)
        assert ring.fd == -1 and ring.efd == -1
        assert got == []  # nothing is reported once the ring closes
        assert any(keep is stuck for _token, keep in uring._abandoned[before:])
    finally:
        os.close(r)
        os.close(w)
        os.close(fd)


def test_nothing_queued_is_nothing_submitted(ring: uring.Ring) -> None:
    assert ring.submit() == 0
    res = Results(ring)
    ring.prep_nop("n")
    assert ring.queued == 1
    wait_all(ring, res, 1)
    assert res.got == {"n": 0}


def test_setup_refuses_a_bad_size() -> None:
    with pytest.raises(OSError) as e:
        uring.Ring(0)
    assert e.value.errno == errno.EINVAL


def overfill(ring: uring.Ring, n: int) -> None:
    """Let ``n`` operations be in flight on ``ring`` whatever its completion ring holds
    (the Ring itself never allows that), and submit ``n`` NOPs: the completions that do
    not fit are parked in the kernel's overflow list."""
    ring._slots = [None] * n
    ring._free = list(range(n - 1, -1, -1))
    for i in range(n):
        while ring.sq_entries - ring.queued < 1:
            ring.submit()
        ring.prep_nop(i)
    ring.submit()


def test_completions_parked_in_the_overflow_list_are_fetched() -> None:
    """The kernel parks completions the ring cannot show in an overflow list (it has
    been seen to do so with room to spare, too). They bump no eventfd and show up only
    after a GETEVENTS enter: reap() must fetch them, and say how often it had to."""
    ring = uring.Ring(4)  # a completion ring of 8 entries
    ring.register_eventfd()
    try:
        res = Results(ring)
        overfill(ring, 40)
        assert ring.overflowed()
        assert ring.reap() == 40
        assert sorted(res.got) == list(range(40)) and set(res.got.values()) == {0}
        assert not ring.overflowed() and ring.in_kernel == 0
        assert ring.overflow_flushes >= 1
    finally:
        ring.close()


_HEAD_WATCHER = r"""
import mmap, sys
fd, flag_fd, offset, size, word = map(int, sys.argv[1:])
words = memoryview(mmap.mmap(fd, size, offset=offset)).cast("I")
flag = mmap.mmap(flag_fd, 1)
flag[0] = 1  # watching
back = reads = 0
prev = words[word]
while flag[0] == 1:
    for _ in range(1000):
        now = words[word]
        back += now < prev
        prev = now
    reads += 1000
print(back, reads)
"""


def test_the_completion_head_is_stored_in_one_move() -> None:
    """The kernel reads the completion ring's head while we store it, from other CPUs.
    Stored a byte at a time (struct.pack_into), a head crossing a multiple of 256 is
    seen to go back for a moment; crossing a multiple of 65536 it looks 65535 behind,
    the ring looks full to the kernel, and completions go to its overflow list (the
    guest hang this test stands for). A second process watches the head as a CPU of
    the kernel would: it must only ever move forward."""
    ring = uring.Ring(64)
    flag_fd = os.memfd_create("watching")
    os.ftruncate(flag_fd, 1)
    flag = mmap.mmap(flag_fd, 1)
    watcher = subprocess.Popen(
        [sys.executable, "-c", _HEAD_WATCHER, str(ring.fd), str(flag_fd),
         str(uring.IORING_OFF_CQ_RING), str(len(ring._cq)), str(ring._cq_head)],
        pass_fds=(ring.fd, flag_fd), stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while flag[0] != 1:
            assert watcher.poll() is None and time.monotonic() < deadline, "watcher not up"
            time.sleep(0.001)
        ring.report = lambda token, res: None
        for i in range(100_000):  # the head crosses 390 multiples of 256
            ring.prep_nop(i)
            ring.submit()
            while not ring.reap():
                pass
    finally:
        flag[0] = 0
        out, _ = watcher.communicate(timeout=10)
        flag.close()
        os.close(flag_fd)
        ring.close()
    back, reads = map(int, out.split())
    assert reads > 100_000, "the watcher hardly ran"
    assert back == 0, f"the head went back {back} time(s) in {reads} reads"
