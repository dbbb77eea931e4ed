"""OneShotTimer: a timerfd watched like the kick eventfds (engine/timer.py)."""

from __future__ import annotations

import os
import selectors
import time
from collections.abc import Callable
from typing import Any

import pytest

from vhostd.engine.timer import OneShotTimer


class Watcher:
    """The FdWatcher part of an event loop, on a selector."""

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()

    def add_reader(self, fd: int, callback: Callable[..., Any], *args: Any) -> None:
        self.sel.register(fd, selectors.EVENT_READ, (callback, args))

    def remove_reader(self, fd: int) -> None:
        self.sel.unregister(fd)

    def run(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            for key, _ in self.sel.select(left):
                callback, args = key.data
                callback(*args)


def test_fires_once_after_the_delay_and_not_again() -> None:
    w = Watcher()
    fired: list[float] = []
    t = OneShotTimer(w, lambda: fired.append(time.monotonic()), 200)
    start = time.monotonic()
    t.arm()
    w.run(0.05)
    assert len(fired) == 1
    assert fired[0] - start >= 200e-6
    w.run(0.02)
    assert len(fired) == 1  # one shot: nothing re-arms it
    t.arm()
    w.run(0.02)
    assert len(fired) == 2
    t.close()


def test_arming_again_moves_the_deadline() -> None:
    # Judged by when it fired, not by windows of the test's own sleeps, so a loaded
    # machine that preempts the test cannot make it fail.
    w = Watcher()
    fired: list[float] = []
    t = OneShotTimer(w, lambda: fired.append(time.monotonic()), 50_000)  # 50 ms
    t.arm()
    w.run(0.02)
    if fired:
        pytest.skip("the test was preempted past the first deadline; nothing to judge")
    rearmed = time.monotonic()
    t.arm()  # about 20 ms in: the deadline moves to 50 ms from now
    w.run(0.3)
    assert len(fired) == 1
    assert fired[0] >= rearmed + 0.05
    t.close()


def test_close_unwatches_and_closes_the_fd() -> None:
    w = Watcher()
    t = OneShotTimer(w, lambda: None, 100)
    fd = t.fd
    t.arm()
    t.close()
    assert t.fd == -1 and not w.sel.get_map()
    try:
        os.fstat(fd)
    except OSError:
        pass
    else:
        raise AssertionError("the timerfd is still open")
    t.close()  # twice is harmless
