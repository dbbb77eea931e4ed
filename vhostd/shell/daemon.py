"""Run devices on an event loop until SIGTERM/SIGINT; SIGHUP re-reads storage sizes;
SIGUSR1 logs the state of every ring."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core import events
from ..core.pending import Pending, after
from ..vhost_user.handler import VhostUserHandler
from . import devinfo
from .server import DeviceServer
from .worker import WorkerProcess

log = logging.getLogger("vhostd")

# How long SIGTERM waits for requests still at the storage before exiting anyway (they
# stay in the inflight region, and a restarted vhostd serves them again).
STOP_GRACE_SECONDS = 2.0
# A request the storage has held this long is logged (once) with the storage's state:
# a guest waiting on it sees a hung disk, and the log says where the request is.
OVERDUE_SECONDS = 30.0
OVERDUE_SWEEP_SECONDS = 5.0


@dataclass
class Endpoint:
    """A device's vhost-user handler and where its front end connects."""

    handler: VhostUserHandler
    sock: socket.socket
    path: str | None


async def wait_for(pending: Pending[Any] | Any) -> Any:
    """Await a Pending (or take a plain value) on the running asyncio loop."""
    if not isinstance(pending, Pending):
        return pending
    future = asyncio.get_running_loop().create_future()

    def done(p: Pending[Any]) -> None:
        if future.done():
            return
        try:
            future.set_result(p.result())
        except Exception as e:
            future.set_exception(e)

    pending.then(done)
    return await future


class Daemon:
    """Every device of one vhostd process, on one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, endpoints: list[Endpoint],
                 workers: list[WorkerProcess] | None = None) -> None:
        self.loop = loop
        self.stopping = asyncio.Event()
        self.servers = [DeviceServer(loop, ep.handler, ep.sock, ep.path) for ep in endpoints]
        self.workers = workers or []
        self._sweep: asyncio.TimerHandle | None = None
        # Called once every socket is watched and the signal handlers are in place.
        self.on_ready: Callable[[], None] | None = None
        for server in self.servers:
            # Storage that learns its size later (NBD) reports back here after SIGHUP.
            for d in _disks(server):
                if hasattr(d, "on_resize"):
                    d.on_resize = lambda s=server: self._refresh(s)
        for worker in self.workers:
            worker.attach(loop, self._worker_exited)

    def _worker_exited(self, worker: WorkerProcess) -> None:
        """A queue worker died: its rings are served by this process from now on."""
        for server in self.servers:
            server.handler.placement.worker_died(worker)

    def refresh_capacity(self) -> None:
        """SIGHUP: storage may have grown; tell the front ends whose device changed."""
        for server in self.servers:
            self._refresh(server)

    def _refresh(self, server: DeviceServer) -> bool | Pending[bool]:
        def told(changed: bool) -> bool:
            if changed:
                events.emit(events.DEVICE_RESIZED, device=server.handler.name,
                            size=devinfo.size_bytes(server.handler.device))
            return changed

        result = after(server.handler.refresh_capacity(), told)
        if isinstance(result, Pending):
            result.then(_log_failure(server, "re-reading the size"))
        return result

    # ---- what the control socket and metrics ask (control.ControlTarget) ----
    def devices(self) -> list[dict[str, Any]]:
        return devinfo.describe_devices(self.servers)

    async def device_stats(self, name: str | None = None) -> list[dict[str, Any]]:
        return await devinfo.device_stats(self.servers, name)

    async def resize(self, name: str) -> dict[str, Any]:
        server = devinfo.find(self.servers, name)
        changed = await wait_for(self._refresh(server))
        return {"size": devinfo.size_bytes(server.handler.device), "changed": changed}

    def set_log_level(self, level: str) -> None:
        logging.getLogger().setLevel(level.upper())

    def _sweep_overdue(self) -> None:
        """Name requests the storage has held for :data:`OVERDUE_SECONDS` (rings this
        process serves; a queue worker's are its own)."""
        self._sweep = None
        for server in self.servers:
            for d in _disks(server):
                overdue = getattr(d, "overdue", None)
                if overdue is None:
                    continue
                try:
                    lines = overdue(int(OVERDUE_SECONDS * 1e9))
                except Exception:
                    server.log.exception("internal error looking for overdue requests")
                    continue
                for line in lines:
                    server.log.warning("overdue: %s", line)
        if not self.stopping.is_set():
            self._sweep = self.loop.call_later(OVERDUE_SWEEP_SECONDS, self._sweep_overdue)

    def report_state(self) -> None:
        """SIGUSR1: every device's rings, one log line each, read where they run."""
        for server in self.servers:
            front = "a front end connected" if server.connection is not None else "no front end"

            def write(lines: list[str], server: DeviceServer = server, front: str = front
                      ) -> None:
                server.log.info("state: %s", front)
                for line in lines:
                    server.log.info("state: %s", line)

            report = server.handler.state_report()
            if isinstance(report, Pending):
                report.map(write).then(_log_failure(server, "reporting state"))
            else:
                write(report)
        for worker in self.workers:
            log.info("state: queue worker %s pid %d", worker.name, worker.pid)

    async def run(self) -> None:
        loop = self.loop
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.refresh_capacity)
        loop.add_signal_handler(signal.SIGUSR1, self.report_state)
        for server in self.servers:
            server.log.info("listening on %s", server.path or f"fd {server.sock.fileno()}")
        if self.on_ready is not None:
            self.on_ready()
        self._sweep = loop.call_later(OVERDUE_SWEEP_SECONDS, self._sweep_overdue)
        try:
            await self.stopping.wait()
        finally:
            if self._sweep is not None:
                self._sweep.cancel()
            log.info("shutting down")
            # Stopping already: a repeated SIGTERM (a supervisor, a test harness) must
            # neither cut the drain short nor turn a clean exit into death by signal.
            loop.remove_signal_handler(signal.SIGTERM)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            for server in self.servers:
                server.close()
            await self._drain()
            for worker in self.workers:
                worker.close()
            for server in self.servers:
                server.handler.device.close()

    async def _drain(self) -> None:
        """Give requests still at the storage a moment to complete and be published."""
        waits = [wait_for(s.draining) for s in self.servers if s.draining is not None]
        if not waits:
            return
        log.info("waiting up to %.0f s for requests still at the storage", STOP_GRACE_SECONDS)
        try:
            await asyncio.wait_for(asyncio.gather(*waits), STOP_GRACE_SECONDS)
        except TimeoutError:
            log.warning("requests still at the storage after %.0f s; they stay in the "
                        "inflight region for the next vhostd", STOP_GRACE_SECONDS)


def _disks(server: DeviceServer) -> list[Any]:
    """The server's device, and the owner's own disk if it has one."""
    dev = server.handler.device
    disk = getattr(dev, "disk", None)
    return [dev] if disk is None else [dev, disk]


def _log_failure(server: DeviceServer, what: str) -> Any:
    def check(p: Pending[Any]) -> None:
        try:
            p.result()
        except Exception:
            server.log.exception("internal error %s", what)

    return check
