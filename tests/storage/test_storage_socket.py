"""A real vhostd serving NBD members and --direct images, driven over its socket by the
project's front end; start-up errors; the status-byte warning is rate-limited."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from storage_support import NbdServer

from vhostd.frontend.blk import BlkFrontend

pytest.importorskip("nbd")


def vhostd_run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vhostd", *args], capture_output=True,
                          text=True, timeout=30)


@pytest.mark.parametrize("args, why", [
    (["--blk-nbd=http://x/y"], "not an NBD URI"),
    (["--blk-nbd=nbd+unix:///x?socket=/nonexistent/s.sock"], "connect"),
    (["--blk-nbd=nbd://127.0.0.1:1/x"], "connect"),
])
def test_bad_nbd_at_start_exits_with_one_line(tmp_path: Path, args: list[str],
                                              why: str) -> None:
    r = vhostd_run(f"--socket-path={tmp_path}/s.sock", *args)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vhostd: ") and why in lines[0], r.stderr


def test_nbd_member_and_direct_member(tmp_path: Path, vhostd: Callable[..., object],
                                      nbd_server: Callable[..., NbdServer]) -> None:
    server = nbd_server("nbdkit", "memory", "16M")
    img = tmp_path / "direct.img"
    img.write_bytes(bytes(16 << 20))
    m1, m2 = tmp_path / "m1.sock", tmp_path / "m2.sock"
    p = vhostd(f"--member=socket-path={m1},blk-nbd={server.uri},reconnect-delay=5",
               f"--member=socket-path={m2},blk-file={img},direct=on", "--queue-workers=0",
               "--trace-requests")
    for sock in (m1, m2):
        fe = BlkFrontend(str(sock), num_queues=1)
        try:
            assert fe.capacity == (16 << 20) // 512
            for sector, n in ((0, 4096), (7, 512), (64, 32768 + 512)):
                blob = os.urandom(n)
                fe.write(sector, blob)
                assert fe.read(sector, n) == blob
            fe.flush()
        finally:
            fe.close()
    assert img.read_bytes()[:4096] != bytes(4096)
    assert "vhostd.trace: member1/vq0" in p.log and "completed later" in p.log  # type: ignore[attr-defined]


def test_nbd_member_isolated_from_a_stopped_server(
        tmp_path: Path, vhostd: Callable[..., object],
        nbd_server: Callable[..., NbdServer]) -> None:
    a = nbd_server("nbdkit", "memory", "16M")
    b = nbd_server("nbdkit", "memory", "16M")
    m1, m2 = tmp_path / "m1.sock", tmp_path / "m2.sock"
    vhostd(f"--member=socket-path={m1},blk-nbd={a.uri}",
           f"--member=socket-path={m2},blk-nbd={b.uri}", "--queue-workers=0")
    fa = BlkFrontend(str(m1), num_queues=1)
    fb = BlkFrontend(str(m2), num_queues=1)
    try:
        fa.write(0, bytes(4096))
        assert a.proc is not None
        os.kill(a.proc.pid, signal.SIGSTOP)
        try:
            time.sleep(0.1)
            stuck = fa.submit_read(0, 0, 4096)
            fa.kick(0)
            worst = 0.0
            for i in range(50):
                t0 = time.monotonic()
                fb.write(i, os.urandom(512))
                worst = max(worst, time.monotonic() - t0)
            assert worst < 0.25, f"the other member took {worst * 1000:.0f} ms"
        finally:
            os.kill(a.proc.pid, signal.SIGCONT)
        assert fa.wait(0, stuck, timeout=5.0)[1] == 0
    finally:
        fa.close()
        fb.close()


def test_missing_status_byte_warnings_are_rate_limited(tmp_path: Path,
                                                       vhostd: Callable[..., object]) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    p = vhostd(f"--blk-file={img}", "--queue-workers=0")
    fe = BlkFrontend(str(p.socket_path), num_queues=1)  # type: ignore[attr-defined]
    try:
        vq, mem = fe.queues[0].vq, fe.mem
        hdr = mem.alloc(16)
        mem.write(hdr, b"\0" * 16)
        head = fe.queue_size - 1  # a descriptor the front end's own requests leave alone
        vq.raw_write_desc(head, hdr, 16, 0, 0)  # device-readable only: no status byte
        for i in range(400):
            vq.raw_put_avail(head)
            fe.kick(0)
            deadline = time.monotonic() + 5
            while vq.used_idx() != (i + 1) & 0xFFFF and time.monotonic() < deadline:
                time.sleep(0.0005)
        assert vq.used_idx() == 400
        time.sleep(0.1)
    finally:
        fe.close()
    lines = [ln for ln in p.log.splitlines() if "no status byte" in ln]  # type: ignore[attr-defined]
    assert 1 <= len(lines) <= 20, f"{len(lines)} warnings for 400 requests"


@pytest.mark.parametrize("aio", ["threads", "io_uring"])
@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
def test_file_slow_paths_many_in_flight(tmp_path: Path, vhostd: Callable[..., object],
                                        aio: str, direct: bool) -> None:
    """Each slow path, in the main process (queue 0) and in a queue worker (queue 1),
    with many requests outstanding at once: every one completes with its own data."""
    from vhostd.storage import uring
    if aio == "io_uring" and uring.unavailable() is not None:
        pytest.skip(str(uring.unavailable()))
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(8 << 20))
    data = bytearray(img.read_bytes())
    args = [f"--blk-file={img}", f"--aio={aio}", "--num-queues=2", "--queue-workers=1"]
    p = vhostd(*args, *(["--direct"] if direct else []))
    fe = BlkFrontend(str(p.socket_path), num_queues=2)  # type: ignore[attr-defined]
    try:
        for q in (0, 1):
            writes = {}
            for i in range(24):
                sector = (q * 4096 + i * 64)
                blob = os.urandom(4096 + 512 * (i % 3))
                writes[fe.submit_write(q, sector, blob)] = (sector, blob)
            fe.kick(q)
            seen: set[int] = set()
            while len(seen) < len(writes):
                batch = fe.complete(q, 10)
                assert batch, f"queue {q}: {len(writes) - len(seen)} writes never completed"
                for token, status, _ in batch:
                    assert status == 0
                    seen.add(token)
            for sector, blob in writes.values():
                data[sector * 512:sector * 512 + len(blob)] = blob
            fe.flush(q)
            reads = {fe.submit_read(q, s, len(b)): (s, len(b)) for s, b in writes.values()}
            fe.kick(q)
            got = 0
            while got < len(reads):
                batch = fe.complete(q, 10)
                assert batch, f"queue {q}: {len(reads) - got} reads never completed"
                for token, status, buf in batch:
                    assert status == 0
                    s, n = reads[token]
                    assert buf == bytes(data[s * 512:s * 512 + n])
                    got += 1
    finally:
        fe.close()
    assert img.read_bytes() == bytes(data)
