"""File storage: the inline fast path, the slow paths (thread pool and io_uring),
O_DIRECT with bounce buffers."""

from __future__ import annotations

import errno
import mmap
import os
import time
from pathlib import Path

import pytest
from storage_support import Completions, Loop

from vhostd.storage import uring
from vhostd.storage.base import DONE, PENDING
from vhostd.storage.file import FileStorage

SIZE = 4 << 20


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(SIZE))
    return path


@pytest.fixture(params=["threads", "io_uring"])
def aio(request: pytest.FixtureRequest) -> str:
    """Every test runs over both slow paths."""
    if request.param == "io_uring":
        why = uring.unavailable()
        if why is not None:
            pytest.skip(why)
    return str(request.param)


def started(storage: FileStorage, loop: Loop) -> Completions:
    done = Completions()
    storage.on_complete = done
    storage.start(loop)
    # The slow path asked for is the one running.
    assert (storage.ring is not None) == (storage.aio == "io_uring")
    return done


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_page_cache_hit_reads_inline(image: Path, aio: str, loop: Loop) -> None:
    s = FileStorage(str(image), aio=aio)
    try:
        done = started(s, loop)
        buf = bytearray(8192)
        assert s.readv([memoryview(buf)], 4096, "t") == DONE
        assert buf == image.read_bytes()[4096:4096 + 8192]
        assert not done.done and s.in_flight() == 0
    finally:
        s.close()


def test_page_cache_miss_completes_later(image: Path, aio: str, loop: Loop) -> None:
    s = FileStorage(str(image), aio=aio)
    try:
        done = started(s, loop)
        drop_cache(image)
        bufs = [bytearray(4096) for _ in range(4)]
        results = [s.readv([memoryview(b)], 65536 * (i + 1), i) for i, b in enumerate(bufs)]
        if not s._nowait_reads:
            pytest.skip("this file system has no RWF_NOWAIT reads")
        if all(r == DONE for r in results):
            pytest.skip("the page cache could not be dropped here")
        loop.run_until(lambda: len(done.done) == results.count(PENDING))
        assert all(e == 0 for e in done.done.values())
        data = image.read_bytes()
        for i, b in enumerate(bufs):
            assert b == data[65536 * (i + 1):65536 * (i + 1) + 4096]
        assert s.in_flight() == 0
    finally:
        s.close()


def test_writes_flush_discard_and_zeroes(image: Path, aio: str, loop: Loop) -> None:
    s = FileStorage(str(image), aio=aio)
    try:
        done = started(s, loop)
        blob = os.urandom(4096 + 512)
        # Unaligned: the slow path (it may read a page first).
        assert s.writev([memoryview(blob)], 512, "w") == PENDING
        assert s.flush("f") == PENDING
        assert s.write_zeroes(1 << 20, 8192, False, "z") == PENDING
        loop.run_until(lambda: len(done.done) == 3)
        assert done.done == {"w": 0, "f": 0, "z": 0}
        data = image.read_bytes()
        assert data[512:512 + len(blob)] == blob
        assert data[1 << 20:(1 << 20) + 8192] == bytes(8192)
        r = s.discard(2 << 20, 65536, "d")
        if r == PENDING:
            loop.run_until(lambda: "d" in done.done)
            assert done.done["d"] == 0
    finally:
        s.close()


def test_read_past_the_end_fails(image: Path, aio: str, loop: Loop) -> None:
    s = FileStorage(str(image), aio=aio)
    try:
        done = started(s, loop)
        r = s.readv([memoryview(bytearray(4096))], SIZE, "eof")
        assert r == PENDING  # nothing inline: the slow path finds the end
        loop.run_until(lambda: "eof" in done.done)
        assert done.done["eof"] == errno.EIO
    finally:
        s.close()


def test_read_only_write_fails_inline_or_later(image: Path, aio: str, loop: Loop) -> None:
    s = FileStorage(str(image), aio=aio, read_only=True)
    try:
        done = started(s, loop)
        try:
            r = s.writev([memoryview(bytes(4096))], 0, "w")
        except OSError as e:
            assert e.errno == errno.EBADF
            return
        assert r == PENDING
        loop.run_until(lambda: "w" in done.done)
        assert done.done["w"] == errno.EBADF
    finally:
        s.close()


def test_without_a_loop_everything_is_inline(image: Path, aio: str) -> None:
    s = FileStorage(str(image), aio=aio)
    try:
        blob = os.urandom(1000)
        assert s.writev([memoryview(blob)], 3, None) == DONE
        assert s.flush(None) == DONE
        buf = bytearray(1000)
        assert s.readv([memoryview(buf)], 3, None) == DONE
        assert buf == blob
    finally:
        s.close()


@pytest.mark.parametrize("case", ["aligned", "unaligned-memory", "odd-length-segments",
                                  "unaligned-offset", "read-only-buffer"])
def test_direct_transfers(image: Path, aio: str, loop: Loop, case: str) -> None:
    try:
        s = FileStorage(str(image), aio=aio, direct=True)
    except OSError as e:
        pytest.skip(f"no O_DIRECT here: {e}")
    try:
        done = started(s, loop)
        ram = mmap.mmap(-1, 1 << 20)  # page-aligned, like guest memory
        mv = memoryview(ram)
        blob = os.urandom(8192)
        offset = 64 * 1024
        if case == "aligned":
            out = [mv[0:4096], mv[8192:12288]]
        elif case == "unaligned-memory":
            out = [mv[100:100 + 8192]]
        elif case == "odd-length-segments":
            out = [mv[0:1000], mv[4096:4096 + 7192]]
        elif case == "unaligned-offset":
            out = [mv[0:8192]]
            offset += 512 if s.align > 512 else 100
        else:
            out = [memoryview(blob)]  # bytes: no address to check, so bounced
        pos = 0
        for b in out:
            if not b.readonly:
                b[:] = blob[pos:pos + len(b)]
            pos += len(b)
        assert s.writev(out, offset, "w") == PENDING
        loop.run_until(lambda: "w" in done.done)
        assert done.done["w"] == 0
        assert s.flush("f") == PENDING
        loop.run_until(lambda: "f" in done.done)
        assert image.read_bytes()[offset:offset + 8192] == blob
        back = mmap.mmap(-1, 3 * 4096)
        view = memoryview(back)
        ins = [view[1:1 + 5000], view[8192:8192 + 3192]]  # unaligned: bounced
        assert s.readv(ins, offset, "r") == PENDING
        loop.run_until(lambda: "r" in done.done)
        assert done.done["r"] == 0
        assert bytes(ins[0]) + bytes(ins[1]) == blob
        for v in (*ins, view, *out, mv):
            v.release()
        back.close()
        ram.close()
    finally:
        s.close()


def test_worker_spec_shares_the_file(image: Path, aio: str, loop: Loop) -> None:
    s = FileStorage(str(image), aio=aio, direct=False)
    try:
        spec, fds = s.worker_spec()
        w = FileStorage.from_spec(spec, [os.dup(fd) for fd in fds])
        try:
            assert w.aio == aio  # the worker's own ring or pool, of the same kind
            assert w.writev([memoryview(b"x" * 4096)], 0, None) == DONE
            buf = bytearray(4096)
            assert s.readv([memoryview(buf)], 0, None) == DONE
            assert buf == b"x" * 4096
        finally:
            w.close()
    finally:
        s.close()


def test_aio_choice_without_io_uring(image: Path, monkeypatch: pytest.MonkeyPatch,
                                     caplog: pytest.LogCaptureFixture) -> None:
    """Where io_uring is refused (kernel, sysctl, seccomp), the default falls back to
    threads with one INFO line, and an explicit aio=io_uring is a one-line error."""
    from vhostd.storage import file as file_mod

    monkeypatch.setattr(file_mod, "_uring_reason", [])
    monkeypatch.setattr(uring, "unavailable", lambda: "io_uring is disabled on this host")
    with caplog.at_level("INFO", logger="vhostd.storage.file"):
        s = FileStorage(str(image))
        s.close()
        s = FileStorage(str(image))
        s.close()
    assert s.aio == "threads"
    lines = [r for r in caplog.records if "io_uring is disabled" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelname == "INFO"
    with pytest.raises(file_mod.AioUnavailable, match="aio=io_uring: io_uring is disabled"):
        FileStorage(str(image), aio="io_uring")
    with pytest.raises(ValueError):
        FileStorage(str(image), aio="posix")


def test_short_transfers_go_on(image: Path, aio: str, loop: Loop) -> None:
    """A read that meets the end of the file part way fails (EIO) after the kernel
    returned part of it; a vectored read of many segments completes whole."""
    s = FileStorage(str(image), aio=aio)
    try:
        done = started(s, loop)
        drop_cache(image)
        tail = bytearray(8192)
        assert s.readv([memoryview(tail)], SIZE - 4096, "tail") == PENDING
        segs = [bytearray(512) for _ in range(64)]
        r = s.readv([memoryview(b) for b in segs], 1 << 20, "segs")
        loop.run_until(lambda: "tail" in done.done and (r == DONE or "segs" in done.done))
        assert done.done["tail"] == errno.EIO
        assert done.done.get("segs", 0) == 0
        data = image.read_bytes()
        assert tail[:4096] == data[SIZE - 4096:]
        assert b"".join(segs) == data[1 << 20:(1 << 20) + 64 * 512]
        assert s.in_flight() == 0
    finally:
        s.close()


def test_a_walk_submits_its_requests_together(image: Path, loop: Loop,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside a virtqueue walk the first request goes to the kernel at once (nothing
    else is there to wait for it) and the rest at the walk's end, in one system call,
    without a round through the loop; every one completes with the right data."""
    why = uring.unavailable()
    if why is not None:
        pytest.skip(why)
    s = FileStorage(str(image), aio="io_uring", direct=True)
    try:
        done = started(s, loop)
        ring = s.ring
        assert ring is not None
        calls: list[int] = []
        real = ring.submit

        def submit(wait: int = 0) -> int:
            calls.append(ring.queued)
            return real(wait)

        monkeypatch.setattr(ring, "submit", submit)
        ram = mmap.mmap(-1, 8 * 4096)
        views = [memoryview(ram)[i * 4096:(i + 1) * 4096] for i in range(8)]
        s.walk_begin()
        for i, v in enumerate(views):
            assert s.readv([v], i * 4096, i) == PENDING
        assert calls == [1] and ring.queued == 7
        s.walk_end()
        assert calls == [1, 7] and ring.queued == 0
        assert not s._rung  # no doorbell: the loop had nothing to do for it
        loop.run_until(lambda: len(done.done) == 8)
        data = image.read_bytes()
        for i, v in enumerate(views):
            assert done.done[i] == 0
            assert bytes(v) == data[i * 4096:(i + 1) * 4096]
            v.release()
        ram.close()
    finally:
        s.close()


def test_parked_completions_are_found_without_an_eventfd(image: Path, loop: Loop) -> None:
    """Completions parked in the kernel's overflow list bump no eventfd: the storage's
    periodic look at a busy ring finds them, and every request completes."""
    why = uring.unavailable()
    if why is not None:
        pytest.skip(why)
    s = FileStorage(str(image))
    try:
        done = started(s, loop)
        ring = s.ring
        assert ring is not None and s._sweep is not None
        n = ring.cq_entries + 100  # more than the completion ring holds
        ring._slots = [None] * n
        ring._free = list(range(n - 1, -1, -1))
        for i in range(n):
            assert s.flush(i) == PENDING  # each arms the sweep if it is not running
        assert s._sweep.armed
        t0 = time.monotonic()
        while not ring.overflowed():
            assert time.monotonic() - t0 < 5, "the kernel did not park any completion"
            time.sleep(0.001)
        try:
            os.eventfd_read(ring.efd)  # the loop never hears of the first completions
        except BlockingIOError:
            pass
        loop.run_until(lambda: len(done.done) == n, timeout=5)
        assert set(done.done.values()) == {0}
        loop.run_until(lambda: not s._sweep.armed, timeout=2)  # idle: it stops looking
    finally:
        s.close()
