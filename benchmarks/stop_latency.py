"""How long DEV_MODE_SET(stop) takes while the member is busy at queue depth 32.

    python benchmarks/stop_latency.py [--rounds N] [--depth 32]

A load process keeps QD writes and reads in flight on member 1 through the test
front end; this process, as the hypervisor, stops and resumes member 1 through the
owner's admin queue and times each stop from submitting the command to its
completion. Prints min/median/p99/max in milliseconds and JSON.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vhostd.frontend.admin import AdminDriver
from vhostd.frontend.blk import BlkFrontend
from vhostd_proto.virtio_admin import AdminCmd


def load(sock: str, depth: int, stop: mp.Event, done: mp.Value) -> None:  # type: ignore[valid-type]
    fe = BlkFrontend(sock, queue_size=128, use_indirect=True, timeout=60)
    data = os.urandom(4096)
    n = 0
    inflight = 0
    while not stop.is_set():
        while inflight < depth:
            if n % 2:
                fe.submit_write(0, (n % 4096) * 8, data)
            else:
                fe.submit_read(0, (n % 4096) * 8, 4096)
            inflight += 1
            n += 1
        fe.kick(0)
        got = fe.complete(0, timeout=60)
        inflight -= len(got)
        done.value += len(got)  # type: ignore[attr-defined]
    fe.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--depth", type=int, default=32)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vhostd-bench-", dir="/tmp"))
    image = work / "disk.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    owner, member = work / "o.sock", work / "m1.sock"
    pidfile = work / "pid"
    daemon = subprocess.Popen(
        [sys.executable, "-m", "vhostd", f"--socket-path={owner}",
         f"--member=socket-path={member},blk-file={image}", f"--pidfile={pidfile}",
         "--log-level=warning"])
    try:
        while not pidfile.exists():
            time.sleep(0.02)
        admin = AdminDriver(owner)
        admin.activate()
        stop, done = mp.Event(), mp.Value("q", 0)
        worker = mp.Process(target=load, args=(str(member), args.depth, stop, done))
        worker.start()
        while done.value < 1000:  # type: ignore[attr-defined]
            time.sleep(0.01)
        samples = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            r = admin.submit(AdminCmd.VIRTIO_ADMIN_CMD_DEV_MODE_SET, 1, 1, b"\x01")
            samples.append((time.perf_counter() - t0) * 1000)
            assert r.status == 0, r
            admin.resume(1)
            time.sleep(0.005)  # let the load refill the queue
        stop.set()
        worker.join(30)
        admin.close()
    finally:
        daemon.terminate()
        daemon.wait(10)
    samples.sort()
    res = {
        "depth": args.depth, "rounds": len(samples),
        "min_ms": round(samples[0], 3),
        "median_ms": round(statistics.median(samples), 3),
        "p99_ms": round(samples[int(0.99 * (len(samples) - 1))], 3),
        "max_ms": round(samples[-1], 3),
        "requests_completed": done.value,  # type: ignore[attr-defined]
    }
    print(f"DEV_MODE_SET(stop) with the member busy at QD{args.depth}: "
          f"min {res['min_ms']} ms, median {res['median_ms']} ms, p99 {res['p99_ms']} ms, "
          f"max {res['max_ms']} ms over {res['rounds']} stops")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
