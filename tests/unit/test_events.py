"""The daemon's event bus."""

from typing import Any

from vhostd.core import events


def test_listeners_get_events_and_a_failing_one_does_not_stop_others() -> None:
    got: list[tuple[str, dict[str, Any]]] = []

    def broken(name: str, data: dict[str, Any]) -> None:
        raise RuntimeError("listener bug")

    events.subscribe(broken)
    events.subscribe(lambda n, d: got.append((n, d)))
    try:
        events.emit(events.DEVICE_RESIZED, device="blk0", size=1 << 20)
    finally:
        events._listeners.clear()
    assert got == [("DEVICE_RESIZED", {"device": "blk0", "size": 1 << 20})]
    events.emit(events.IO_ERROR, device="blk0")  # nobody listens: nothing happens
