"""A full memory barrier for shared-memory rings.

x86-64 keeps stores in order and loads in order, but may let a load pass an earlier
store. Where a ring protocol stores one index and then loads the peer's (avail_event
then avail.idx, used.idx then used_event), that reordering loses a notification.
CPython has no fence primitive; taking an uncontended lock executes a locked
read-modify-write, which on x86 orders every earlier load and store before every
later one.
"""

from __future__ import annotations

import threading

_lock = threading.Lock()


def full_barrier() -> None:
    with _lock:
        pass
