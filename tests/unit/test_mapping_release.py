"""A released mapping goes away with the last view that pins it, even while the object
that owned it lives on.

Found by fuzzing the message handler: a front end removed a region while a ring still
had views into it, so the unmap had to wait for those views; the region object itself
stayed reachable from an exception's traceback (a frame that had looked at it), and
with it the mapping and the fd that ``mmap`` keeps, long after the front end left.
"""

from __future__ import annotations

import os

from vhostd.engine.dirtylog import DirtyLog
from vhostd.engine.inflight import InflightRegion
from vhostd.engine.memory import GuestMemory
from vhostd.engine.seals import sealed_memfd

SIZE = 1 << 20


def held(name: str) -> tuple[int, int]:
    """(mappings, fds) of this process that refer to the memfd called ``name``."""
    tag = f"/memfd:{name} "
    with open("/proc/self/maps") as f:
        maps = sum(1 for line in f if tag in line + " ")
    fds = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(tag):
                fds += 1
        except OSError:
            pass
    return maps, fds


def test_removed_region_pinned_by_a_view_then_kept_by_a_stale_reference() -> None:
    name = "vhostd-test-release-ram"
    fd = sealed_memfd(name, SIZE)
    try:
        mem = GuestMemory()
        region = mem.add(fd, 0, SIZE, 0x7F0000000000, 0)
        pin = mem.gpa(0x1000, 64)  # a ring's view, or a request still at the device
        assert mem.remove(0, SIZE, 0x7F0000000000)
        assert held(name) == (1, 2)  # still mapped for the view; our fd and mmap's
        del pin
        # ``region`` stands for whatever still reaches the object (a traceback's frame).
        assert region is not None
        assert held(name) == (0, 1)  # only the fd the test itself owns
    finally:
        os.close(fd)
    assert held(name) == (0, 0)


def test_cleared_table_with_a_pinned_region() -> None:
    name = "vhostd-test-release-clear"
    fd = sealed_memfd(name, SIZE)
    try:
        mem = GuestMemory()
        regions = [mem.add(fd, 0, SIZE, 0x7F0000000000, 0)]
        pin = mem.qva(0x7F0000000000, 16)
        mem.clear()
        del pin
        assert regions and held(name) == (0, 1)
    finally:
        os.close(fd)


def test_dirty_log_and_inflight_region_closed_while_pinned() -> None:
    for name, make, view in (
        ("vhostd-test-release-log",
         lambda fd: DirtyLog(fd, 4096, 0), lambda o: o.bitmap[0:8]),
        ("vhostd-test-release-inflight",
         lambda fd: InflightRegion(fd, SIZE, 0, 1, 64), lambda o: memoryview(o.mm)[0:8]),
    ):
        fd = sealed_memfd(name, SIZE)
        try:
            obj = make(fd)
            pin = view(obj)
            obj.close()
            assert held(name)[0] == 1
            del pin
            assert obj is not None and held(name) == (0, 1), name
        finally:
            os.close(fd)
