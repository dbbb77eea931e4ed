"""Run devices on an event loop until SIGTERM/SIGINT; SIGHUP re-reads disk sizes;
SIGUSR1 logs the state of every ring."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from dataclasses import dataclass

from ..engine.backend import VhostUserBackend
from .server import DeviceServer
from .worker import WorkerProcess

log = logging.getLogger("vhostd")


@dataclass
class Endpoint:
    """A device's back end and where its front end connects."""

    backend: VhostUserBackend
    sock: socket.socket
    path: str | None


class Daemon:
    """Every device of one vhostd process, on one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, endpoints: list[Endpoint],
                 workers: list[WorkerProcess] | None = None) -> None:
        self.loop = loop
        self.stopping = asyncio.Event()
        self.servers = [DeviceServer(loop, ep.backend, ep.sock, ep.path) for ep in endpoints]
        self.workers = workers or []
        for server in self.servers:
            # A store that learns its size later (NBD) reports back here after SIGHUP.
            dev = server.backend.device
            for d in (dev, getattr(dev, "disk", None)):
                if d is not None and hasattr(d, "on_resize"):
                    d.on_resize = lambda s=server: self._resized(s)
        for worker in self.workers:
            worker.watch(loop, self._worker_exited)

    def _worker_exited(self, worker: WorkerProcess) -> None:
        """A queue worker died: its rings are served by this process from now on."""
        for server in self.servers:
            server.backend.host_died(worker)

    def refresh_capacity(self) -> None:
        """SIGHUP: a backing file may have grown; tell the front ends that changed."""
        for server in self.servers:
            changed = server.backend.refresh_capacity()
            if changed and server.connection is not None:
                server.backend.config_changed()

    def _resized(self, server: DeviceServer) -> None:
        if server.backend.refresh_capacity() and server.connection is not None:
            server.backend.config_changed()

    def report_state(self) -> None:
        """SIGUSR1: every device's rings, one log line each."""
        for server in self.servers:
            front = "a front end connected" if server.connection is not None else "no front end"
            server.log.info("state: %s", front)
            for line in server.backend.state_report():
                server.log.info("state: %s", line)
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
        try:
            await self.stopping.wait()
        finally:
            log.info("shutting down")
            for server in self.servers:
                server.close()
            for worker in self.workers:
                worker.close()
            for server in self.servers:
                server.backend.device.close()
