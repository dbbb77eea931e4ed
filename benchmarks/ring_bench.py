"""The ring engine's speed without a guest: a regression benchmark for the hot path.

    python benchmarks/ring_bench.py [--seconds 2] [--batches 1,32,128] [--json out.json]

Two measurements per batch size (requests made available per kick):

* engine: in this process, a split or packed virtqueue in memfd guest memory served
  by the virtio-blk handler on a tmpfs image, no sockets: Python cost per request of
  the descriptor walk, the blk handler, preadv and the used ring. Packed rings are
  measured with 3-descriptor chains (header, 4 KiB data, status) and with one
  indirect descriptor per request;
* daemon: the test front end drives a real vhostd process over eventfds; requests
  per second, and the daemon's CPU per request from /proc (split rings only: the
  test front end has no packed mode).

4 KiB reads. A packed ring holds at most QSIZE descriptors in flight, so a batch of
3-descriptor chains larger than QSIZE // 3 is made available in ring-sized kicks.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vhostd.devices.blk import BlkDevice, BlkOptions
from vhostd.engine.memory import GuestMemory as EngineMemory
from vhostd.engine.packed import set_layout
from vhostd.engine.virtqueue import SplitVirtqueue
from vhostd.frontend.blk import BlkFrontend
from vhostd.storage.file import FileStorage

CLK_TCK = os.sysconf("SC_CLK_TCK")
QSIZE = 256
DESC = struct.Struct("<QIHH")
PDESC = struct.Struct("<QIHH")  # packed: addr, len, id, flags
P_AVAIL, P_USED = 1 << 7, 1 << 15
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
DATA0 = 0x100000  # request buffers: header at +0, status at +16, data at +0x1000
TABLES = 0x20000  # packed indirect tables, 48 bytes each


def packed_requests(indirect: bool, view: memoryview, desc: int
                    ) -> tuple[list[list[tuple[int, bytes]]], int]:
    """What a packed driver writes for each request of a repeating cycle: (ring offset,
    bytes) segments with their final flags, and how many requests one kick may carry.

    A chain's slots follow on from the previous chain's, across the ring end, and each
    descriptor's AVAIL/USED bits carry the wrap counter of its lap; the cycle covers
    whole laps of both parities, so it repeats exactly. (The engine runs in this
    thread between kicks, so the order of the stores within a request is immaterial.)
    """
    slots = 1 if indirect else 3
    laps = 2 if indirect else 6  # 2 * lcm(slots, QSIZE) / QSIZE
    cycle = laps * QSIZE // slots
    out: list[list[tuple[int, bytes]]] = []
    for r in range(cycle):
        buf = r % QSIZE
        hdr = DATA0 + buf * 0x2000
        struct.pack_into("<IIQ", view, hdr, 0, 0, (buf * 8) % 32000)  # T_IN, sector
        chain = [(hdr, 16, 0), (hdr + 0x1000, 4096, F_WRITE), (hdr + 16, 1, F_WRITE)]
        if indirect:
            table = TABLES + 48 * buf
            for k, (addr, length, flags) in enumerate(chain):
                PDESC.pack_into(view, table + 16 * k, addr, length, 0, flags)
            chain = [(table, 48, F_INDIRECT)]
        segs: list[tuple[int, bytes]] = []
        for k, (addr, length, flags) in enumerate(chain):
            pos = r * slots + k
            lap_flags = P_AVAIL if (pos // QSIZE) % 2 == 0 else P_USED  # wrap 1, then 0
            nxt = F_NEXT if k < len(chain) - 1 else 0
            raw = PDESC.pack(addr, length, buf, flags | nxt | lap_flags)
            off = desc + 16 * (pos % QSIZE)
            if segs and segs[-1][0] + len(segs[-1][1]) == off:
                segs[-1] = (segs[-1][0], segs[-1][1] + raw)
            else:
                segs.append((off, raw))
        out.append(segs)
    return out, QSIZE // slots


def engine_bench(batch: int, seconds: float, packed: bool = False,
                 indirect: bool = False) -> dict[str, float]:
    """Requests/s of the ring engine (split, or packed with 3-descriptor chains or
    indirect descriptors) + blk handler, in-process."""
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        path = Path(d) / "disk.img"
        with open(path, "wb") as f:
            f.write(os.urandom(16 << 20))
        dev = BlkDevice("bench", FileStorage(str(path)), BlkOptions(queue_size=QSIZE))
        size = 8 << 20
        fd = os.memfd_create("bench")
        os.ftruncate(fd, size)
        mem = EngineMemory()
        mem.add(fd, 0, size, 0x10000000, 0)
        view = mem.gpa(0, size)
        desc, avail, used = 0, 0x1000 * 16, 0x1000 * 17
        q = SplitVirtqueue(0, handler=lambda *a: 0, max_size=QSIZE)
        if packed:
            set_layout(q, packed=True)  # as SET_FEATURES with VIRTIO_F_RING_PACKED
        q.handler = dev.make_handler(q)
        q.set_num(QSIZE)
        # Packed: avail is the driver area, used the device area (both zero: ENABLE).
        q.set_addr(0, 0x10000000 + desc, 0x10000000 + used, 0x10000000 + avail, 0)
        q.set_features(event_idx=False, indirect=True)
        q.enabled = True
        q.start(mem)
        if packed:
            n, elapsed, cpu = _drive_packed(q, view, desc, batch, seconds, indirect)
        else:
            n, elapsed, cpu = _drive_split(q, view, desc, avail, batch, seconds)
        assert not q.broken and q.requests == n, "the engine refused the benchmark's ring"
        q.stop()
        q.detach_memory()
        view.release()
        mem.clear()
        os.close(fd)
        dev.close()
    return {"requests_per_s": n / elapsed, "cpu_us_per_request": cpu * 1e6 / n}


def _drive_packed(q: SplitVirtqueue, view: memoryview, desc: int, batch: int,
                  seconds: float, indirect: bool) -> tuple[int, float, float]:
    requests, room = packed_requests(indirect, view, desc)
    cycle = len(requests)
    r = 0
    n = 0
    t0 = time.perf_counter()
    c0 = time.process_time()
    while time.perf_counter() - t0 < seconds:
        left = batch
        while left:
            k = min(left, room)
            for _ in range(k):
                for off, raw in requests[r]:
                    view[off:off + len(raw)] = raw
                r += 1
                if r == cycle:
                    r = 0
            q.process()
            left -= k
        n += batch
    return n, time.perf_counter() - t0, time.process_time() - c0


def _drive_split(q: SplitVirtqueue, view: memoryview, desc: int, avail: int, batch: int,
                 seconds: float) -> tuple[int, float, float]:
    """The split driver: one 3-descriptor chain per head (header, 4 KiB data, status),
    heads made available in turn."""
    data0 = DATA0
    for head in range(QSIZE // 3):
        base = 3 * head
        hdr = data0 + head * 0x2000
        DESC.pack_into(view, desc + 16 * base, hdr, 16, 1, base + 1)
        DESC.pack_into(view, desc + 16 * (base + 1), hdr + 0x1000, 4096, 3, base + 2)
        DESC.pack_into(view, desc + 16 * (base + 2), hdr + 16, 1, 2, 0)
        struct.pack_into("<IIQ", view, hdr, 0, 0, (head * 8) % 32000)
    heads = QSIZE // 3
    n = 0
    idx = 0
    t0 = time.perf_counter()
    c0 = time.process_time()
    while time.perf_counter() - t0 < seconds:
        for _ in range(batch):
            struct.pack_into("<H", view, avail + 4 + 2 * (idx % QSIZE), 3 * (idx % heads))
            idx = (idx + 1) & 0xFFFF
        struct.pack_into("<H", view, avail + 2, idx)
        q.process()
        n += batch
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - c0
    return n, elapsed, cpu


def daemon_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def daemon_bench(batch: int, seconds: float) -> dict[str, float]:
    """Requests/s through a real vhostd process, and its CPU per request."""
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        path = Path(d) / "disk.img"
        with open(path, "wb") as f:
            f.write(os.urandom(16 << 20))
        sock = Path(d) / "s.sock"
        pidfile = Path(d) / "pid"
        proc = subprocess.Popen([sys.executable, "-m", "vhostd", f"--socket-path={sock}",
                                 f"--blk-file={path}", f"--queue-size={QSIZE}",
                                 "--log-level=warning", f"--pidfile={pidfile}"])
        try:
            while not pidfile.exists():
                time.sleep(0.02)
            fe = BlkFrontend(sock, queue_size=QSIZE, max_io=4096, use_indirect=True)
            n = 0
            sector = 0
            t0 = time.perf_counter()
            c0 = daemon_cpu(proc.pid)
            while time.perf_counter() - t0 < seconds:
                for _ in range(batch):
                    fe.submit_read(0, sector, 4096)
                    sector = (sector + 8) % 32000
                fe.kick(0)
                done = 0
                while done < batch:
                    done += len(fe.complete(0, timeout=10))
                n += batch
            elapsed = time.perf_counter() - t0
            cpu = daemon_cpu(proc.pid) - c0
            fe.close()
        finally:
            proc.terminate()
            proc.wait(10)
    return {"requests_per_s": n / elapsed, "daemon_cpu_us_per_request": cpu * 1e6 / n}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--batches", default="1,32,128")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    results: dict[str, dict[str, object]] = {"split": {}, "packed": {}, "packed-indirect": {}}
    print(f"{'ring':15} {'batch':>5} {'engine req/s':>13} {'engine CPU/req':>15} "
          f"{'daemon req/s':>13} {'daemon CPU/req':>15}")
    for batch in map(int, args.batches.split(",")):
        e = engine_bench(batch, args.seconds)
        dm = daemon_bench(batch, args.seconds)
        results["split"][str(batch)] = {"engine": e, "daemon": dm}
        print(f"{'split':15} {batch:5} {e['requests_per_s']:13.0f} "
              f"{e['cpu_us_per_request']:13.2f}us {dm['requests_per_s']:13.0f} "
              f"{dm['daemon_cpu_us_per_request']:13.2f}us", flush=True)
        for name, indirect in (("packed", False), ("packed-indirect", True)):
            e = engine_bench(batch, args.seconds, packed=True, indirect=indirect)
            results[name][str(batch)] = {"engine": e, "daemon": "n/a"}
            print(f"{name:15} {batch:5} {e['requests_per_s']:13.0f} "
                  f"{e['cpu_us_per_request']:13.2f}us {'n/a':>13} {'n/a':>15}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
