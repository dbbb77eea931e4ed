"""Prometheus metrics: ``GET /metrics`` in the text exposition format.

The text is made by ``prometheus_client`` (a collector over one live reading of the
devices, then ``generate_latest``), and served by the small HTTP responder below on the
daemon's event loop. prometheus_client's own server runs in a thread and calls collectors
there: it would read device state from outside the event loop and could only reach the
queue workers' counters with a blocking round trip. Here a scrape first awaits the same
live reading the control socket uses (``ControlTarget.device_stats``), then renders it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.utils import floatToGoString

from ..devices.stats import LATENCY_BOUNDS_NS, OPS
from .control import ControlTarget, vhostd_version

log = logging.getLogger("vhostd.metrics")

# The classic text format: every Prometheus version reads it.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST_HEAD = 16 << 10
REQUEST_TIMEOUT = 10.0
_LE = [floatToGoString(b / 1e9) for b in LATENCY_BOUNDS_NS]


class _Reading:
    """A collector over one reading of the devices (prometheus_client calls collect())."""

    def __init__(self, devices: list[dict[str, Any]], stats: list[dict[str, Any]]) -> None:
        self.devices = devices
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        info = InfoMetricFamily("vhostd_build", "vhostd version")
        info.add_metric([], {"version": vhostd_version()})
        yield info
        connected = GaugeMetricFamily("vhostd_frontend_connected",
                                      "1 while a front end is connected to the device",
                                      labels=["device"])
        size = GaugeMetricFamily("vhostd_device_size_bytes", "Capacity the device offers",
                                 labels=["device"])
        for d in self.devices:
            connected.add_metric([d["name"]], 1 if d["frontend-connected"] else 0)
            if d.get("size") is not None:
                size.add_metric([d["name"]], d["size"])
        yield connected
        yield size
        requests = CounterMetricFamily("vhostd_requests", "Requests completed",
                                       labels=["device", "queue", "op"])
        read = CounterMetricFamily("vhostd_read_bytes", "Bytes read from storage for the "
                                   "driver", labels=["device", "queue"])
        written = CounterMetricFamily("vhostd_written_bytes", "Bytes written to storage for "
                                      "the driver", labels=["device", "queue"])
        errors = CounterMetricFamily("vhostd_errors", "Requests completed with an error "
                                     "status", labels=["device", "queue"])
        in_flight = GaugeMetricFamily("vhostd_in_flight", "Requests taken from the ring and "
                                      "not yet completed", labels=["device", "queue"])
        latency = HistogramMetricFamily("vhostd_request_duration_seconds",
                                        "Time from taking a request to completing it",
                                        labels=["device", "queue"])
        for device in self.stats:
            for q in device["queues"]:
                labels = [device["device"], str(q["queue"])]
                for op in OPS:
                    requests.add_metric([*labels, op], q["ops"][op])
                read.add_metric(labels, q["bytes_read"])
                written.add_metric(labels, q["bytes_written"])
                errors.add_metric(labels, q["errors"])
                in_flight.add_metric(labels, q["in_flight"])
                buckets, seen = [], 0
                for le, n in zip(_LE, q["latency_buckets"], strict=False):
                    seen += n
                    buckets.append((le, seen))
                buckets.append(("+Inf", sum(q["latency_buckets"])))
                latency.add_metric(labels, buckets, q["latency_sum_ns"] / 1e9)
        yield from (requests, read, written, errors, in_flight, latency)


async def render(target: ControlTarget) -> bytes:
    """The /metrics text: one live reading, and this process's own metrics."""
    stats = await target.device_stats(None)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Reading(target.devices(), stats))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return generate_latest(registry)


class MetricsServer:
    """``GET /metrics`` over HTTP/1.x; one response per connection."""

    def __init__(self, target: ControlTarget, sock: socket.socket) -> None:
        self.target = target
        self.sock = sock
        self.server: asyncio.AbstractServer | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._connected, sock=self.sock,
                                                 limit=MAX_REQUEST_HEAD)
        log.info("metrics on http://%s/metrics", self.address)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            try:
                await task
            except asyncio.CancelledError:
                pass

    def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                    ConnectionError):
                return
            status, body, ctype = await self._respond(head)
            method = head.split(b" ", 1)[0]
            writer.write(b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n" % (status.encode(), ctype.encode(),
                                                         len(body)))
            if method != b"HEAD":
                writer.write(body)
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (TimeoutError, ConnectionError):
            pass
        finally:
            if writer.transport.get_write_buffer_size():
                writer.transport.abort()  # a scraper that stopped reading
            else:
                writer.close()

    async def _respond(self, head: bytes) -> tuple[str, bytes, str]:
        text = "text/plain; charset=utf-8"
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return "400 Bad Request", b"bad request\n", text
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return "405 Method Not Allowed", b"only GET\n", text
        if target == b"/metrics":
            try:
                return "200 OK", await render(self.target), CONTENT_TYPE
            except Exception:
                log.exception("internal error rendering metrics")
                return "500 Internal Server Error", b"internal error\n", text
        if target == b"/":
            return "200 OK", b"vhostd: metrics are at /metrics\n", text
        return "404 Not Found", b"not found\n", text
