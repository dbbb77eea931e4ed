"""What the control socket and the metrics endpoint read of the running devices.

Descriptions are plain data (JSON-able). Request counters are read live: rings served in
this process are read directly, rings served by a queue worker are asked of the worker
without waiting on the event loop (``WorkerProcess.request_stats``); a worker that does
not answer in time leaves its rings with the numbers this process last merged, marked
``live: false``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from vhostd_proto import vhost_user as vu
from vhostd_proto.virtio import Feature
from vhostd_proto.virtio_blk import VIRTIO_BLK_SECTOR_SIZE, BlkFeature

from ..devices.blk import BlkDevice
from ..devices.owner import OwnerDevice
from ..devices.stats import QueueStats, add_snapshots

if TYPE_CHECKING:
    from .server import DeviceServer

# How long a stats read waits for the queue workers.
WORKER_STATS_TIMEOUT = 2.0


def find(servers: Iterable[DeviceServer], name: str) -> DeviceServer:
    """The server of device ``name``; KeyError if there is none."""
    for server in servers:
        if server.backend.device.name == name:
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
    owner_of: dict[str, str] = {}
    for server in servers:
        device = server.backend.device
        if isinstance(device, OwnerDevice):
            for member in device.members:
                owner_of[member.device.name] = device.name
    return [_describe(server, owner_of) for server in servers]


def _describe(server: DeviceServer, owner_of: dict[str, str]) -> dict[str, Any]:
    backend = server.backend
    device = backend.device
    hosts = backend.hosts
    out: dict[str, Any] = {
        "name": device.name,
        "type": "owner" if isinstance(device, OwnerDevice) else "blk",
        "socket": server.path or f"fd {server.sock.fileno()}",
        "frontend-connected": server.connection is not None,
        "num-queues": device.num_queues,
        "features": backend.features,
        "feature-names": feature_names(backend.features),
        "queue-hosts": [h.name if h is not None else "main" for h in hosts],
    }
    disk = disk_of(device)
    if disk is not None:
        path = getattr(disk.backend, "path", None)
        out["image"] = os.path.abspath(path) if path else None
        out["size"] = disk.capacity * VIRTIO_BLK_SECTOR_SIZE
        out["read-only"] = bool(disk.backend.read_only)
        out["write-cache"] = "writeback" if disk.wce else "writethrough"
    if isinstance(device, OwnerDevice):
        out["members"] = [m.device.name for m in device.members]
    if device.name in owner_of:
        out["owner"] = owner_of[device.name]
        out["mode"] = backend.mode.value
    return out


def _counters(server: DeviceServer) -> list[QueueStats]:
    disk = disk_of(server.backend.device)
    return list(getattr(disk, "queue_stats", [])) if disk is not None else []


async def device_stats(servers: list[DeviceServer], name: str | None = None
                       ) -> list[dict[str, Any]]:
    """Request counters of one device (or all), per queue, read live.

    Each queue: ``{"queue", "served-by", "live", **QueueStats.snapshot()}``. A ring a
    worker serves counts what this process counted (its earlier stays here) plus what
    the worker counted since it arrived there; both parts are taken at the moment the
    worker's reply is read, before any later request moves a ring, so nothing is
    counted twice.
    """
    targets = [find(servers, name)] if name is not None else list(servers)
    counters = {(s.backend.device.name, i): c
                for s in targets for i, c in enumerate(_counters(s))}
    loop = asyncio.get_running_loop()
    got: dict[tuple[str, int], tuple[dict[str, Any], str]] = {}
    answered: set[int] = set()
    closed = False
    waits = []
    workers = {id(h): h for s in targets for h in s.backend.hosts if h is not None}
    for worker in workers.values():
        request = getattr(worker, "request_stats", None)
        if request is None:
            continue
        done = loop.create_future()

        def on_reply(reply: dict[str, Any] | None, worker: Any = worker,
                     done: asyncio.Future[None] = done) -> None:
            if reply is not None and not closed:
                answered.add(id(worker))
                for ring in reply["rings"]:
                    key = (ring["device"], ring["queue"])
                    if key in counters and ring["stats"] is not None:
                        got[key] = (add_snapshots(counters[key].snapshot(), ring["stats"]),
                                    worker.name)
            if not done.done():
                done.set_result(None)

        request(on_reply)
        waits.append(done)
    if waits:
        await asyncio.wait(waits, timeout=WORKER_STATS_TIMEOUT)
    closed = True
    result = []
    for server in targets:
        dname = server.backend.device.name
        away = server.backend.ring_hosts()
        queues = []
        for i, c in enumerate(_counters(server)):
            if (dname, i) in got:
                snap, where = got[(dname, i)]
                live = True
            else:
                host = away.get(i)
                snap = c.snapshot()
                where = host.name if host is not None else "main"
                live = host is None or id(host) in answered
            queues.append({"queue": i, "served-by": where, "live": live, **snap})
        result.append({"device": dname, "queues": queues})
    return result
