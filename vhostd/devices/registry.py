"""The device kinds a queue worker can rebuild from what the main process sends
(``worker_spec()`` of a device)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..engine.loop import FdWatcher
from .blk import BlkDevice

# kind -> constructor taking (spec, fds); the constructor adopts the fds.
_KINDS: dict[str, Callable[[dict[str, object], list[int]], object]] = {
    "blk": BlkDevice.from_worker_spec,
}


def device_from_spec(spec: dict[str, object], fds: list[int],
                     watcher: FdWatcher | None = None) -> object:
    """The device ``spec`` describes; with ``watcher``, its storage completes requests
    on that loop (else inline)."""
    try:
        make = _KINDS[str(spec["kind"])]
    except KeyError:
        raise ValueError(f"no device kind {spec.get('kind')!r} can run in a worker") from None
    device: Any = make(spec, fds)
    if watcher is not None and hasattr(device, "start"):
        device.start(watcher)
    return device
