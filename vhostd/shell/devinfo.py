"""What the control socket and the metrics endpoint read of the running devices.

Descriptions are plain data (JSON-able). Request counters are read live, where each
ring runs (``RingPlacement.stats``): rings served by a queue worker are asked of the
worker without stopping or moving them and without waiting on the event loop; a worker
that does not answer in time leaves its rings with the numbers this process last
merged, marked ``live: false``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from vhostd_proto import vhost_user as vu
from vhostd_proto.virtio import Feature
from vhostd_proto.virtio_blk import VIRTIO_BLK_SECTOR_SIZE, BlkFeature

from ..core.pending import Pending
from ..devices.blk import BlkDevice
from ..devices.owner import OwnerDevice
from ..devices.stats import QueueStats, add_snapshots

if TYPE_CHECKING:
    from ..vhost_user.member import Member
    from .server import DeviceServer

# How long a stats read waits for the queue workers.
WORKER_STATS_TIMEOUT = 2.0


def find(servers: Iterable[DeviceServer], name: str) -> DeviceServer:
    """The server of device ``name``; KeyError if there is none."""
    for server in servers:
        if server.handler.name == name:
            return server
    raise KeyError(name)


def disk_of(device: object) -> BlkDevice | None:
    """The virtio-blk device behind a device: itself, an owner's own disk, or None."""
    if isinstance(device, BlkDevice):
        return device
    if isinstance(device, OwnerDevice):
        return device.disk
    return None


def size_bytes(device: object) -> int | None:
    disk = disk_of(device)
    return disk.capacity * VIRTIO_BLK_SECTOR_SIZE if disk is not None else None


def feature_names(bits: int) -> list[str]:
    """Names of the feature bits set in ``bits`` (``bit N`` for unknown ones)."""
    names = {int(f): f.name for f in BlkFeature}
    names.update({int(f): f.name for f in Feature})
    names[vu.VHOST_USER_F_PROTOCOL_FEATURES] = "VHOST_USER_F_PROTOCOL_FEATURES"
    names[vu.VHOST_F_LOG_ALL] = "VHOST_F_LOG_ALL"
    return [names.get(b, f"bit {b}") for b in range(64) if bits >> b & 1]


def describe_devices(servers: list[DeviceServer]) -> list[dict[str, Any]]:
    """Every device: what it serves, where, and its front end's state."""
    members: dict[str, tuple[str, Member]] = {}
    for server in servers:
        device = server.handler.device
        if isinstance(device, OwnerDevice):
            for member in device.members:
                members[member.name] = (device.name, member)
    return [_describe(server, members) for server in servers]


def _describe(server: DeviceServer, members: dict[str, tuple[str, Member]]
              ) -> dict[str, Any]:
    handler = server.handler
    device = handler.device
    placement = handler.placement
    out: dict[str, Any] = {
        "name": handler.name,
        "type": "owner" if isinstance(device, OwnerDevice) else "blk",
        "socket": server.path or f"fd {server.sock.fileno()}",
        "frontend-connected": server.connection is not None,
        "num-queues": device.num_queues,
        "features": handler.features,
        "feature-names": feature_names(handler.features),
        # Which process serves each ring when it runs (a ring held in the main process
        # for a moment still belongs to its worker).
        "queue-hosts": [w.name if w is not None else "main" for w in placement.workers],
    }
    disk = disk_of(device)
    if disk is not None:
        storage = getattr(disk, "storage", None) or getattr(disk, "backend", None)
        path = getattr(storage, "path", None)
        out["image"] = os.path.abspath(path) if path else None
        out["size"] = disk.capacity * VIRTIO_BLK_SECTOR_SIZE
        out["read-only"] = bool(getattr(storage, "read_only", False))
        out["write-cache"] = "writeback" if disk.wce else "writethrough"
    if isinstance(device, OwnerDevice):
        out["members"] = [m.name for m in device.members]
    if handler.name in members:
        owner, member = members[handler.name]
        out["owner"] = owner
        out["mode"] = member.mode.value
    return out


def _counters(server: DeviceServer) -> list[QueueStats]:
    disk = disk_of(server.handler.device)
    return list(getattr(disk, "queue_stats", [])) if disk is not None else []


async def _read(pending: Any) -> Any:
    if not isinstance(pending, Pending):
        return pending
    future = asyncio.get_running_loop().create_future()

    def done(p: Pending[Any]) -> None:
        if not future.done():
            try:
                future.set_result(p.result())
            except Exception as e:
                future.set_exception(e)

    pending.then(done)
    return await future


async def device_stats(servers: list[DeviceServer], name: str | None = None
                       ) -> list[dict[str, Any]]:
    """Request counters of one device (or all), per queue, read live.

    Each queue: ``{"queue", "served-by", "live", **QueueStats.snapshot()}``. A ring a
    worker serves counts what this process counted (its earlier stays here) plus what
    the worker counted since it arrived there.
    """
    targets = [find(servers, name)] if name is not None else list(servers)
    readings = [s.handler.placement.stats() for s in targets]
    rings: list[list[dict[str, Any]]] = []
    for server, reading in zip(targets, readings, strict=True):
        try:
            rings.append(await asyncio.wait_for(_read(reading), WORKER_STATS_TIMEOUT))
        except TimeoutError:
            # Last merged numbers for every ring of this device.
            rings.append([{"where": server.handler.placement.where(i), "live": False,
                           "device_here": c.snapshot(), "device_there": None}
                          for i, c in enumerate(_counters(server))])
    result = []
    for server, per_ring in zip(targets, rings, strict=True):
        queues = []
        for i, c in enumerate(_counters(server)):
            ring = per_ring[i] if i < len(per_ring) else {}
            snap = ring.get("device_here") or c.snapshot()
            if ring.get("device_there") is not None:
                snap = add_snapshots(snap, ring["device_there"])
            queues.append({"queue": i, "served-by": ring.get("where") or "main",
                           "live": bool(ring.get("live", True)), **snap})
        result.append({"device": server.handler.name, "queues": queues})
    return result
