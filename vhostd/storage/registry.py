"""Storage backends rebuilt in a queue worker from what the main process sends
(``worker_spec()`` of a backend)."""

from __future__ import annotations

from typing import Any

from .base import StorageBackend
from .file import FileStorage
from .nbd import NbdStorage


def storage_from_spec(spec: dict[str, Any], fds: list[int]) -> StorageBackend:
    """The worker side of :meth:`StorageBackend.worker_spec`; adopts ``fds``."""
    kind = spec.get("kind")
    if kind == "file":
        return FileStorage.from_spec(spec, fds)
    if kind == "nbd":
        return NbdStorage.from_spec(spec, fds)
    raise ValueError(f"unknown storage kind {kind!r}")
