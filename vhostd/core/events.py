"""Daemon events: what happened to a device, for whoever listens (the control socket).

Any layer may :func:`emit`; only the shell subscribes. Emitting with no subscriber costs a
truth test. Names follow QMP's event style (``FRONTEND_CONNECTED``, ``DEVICE_NEEDS_RESET``);
``data`` is JSON-able and names its device (``"device": "member1"``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

Listener = Callable[[str, dict[str, Any]], None]

FRONTEND_CONNECTED = "FRONTEND_CONNECTED"
FRONTEND_DISCONNECTED = "FRONTEND_DISCONNECTED"
DEVICE_NEEDS_RESET = "DEVICE_NEEDS_RESET"
IO_ERROR = "IO_ERROR"
MEMBER_MODE_CHANGE = "MEMBER_MODE_CHANGE"
DEVICE_RESIZED = "DEVICE_RESIZED"

_listeners: list[Listener] = []


def subscribe(listener: Listener) -> None:
    _listeners.append(listener)


def unsubscribe(listener: Listener) -> None:
    try:
        _listeners.remove(listener)
    except ValueError:
        pass


def emit(name: str, **data: Any) -> None:
    """Tell every listener; a listener that fails is logged and does not stop the others."""
    if not _listeners:
        return
    for listener in list(_listeners):
        try:
            listener(name, data)
        except Exception:
            log.exception("event listener failed on %s", name)
