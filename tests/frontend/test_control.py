"""The control socket (QMP) and the metrics endpoint of a real vhostd process.

The QMP side is what users run: ``qemu.qmp``'s ``QMPClient`` and ``qmp-shell``, plus a raw
socket for what a well-behaved client never sends. The requests whose counters are read
back are made by the project's front end (``BlkFrontend``) on both queues of a disk, with
the second queue served in a queue worker process where the test asks for one.

The ``vhostd`` fixture (tests/conftest.py) checks at teardown that the daemon's log has no
traceback or internal error and that it exited 0.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from frontend_support import MiB, collect
from prometheus_client.parser import text_string_to_metric_families
from qemu.qmp import ExecuteError, QMPClient

from vhostd.devices.stats import OPS
from vhostd.frontend.admin import AdminDriver
from vhostd.frontend.blk import BlkFrontend
from vhostd_proto.vhost_user import VHOST_USER_F_PROTOCOL_FEATURES

DISK = 16 * MiB
TIMEOUT = 10.0  # generous: the machine is shared
BLOCK = 4096



class Daemon:
    def __init__(self, proc: Any, control: Path, image: Path) -> None:
        self.proc = proc
        self.control = control
        self.image = image

    @property
    def log(self) -> str:
        return str(self.proc.log)

    def metrics_url(self) -> str:
        found = re.findall(r"metrics on (http://\S+/metrics)", self.log)
        assert found, self.log
        return found[0]

    async def client(self, name: str = "test") -> QMPClient:
        qmp = QMPClient(name)
        await asyncio.wait_for(qmp.connect(str(self.control)), TIMEOUT)
        return qmp


@pytest.fixture
def start(vhostd: Callable[..., Any], sparse_image: Callable[..., Path],
          short_dir: Path) -> Callable[..., Daemon]:
    def run(*extra: str, workers: int = 0) -> Daemon:
        image = sparse_image(DISK)
        control = short_dir / "control.sock"
        proc = vhostd(f"--blk-file={image}", "--num-queues=2", f"--queue-workers={workers}",
                      f"--control-socket={control}", *extra,
                      socket_path=short_dir / "disk.sock")
        return Daemon(proc, control, image)
    return run


async def next_event(qmp: QMPClient, name: str, timeout: float = TIMEOUT) -> dict[str, Any]:
    """The next event called ``name`` (others on the way are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no {name} event"
        ev = await asyncio.wait_for(qmp.events.get(), left)
        if ev["event"] == name:
            return dict(ev)


def front_end(d: Daemon, **kw: Any) -> BlkFrontend:
    kw.setdefault("num_queues", 2)
    assert d.proc.socket_path is not None
    return BlkFrontend(d.proc.socket_path, **kw)


def known_requests(fe: BlkFrontend) -> dict[int, dict[str, int]]:
    """Requests of known kinds and sizes on both queues; what each queue must count."""
    want = {}
    for q, (writes, reads) in enumerate([(3, 2), (5, 4)]):
        for i in range(writes):
            fe.write(i * 8, os.urandom(BLOCK), q=q)
        for i in range(reads):
            fe.read(i * 8, 2 * BLOCK, q=q)
        fe.flush(q=q)
        fe.get_id(q=q)
        want[q] = {"requests": writes + reads + 2, "write": writes, "read": reads,
                   "flush": 1, "get_id": 1, "bytes-written": writes * BLOCK,
                   "bytes-read": reads * 2 * BLOCK}
    return want


def check_counts(queue: dict[str, Any], want: dict[str, int]) -> None:
    assert queue["requests"] == want["requests"], queue
    for op in ("read", "write", "flush", "get_id"):
        assert queue["ops"][op] == want[op], (op, queue)
    assert queue["bytes-written"] == want["bytes-written"], queue
    assert queue["bytes-read"] == want["bytes-read"], queue
    assert queue["errors"] == 0 and queue["in-flight"] == 0, queue
    lat = queue["latency-ns"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max-bucket"], lat
    assert lat["sum"] > 0


# ---- QMPClient: devices, live counters, events ----------------------------------------


@pytest.mark.parametrize("workers", [0, 1], ids=["one-process", "worker"])
async def test_qmp_client_reads_live_counters_and_front_end_events(
        start: Callable[..., Daemon], workers: int) -> None:
    d = start(workers=workers)
    qmp = await d.client()
    try:
        assert qmp.greeting is not None
        assert qmp.greeting.QMP.version["package"].startswith("vhostd ")
        version = await qmp.execute("query-version")
        assert version["package"] == qmp.greeting.QMP.version["package"]
        names = {c["name"] for c in await qmp.execute("query-commands")}
        assert {"qmp_capabilities", "query-devices", "query-device-stats", "device-resize",
                "set-log-level", "query-status", "query-version"} <= names
        status = await qmp.execute("query-status")
        assert status["running"] is True and status["uptime"] >= 0

        [dev] = await qmp.execute("query-devices")
        assert dev["name"] == "blk0" and dev["type"] == "blk"
        assert dev["image"] == str(d.image) and dev["size"] == DISK
        assert dev["read-only"] is False and dev["frontend-connected"] is False
        assert dev["socket"] == str(d.proc.socket_path)
        assert dev["queue-hosts"] == (["main", "worker1"] if workers else ["main", "main"])

        fe = await asyncio.to_thread(front_end, d)
        try:
            ev = await next_event(qmp, "FRONTEND_CONNECTED")
            assert ev["data"] == {"device": "blk0"}
            assert set(ev["timestamp"]) == {"seconds", "microseconds"}
            assert abs(ev["timestamp"]["seconds"] - time.time()) < 60
            want = await asyncio.to_thread(known_requests, fe)
            # Read while the front end is connected: the worker still serves vq1.
            [stats] = await qmp.execute("query-device-stats", {"device": "blk0"})
            assert stats["device"] == "blk0" and stats["live"] is True
            for q in (0, 1):
                queue = stats["queues"][q]
                assert queue["queue"] == q and queue["live"] is True
                check_counts(queue, want[q])
            assert stats["queues"][1]["served-by"] == ("worker1" if workers else "main")
            assert stats["requests"] == want[0]["requests"] + want[1]["requests"]
            [dev] = await qmp.execute("query-devices")
            assert dev["frontend-connected"] is True
            assert "VIRTIO_F_VERSION_1" in dev["feature-names"]
            # What the driver acked, plus the vhost-user bit the front end acks too.
            assert dev["features"] == fe.features | 1 << VHOST_USER_F_PROTOCOL_FEATURES
        finally:
            await asyncio.to_thread(fe.close)
        ev = await next_event(qmp, "FRONTEND_DISCONNECTED")
        assert ev["data"] == {"device": "blk0"}
        # The counts came home with the rings: the same numbers after the disconnect.
        [stats] = await qmp.execute("query-device-stats")
        for q in (0, 1):
            assert stats["queues"][q]["served-by"] == "main"
            check_counts(stats["queues"][q], want[q])
        with pytest.raises(ExecuteError) as err:
            await qmp.execute("query-device-stats", {"device": "nosuch"})
        assert err.value.error_class == "DeviceNotFound"
    finally:
        await qmp.disconnect()


@pytest.mark.parametrize("queue", [0, 1], ids=["main-process", "worker"])
async def test_broken_ring_sends_device_needs_reset(start: Callable[..., Daemon],
                                                    queue: int) -> None:
    d = start(workers=1)
    qmp = await d.client()
    try:
        fe = await asyncio.to_thread(front_end, d)
        try:
            await asyncio.to_thread(fe.write, 0, os.urandom(BLOCK), q=queue)
            vq = fe.queues[queue].vq
            vq.raw_set_avail_idx(vq.used_idx() + 500)  # more than the ring holds
            vq.raw_kick()
            ev = await next_event(qmp, "DEVICE_NEEDS_RESET")
            assert ev["data"]["device"] == "blk0" and ev["data"]["queue"] == queue
            assert "avail index jumped" in ev["data"]["reason"]
        finally:
            await asyncio.to_thread(fe.close)
    finally:
        await qmp.disconnect()


async def test_io_errors_are_events_at_most_once_a_second(start: Callable[..., Daemon]
                                                          ) -> None:
    d = start()
    # Writes past 1 MiB of the (sparse, larger) image now fail with EFBIG: a real
    # storage error, without a special file system.
    resource.prlimit(d.proc.proc.pid, resource.RLIMIT_FSIZE, (MiB, MiB))
    qmp = await d.client()
    try:
        fe = await asyncio.to_thread(front_end, d)
        try:
            def fail_writes() -> list[int]:
                for i in range(6):
                    fe.submit_write(0, 4096 + 8 * i, os.urandom(BLOCK))
                return [done[0] for done in collect(fe, [0], TIMEOUT).values()]
            t0 = time.monotonic()
            statuses = await asyncio.to_thread(fail_writes)
            assert statuses == [1] * 6  # VIRTIO_BLK_S_IOERR
            first = await next_event(qmp, "IO_ERROR")
            assert first["data"]["device"] == "blk0" and first["data"]["op"] == "write"
            assert first["data"]["queue"] == 0 and first["data"]["error"]
            # The rest of the burst: only the last one, once the second is over.
            last = await next_event(qmp, "IO_ERROR", timeout=3.0)
            assert time.monotonic() - t0 >= 0.9
            assert last["data"]["sector"] == 4096 + 8 * 5
            await asyncio.sleep(1.2)
            assert qmp.events.empty(), "more than two IO_ERROR events for one burst"
            [stats] = await qmp.execute("query-device-stats", {"device": "blk0"})
            assert stats["queues"][0]["errors"] == 6
            assert stats["queues"][0]["ops"]["write"] == 6
        finally:
            await asyncio.to_thread(fe.close)
    finally:
        await qmp.disconnect()
    assert "failed: File too large" in d.log


async def test_device_resize_and_set_log_level(start: Callable[..., Daemon]) -> None:
    d = start()
    qmp = await d.client()
    try:
        assert await qmp.execute("device-resize", {"device": "blk0"}) == {
            "size": DISK, "changed": False}
        os.truncate(d.image, 2 * DISK)
        assert await qmp.execute("device-resize", {"device": "blk0"}) == {
            "size": 2 * DISK, "changed": True}
        ev = await next_event(qmp, "DEVICE_RESIZED")
        assert ev["data"] == {"device": "blk0", "size": 2 * DISK}
        [dev] = await qmp.execute("query-devices")
        assert dev["size"] == 2 * DISK
        with pytest.raises(ExecuteError) as err:
            await qmp.execute("device-resize", {"device": "nosuch"})
        assert err.value.error_class == "DeviceNotFound"
        with pytest.raises(ExecuteError) as err:
            await qmp.execute("device-resize")
        assert err.value.error_class == "GenericError"

        await qmp.execute("set-log-level", {"level": "warning"})
        fe = await asyncio.to_thread(front_end, d)
        await asyncio.to_thread(fe.close)
        await next_event(qmp, "FRONTEND_DISCONNECTED")
        assert d.log.count("front end connected") == 0
        await qmp.execute("set-log-level", {"level": "debug"})
        fe = await asyncio.to_thread(front_end, d)
        await asyncio.to_thread(fe.close)
        await next_event(qmp, "FRONTEND_DISCONNECTED")
        assert d.log.count("front end connected") == 1 and "DEBUG" in d.log
        with pytest.raises(ExecuteError):
            await qmp.execute("set-log-level", {"level": "loud"})
    finally:
        await qmp.disconnect()


async def test_owner_members_and_mode_change_events(
        vhostd: Callable[..., Any], sparse_image: Callable[..., Path],
        short_dir: Path) -> None:
    image = sparse_image(DISK)
    control = short_dir / "control.sock"
    members = [short_dir / "m1.sock", short_dir / "m2.sock"]
    args = [a for m in members for a in ("--member", f"socket-path={m},blk-file={image}")]
    proc = vhostd(*args, "--queue-workers=0", f"--control-socket={control}",
                  socket_path=short_dir / "owner.sock")
    qmp = QMPClient("owner-test")
    await qmp.connect(str(control))
    try:
        devs = {dev["name"]: dev for dev in await qmp.execute("query-devices")}
        assert set(devs) == {"owner", "member1", "member2"}
        assert devs["owner"]["type"] == "owner"
        assert devs["owner"]["members"] == ["member1", "member2"]
        assert devs["member1"]["owner"] == "owner" and devs["member1"]["mode"] == "running"
        assert devs["member2"]["socket"] == str(members[1])
        admin = await asyncio.to_thread(AdminDriver, short_dir / "owner.sock")
        try:
            await next_event(qmp, "FRONTEND_CONNECTED")
            await asyncio.to_thread(admin.activate)
            await asyncio.to_thread(admin.stop, 1)
            ev = await next_event(qmp, "MEMBER_MODE_CHANGE")
            assert ev["data"] == {"device": "member1", "mode": "stopped",
                                  "previous": "running"}
            devs = {dev["name"]: dev for dev in await qmp.execute("query-devices")}
            assert devs["member1"]["mode"] == "stopped"
            await asyncio.to_thread(admin.resume, 1)
            ev = await next_event(qmp, "MEMBER_MODE_CHANGE")
            assert ev["data"] == {"device": "member1", "mode": "running",
                                  "previous": "stopped"}
        finally:
            await asyncio.to_thread(admin.close)
    finally:
        await qmp.disconnect()
    assert proc.alive()


# ---- the wire protocol, from a raw socket --------------------------------------------


class Raw:
    """A QMP client that sends whatever it is told and reads lines back."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(str(path))
        self.buf = b""

    def line(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            assert chunk, "the server closed the connection"
            self.buf += chunk
        raw, self.buf = self.buf.split(b"\n", 1)
        assert raw.endswith(b"\r"), raw  # QMP lines end in CRLF
        return json.loads(raw)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def ask(self, data: bytes) -> dict[str, Any]:
        self.send(data)
        return self.line()

    def close(self) -> None:
        self.sock.close()


def error_class(reply: dict[str, Any]) -> str:
    assert "error" in reply, reply
    assert set(reply["error"]) == {"class", "desc"} and reply["error"]["desc"], reply
    return str(reply["error"]["class"])


EVENT_LOOPS = pytest.mark.parametrize("loop", ["uvloop", "asyncio"])


@EVENT_LOOPS
def test_wire_protocol_from_a_raw_socket(start: Callable[..., Daemon], loop: str) -> None:
    d = start(f"--event-loop={loop}")
    c = Raw(d.control)
    try:
        greeting = c.line()
        assert greeting["QMP"]["capabilities"] == []
        assert set(greeting["QMP"]["version"]["qemu"]) == {"major", "minor", "micro"}
        # Before negotiation every other command is not found.
        reply = c.ask(b'{"execute": "query-status", "id": 7}\n')
        assert error_class(reply) == "CommandNotFound" and reply["id"] == 7
        # A capability that was not offered.
        assert error_class(c.ask(b'{"execute": "qmp_capabilities", '
                                 b'"arguments": {"enable": ["oob"]}}')) == "GenericError"
        # Any JSON value is an id and comes back as it was.
        ident = {"a": [1, "two", None], "b": 3.5}
        reply = c.ask(json.dumps({"execute": "qmp_capabilities", "id": ident}).encode())
        assert reply == {"return": {}, "id": ident}
        assert error_class(c.ask(b'{"execute": "qmp_capabilities"}')) == "CommandNotFound"
        # A stream, not lines: several texts in one write, one text over many writes.
        c.send(b'{"execute": "query-status", "id": 1}{"execute": "query-version", "id": 2}'
               b'  \t{"execute":"query-commands","id":3}')
        assert [c.line()["id"] for _ in range(3)] == [1, 2, 3]
        for b in b'{"execute": "query-status", "arguments": {}, "id": "split"}':
            c.send(bytes([b]))
        reply = c.line()
        assert reply["id"] == "split" and reply["return"]["running"] is True
        # Strings holding brackets, quotes and escapes do not confuse the splitter.
        reply = c.ask(b'{"execute": "query-status", "id": "}]\\"{[\\\\"}')
        assert reply["id"] == '}]"{[\\' and "return" in reply
        # Garbage: an error each, and the connection stays.
        assert error_class(c.ask(b"garbage\n")) == "GenericError"
        assert error_class(c.ask(b'{"execute": }')) == "GenericError"
        assert error_class(c.ask(b"]")) == "GenericError"
        assert error_class(c.ask(b"[1, 2]")) == "GenericError"
        assert error_class(c.ask(b'"just a string"')) == "GenericError"
        assert error_class(c.ask(b'{"execute": "query-status", "bogus": 1}')) == "GenericError"
        assert error_class(c.ask(b'{"arguments": {}}')) == "GenericError"
        assert error_class(c.ask(b'{"execute": 5}')) == "GenericError"
        assert error_class(c.ask(b'{"execute": "query-status", "arguments": []}')
                           ) == "GenericError"
        assert error_class(c.ask(b'{"execute": "no-such-command"}')) == "CommandNotFound"
        assert error_class(c.ask(b'{"execute": "query-device-stats", '
                                 b'"arguments": {"device": 1}}')) == "GenericError"
        assert error_class(c.ask(b'{"execute": "query-status", '
                                 b'"arguments": {"x": 1}}')) == "GenericError"
        assert error_class(c.ask(b'{"execute": "device-resize"}')) == "GenericError"
        assert error_class(c.ask(b"\xff")) == "GenericError"
        # A control character drops a half-sent text: the client's way to resynchronize.
        reply = c.ask(b'{"execute": "query-st\x01')
        assert error_class(reply) == "GenericError"
        assert c.ask(b'{"execute": "query-status", "id": "after"}')["id"] == "after"
        # Invalid UTF-8 and deep nesting.
        assert error_class(c.ask(b'{"execute": "\xc3\x28"}')) == "GenericError"
        assert error_class(c.ask(b"[" * 100 + b"]" * 100)) == "GenericError"
        # A text longer than the server takes: one error once it ends, then service.
        c.send(b'{"execute": "query-status", "id": "' + b"x" * (2 * MiB) + b'"}')
        assert "longer than" in c.line()["error"]["desc"]
        assert c.ask(b'{"execute": "query-status", "id": 9}')["id"] == 9
    finally:
        c.close()


def test_events_wait_for_negotiation(start: Callable[..., Daemon]) -> None:
    d = start()
    early, ready = Raw(d.control), Raw(d.control)
    try:
        early.line()
        ready.line()
        assert ready.ask(b'{"execute": "qmp_capabilities"}') == {"return": {}}
        fe = front_end(d)
        fe.close()
        assert ready.line()["event"] == "FRONTEND_CONNECTED"
        assert ready.line()["event"] == "FRONTEND_DISCONNECTED"
        # The client still negotiating got none: its next line is its reply.
        assert "return" in early.ask(b'{"execute": "qmp_capabilities"}')
    finally:
        early.close()
        ready.close()


@EVENT_LOOPS
async def test_several_clients_and_one_that_never_reads(start: Callable[..., Daemon],
                                                        loop: str) -> None:
    d = start(f"--event-loop={loop}")
    clients = [await d.client(f"c{i}") for i in range(4)]
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stuck.connect(str(d.control))
    try:
        # The stuck client asks and asks and never reads a reply.
        stuck.setblocking(False)
        ask = (b'{"execute": "qmp_capabilities"}'
               + b'{"execute": "query-device-stats"}' * 200)
        deadline = time.monotonic() + 60
        while "does not read its replies" not in d.log:
            assert time.monotonic() < deadline, d.log
            try:
                stuck.send(ask)
            except BlockingIOError:
                # Its input waits too (the server stops reading a client that has
                # this much unanswered): the others must still be served meanwhile.
                status = await asyncio.wait_for(clients[0].execute("query-status"), 5)
                assert status["running"] is True
                await asyncio.sleep(0.05)
            except (BrokenPipeError, ConnectionResetError):
                break
        # It was dropped; the others are served, and all see the same events.
        fe = await asyncio.to_thread(front_end, d)
        await asyncio.to_thread(fe.close)
        for qmp in clients:
            await next_event(qmp, "FRONTEND_CONNECTED")
            await next_event(qmp, "FRONTEND_DISCONNECTED")
            assert (await qmp.execute("query-status"))["running"] is True
        # Its connection ends (what it never read may still come first).
        stuck.setblocking(True)
        stuck.settimeout(TIMEOUT)
        try:
            while stuck.recv(1 << 20):
                pass
        except ConnectionResetError:
            pass
    finally:
        stuck.close()
        for qmp in clients:
            await qmp.disconnect()
    assert d.proc.alive()


def test_qmp_shell(start: Callable[..., Daemon]) -> None:
    shell = shutil.which("qmp-shell", path=os.path.dirname(sys.executable))
    assert shell is not None, "qemu.qmp installs qmp-shell"
    d = start()
    out = subprocess.run(
        [shell, str(d.control)],
        input="query-status\nquery-device-stats device=blk0\ndevice-resize device=nosuch\n",
        capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    replies = [json.loads(line.split(") ", 1)[1]) for line in out.stdout.splitlines()
               if line.startswith("(QEMU) {")]
    assert replies[0]["return"]["running"] is True
    assert replies[1]["return"][0]["device"] == "blk0"
    assert replies[2]["error"]["class"] == "DeviceNotFound"


# ---- Prometheus -----------------------------------------------------------------------


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=TIMEOUT) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return r.read().decode()


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """Every sample of a scrape, parsed by prometheus_client: (name, labels) -> value."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(s: Samples, name: str, **labels: str) -> float:
    return s[(name, tuple(sorted(labels.items())))]


def promtool() -> str | None:
    return shutil.which("promtool") or shutil.which(
        "promtool", path=os.path.dirname(sys.executable))


@pytest.mark.parametrize("workers", [0, 1], ids=["one-process", "worker"])
def test_metrics_parse_and_match_the_requests(start: Callable[..., Daemon],
                                              workers: int) -> None:
    d = start("--metrics=127.0.0.1:0", workers=workers)
    url = d.metrics_url()
    fe = front_end(d)
    try:
        want = known_requests(fe)
        text = scrape(url)
        s = samples(text)
        assert sample(s, "vhostd_frontend_connected", device="blk0") == 1
        assert sample(s, "vhostd_device_size_bytes", device="blk0") == DISK
        for q in (0, 1):
            lab = {"device": "blk0", "queue": str(q)}
            for op in OPS:
                assert sample(s, "vhostd_requests_total", op=op, **lab) == want[q].get(op, 0)
            assert sample(s, "vhostd_written_bytes_total", **lab) == want[q]["bytes-written"]
            assert sample(s, "vhostd_read_bytes_total", **lab) == want[q]["bytes-read"]
            assert sample(s, "vhostd_errors_total", **lab) == 0
            assert sample(s, "vhostd_in_flight", **lab) == 0
            count = sample(s, "vhostd_request_duration_seconds_count", **lab)
            assert count == want[q]["requests"]
            assert sample(s, "vhostd_request_duration_seconds_bucket", le="+Inf", **lab) == count
            assert 0 < sample(s, "vhostd_request_duration_seconds_sum", **lab) < count * 10
            buckets = sorted((float(dict(k[1])["le"]), v) for k, v in s.items()
                             if k[0] == "vhostd_request_duration_seconds_bucket"
                             and dict(k[1])["queue"] == str(q))
            assert len(buckets) == 21
            assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
        assert s[("process_cpu_seconds_total", ())] > 0
        assert s[("process_resident_memory_bytes", ())] > 0
    finally:
        fe.close()
    assert sample(samples(scrape(url)), "vhostd_frontend_connected", device="blk0") == 0
    # Other paths and methods.
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url.replace("/metrics", "/nothing"), timeout=TIMEOUT)
    assert err.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(url, data=b"x"), timeout=TIMEOUT)
    assert err.value.code == 405


def test_metrics_pass_promtool(start: Callable[..., Daemon]) -> None:
    tool = promtool()
    if tool is None:
        pytest.skip("promtool is not installed (./scripts/install-deps puts it in .venv)")
    d = start("--metrics=127.0.0.1:0")
    fe = front_end(d)
    try:
        fe.write(0, os.urandom(BLOCK))
        text = scrape(d.metrics_url())
    finally:
        fe.close()
    out = subprocess.run([tool, "check", "metrics"], input=text, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), (
        out.stdout, out.stderr)


# ---- start-up -------------------------------------------------------------------------


def test_bad_operations_options_exit_with_one_line(tmp_path: Path, short_dir: Path,
                                                   sparse_image: Callable[..., Path]) -> None:
    image = sparse_image(DISK)
    base = [sys.executable, "-m", "vhostd", f"--socket-path={short_dir / 'd.sock'}",
            f"--blk-file={image}"]
    bad = subprocess.run([*base, "--metrics=nonsense"], capture_output=True, text=True,
                         timeout=30)
    assert bad.returncode != 0 and "HOST:PORT" in bad.stderr
    busy = socket.create_server(("127.0.0.1", 0))
    port = busy.getsockname()[1]
    try:
        out = subprocess.run([*base, f"--metrics=127.0.0.1:{port}"], capture_output=True,
                             text=True, timeout=30)
    finally:
        busy.close()
    assert out.returncode == 1
    assert out.stderr.startswith(f"vhostd: --metrics=127.0.0.1:{port}: "), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    # The control socket path is in use by another process.
    taken = short_dir / "taken.sock"
    holder = socket.socket(socket.AF_UNIX)
    holder.bind(str(taken))
    holder.listen(1)
    try:
        out = subprocess.run([*base, f"--control-socket={taken}"], capture_output=True,
                             text=True, timeout=30)
    finally:
        holder.close()
    assert out.returncode == 1 and "in use" in out.stderr, out.stderr
    assert not (short_dir / "d.sock").exists()  # nothing left behind


def test_sigterm_removes_the_control_socket(start: Callable[..., Daemon]) -> None:
    d = start()
    c = Raw(d.control)
    c.line()
    c.ask(b'{"execute": "qmp_capabilities"}')
    d.proc.signal(signal.SIGTERM)
    d.proc.proc.wait(TIMEOUT)
    assert not d.control.exists()
    c.close()
