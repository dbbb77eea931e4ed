"""Storage backends without a guest: IOPS and CPU per request of 4 KiB random reads.

    python benchmarks/storage_bench.py [--size-mib 1024] [--seconds 3] [--dir /var/tmp]
                                       [--aio threads,io_uring] [--modes cached,cold,direct]

Modes: ``cached`` (buffered, page cache warm: the inline RWF_NOWAIT path), ``cold``
(buffered, page cache dropped: misses go to the slow path) and ``direct`` (O_DIRECT:
every read through the slow path), each at queue depth 1 and 32 and with each slow path
(``--aio``: the thread pool, io_uring), driven from one epoll loop as the daemon drives
them. CPU is this process's user+system time per request.
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import tempfile
import time
from pathlib import Path

from vhostd.shell.worker import EpollLoop
from vhostd.storage.base import PENDING
from vhostd.storage.file import FileStorage


def drop(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def run(path: Path, mode: str, qd: int, seconds: float, size: int,
        aio: str | None = None) -> tuple[float, float]:
    s = FileStorage(str(path), direct=mode == "direct", aio=aio)
    loop = EpollLoop()
    s.start(loop)
    if mode == "cached":
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass
    elif mode == "cold":
        drop(path)
    ram = mmap.mmap(-1, qd * 4096)
    bufs = [memoryview(ram)[i * 4096:(i + 1) * 4096] for i in range(qd)]
    blocks = size // 4096
    rnd = random.Random(1)
    done = 0
    free: list[int] = []

    def complete(token: int, error: int) -> None:
        nonlocal done
        assert not error
        done += 1
        free.append(token)

    s.on_complete = complete
    t0, c0 = time.monotonic(), os.times()
    free.extend(range(qd))
    while time.monotonic() - t0 < seconds:
        while free:
            i = free.pop()
            if s.readv([bufs[i]], rnd.randrange(blocks) * 4096, i) != PENDING:
                done += 1
                free.append(i)
                if len(free) == qd and done % 64 == 0 and time.monotonic() - t0 > seconds:
                    break
        if len(free) < qd:
            loop.run_once(1.0)
    while len(free) < qd:
        loop.run_once(1.0)
    t1, c1 = time.monotonic(), os.times()
    for b in bufs:
        b.release()
    ram.close()
    s.close()
    cpu = (c1.user - c0.user) + (c1.system - c0.system)
    return done / (t1 - t0), cpu / done * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--dir", default="/var/tmp")
    p.add_argument("--aio", default="threads,io_uring", help="slow paths to compare")
    p.add_argument("--modes", default="cached,cold,direct")
    args = p.parse_args()
    size = args.size_mib << 20
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        path = Path(d) / "bench.img"
        chunk = os.urandom(1 << 20)
        with open(path, "wb") as f:
            for _ in range(args.size_mib):
                f.write(chunk)
        print(f"{'mode':8} {'aio':9} {'QD':>3} {'IOPS':>9} {'CPU/req':>9}")
        for mode in args.modes.split(","):
            for aio in args.aio.split(","):
                for qd in (1, 32):
                    iops, cpu = run(path, mode, qd, args.seconds, size, aio)
                    print(f"{mode:8} {aio:9} {qd:3} {iops:9.0f} {cpu:7.1f}us", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
