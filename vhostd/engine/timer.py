"""Timers on a timerfd, watched like any other fd: one-shot, and periodic.

The event loop's own timers (uvloop) have millisecond resolution; a ring that lets
the driver batch its kicks (virtqueue.py, "kick batching") needs a fallback look at
the ring within about a hundred microseconds. Linux's timerfd gives that, and as an
fd it fits the engine's FdWatcher (loop.py); Python 3.11 has no os.timerfd_*, hence ctypes.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

from .loop import FdWatcher

CLOCK_MONOTONIC = 1
TFD_NONBLOCK = os.O_NONBLOCK
TFD_CLOEXEC = os.O_CLOEXEC


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_libc = ctypes.CDLL(None, use_errno=True)
_timerfd_create = _libc.timerfd_create
_timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
_timerfd_create.restype = ctypes.c_int
_timerfd_settime = _libc.timerfd_settime
_timerfd_settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec),
                             ctypes.c_void_p]
_timerfd_settime.restype = ctypes.c_int


class OneShotTimer:
    """Calls ``callback`` once, ``delay_us`` microseconds after the latest :meth:`arm`
    (arming again moves the deadline)."""

    def __init__(self, watcher: FdWatcher, callback: Callable[[], None], delay_us: int) -> None:
        fd = _timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_create: {os.strerror(err)}")
        self.fd = fd
        self.callback = callback
        self._spec = _Itimerspec()
        self._spec.it_value.tv_sec = delay_us // 1_000_000
        self._spec.it_value.tv_nsec = delay_us % 1_000_000 * 1000
        self._spec_ref = ctypes.byref(self._spec)
        self.watcher = watcher
        watcher.add_reader(fd, self._fired)

    def arm(self) -> None:
        _timerfd_settime(self.fd, 0, self._spec_ref, None)

    def _fired(self) -> None:
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            return  # re-armed after it expired: the new deadline has not come yet
        self.callback()

    def close(self) -> None:
        if self.fd < 0:
            return
        self.watcher.remove_reader(self.fd)
        os.close(self.fd)
        self.fd = -1


class PeriodicTimer(OneShotTimer):
    """Calls ``callback`` every ``period_us`` microseconds from :meth:`arm` until
    :meth:`disarm`."""

    def __init__(self, watcher: FdWatcher, callback: Callable[[], None], period_us: int) -> None:
        super().__init__(watcher, callback, period_us)
        self._spec.it_interval.tv_sec = self._spec.it_value.tv_sec
        self._spec.it_interval.tv_nsec = self._spec.it_value.tv_nsec
        self._off = _Itimerspec()
        self.armed = False

    def arm(self) -> None:
        super().arm()
        self.armed = True

    def disarm(self) -> None:
        _timerfd_settime(self.fd, 0, ctypes.byref(self._off), None)
        self.armed = False
