"""A periodic look at every front-end connection, for fds the loop stopped watching.

uvloop (libuv) stops watching an fd for good when poll reports an error on it
(POLLERR), without calling its reader again and without telling anyone we can rely
on. A unix socket gets that error when its peer closes while replies are still
unread in the peer's receive buffer: a front end that sends a request, leaves the
reply unread and closes. The connection would then never be read again, stay the
device's front end forever, and the device would refuse every new one.

The guard re-checks each registered connection every :data:`SWEEP_S` seconds: the
connection reads what is waiting (up to the hang-up of a front end that has gone)
without blocking. It costs one ``recvmsg`` that finds nothing per connection per
sweep. asyncio's own loop keeps reporting such an fd as readable, so there the
sweep only ever finds nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

SWEEP_S = 0.5

_guards: dict[int, LoopGuard] = {}


class LoopGuard:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.rechecks: dict[int, Callable[[], None]] = {}
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, key: int, recheck: Callable[[], None]) -> None:
        self.rechecks[key] = recheck
        if self._timer is None:
            self._timer = self.loop.call_later(SWEEP_S, self._sweep)

    def forget(self, key: int) -> None:
        self.rechecks.pop(key, None)
        if not self.rechecks and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _sweep(self) -> None:
        self._timer = None
        for recheck in list(self.rechecks.values()):
            recheck()
        if self.rechecks and self._timer is None and not self.loop.is_closed():
            self._timer = self.loop.call_later(SWEEP_S, self._sweep)


def guard(loop: asyncio.AbstractEventLoop) -> LoopGuard:
    """The loop's guard, made on first use."""
    g = _guards.get(id(loop))
    if g is None or g.loop is not loop:
        g = _guards[id(loop)] = LoopGuard(loop)
    return g
