"""The ring engine's speed without a guest: a regression benchmark for the hot path.

    python benchmarks/ring_bench.py [--seconds 2] [--batches 1,32,128] [--json out.json]

Two measurements per batch size (requests made available per kick):

* engine: in this process, a split virtqueue in memfd guest memory served by the
  virtio-blk handler on a tmpfs image, no sockets: Python cost per request of the
  descriptor walk, the blk handler, preadv and the used ring;
* daemon: the test front end drives a real vhostd process over eventfds; requests
  per second, and the daemon's CPU per request from /proc.

4 KiB reads. Packed rings: not implemented yet (reported as such).
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

from vhostd.devices.backing import FileBackend
from vhostd.devices.blk import BlkDevice, BlkOptions
from vhostd.engine.memory import GuestMemory as EngineMemory
from vhostd.engine.virtqueue import SplitVirtqueue
from vhostd.frontend.blk import BlkFrontend

CLK_TCK = os.sysconf("SC_CLK_TCK")
QSIZE = 256
DESC = struct.Struct("<QIHH")


def engine_bench(batch: int, seconds: float) -> dict[str, float]:
    """Requests/s of SplitVirtqueue + blk handler, in-process."""
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        path = Path(d) / "disk.img"
        with open(path, "wb") as f:
            f.write(os.urandom(16 << 20))
        dev = BlkDevice("bench", FileBackend(str(path)), BlkOptions(queue_size=QSIZE))
        size = 8 << 20
        fd = os.memfd_create("bench")
        os.ftruncate(fd, size)
        mem = EngineMemory()
        mem.add(fd, 0, size, 0x10000000, 0)
        view = mem.gpa(0, size)
        desc, avail, used = 0, 0x1000 * 16, 0x1000 * 17
        q = SplitVirtqueue(0, handler=lambda *a: 0, max_size=QSIZE)
        q.handler = dev.make_handler(q)
        q.set_num(QSIZE)
        q.set_addr(0, 0x10000000 + desc, 0x10000000 + used, 0x10000000 + avail, 0)
        q.set_features(event_idx=False, indirect=True)
        q.enabled = True
        q.start(mem)
        # One 3-descriptor chain per head: header, 4 KiB data, status.
        data0 = 0x100000
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
        q.stop()
        q.detach_memory()
        view.release()
        mem.clear()
        os.close(fd)
        dev.close()
    return {"requests_per_s": n / elapsed, "cpu_us_per_request": cpu * 1e6 / n}


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
    results: dict[str, object] = {"split": {}, "packed": "not implemented"}
    print(f"{'ring':6} {'batch':>5} {'engine req/s':>13} {'engine CPU/req':>15} "
          f"{'daemon req/s':>13} {'daemon CPU/req':>15}")
    for batch in map(int, args.batches.split(",")):
        e = engine_bench(batch, args.seconds)
        dm = daemon_bench(batch, args.seconds)
        results["split"][str(batch)] = {"engine": e, "daemon": dm}  # type: ignore[index]
        print(f"{'split':6} {batch:5} {e['requests_per_s']:13.0f} "
              f"{e['cpu_us_per_request']:13.2f}us {dm['requests_per_s']:13.0f} "
              f"{dm['daemon_cpu_us_per_request']:13.2f}us", flush=True)
    print("packed rings: not implemented yet")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
