"""The NBD storage backend without a guest: 4 KiB random reads against nbdkit.

    python benchmarks/nbd_bench.py [--seconds 3] [--delay 0,1ms] [--rounds 3] [--profile]

Runs nbdkit (memory plugin, 256 MiB, optionally its delay filter) on a unix socket and
reads from it at queue depth 1 and 32 in rounds, each round:

- ``vhostd``: ``NbdStorage`` driven from one epoll loop the way a queue is served
  (completions through ``on_complete``, each batch ended by ``on_batch_done``);
- ``libnbd``: the in-run baseline, the same reads through libnbd's own calls with no
  vhostd code: at QD1 the synchronous ``pread`` (libnbd's C loop waits on the
  socket), at QD32 ``aio_pread`` driven by libnbd's own ``poll``.

Prints IOPS, mean latency and CPU time (user+system of this process) per request for
each, and vhostd's added latency per request (vhostd - libnbd, QD1). ``--profile``
also runs vhostd at QD1 under cProfile and prints the top functions by own time.
Timing on a shared machine is noisy: compare the two rows of one round.
"""

from __future__ import annotations

import argparse
import cProfile
import mmap
import os
import pstats
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import nbd

from testbed.unixsock import accepts
from vhostd.shell.worker import EpollLoop
from vhostd.storage.base import PENDING
from vhostd.storage.nbd import NbdStorage

SIZE = 256 << 20
BLOCK = 4096


def nbdkit(sock: Path, delay: str) -> subprocess.Popen[bytes]:
    argv = ["nbdkit", "-f", "-U", str(sock)]
    if delay != "0":
        argv.append("--filter=delay")
    argv += ["memory", str(SIZE)]
    if delay != "0":
        argv += [f"rdelay={delay}"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not accepts(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("nbdkit did not start")
        time.sleep(0.02)
    return proc


Result = tuple[float, float, float]  # IOPS, mean latency (us), CPU per request (us)


def run_vhostd(uri: str, qd: int, seconds: float) -> Result:
    s = NbdStorage(uri)
    loop = EpollLoop()
    ram = mmap.mmap(-1, qd * BLOCK)
    bufs = [memoryview(ram)[i * BLOCK:(i + 1) * BLOCK] for i in range(qd)]
    rnd = random.Random(1)
    blocks = SIZE // BLOCK
    free: list[int] = []
    started = [0] * qd
    lat: list[int] = []
    clock = time.monotonic_ns

    def complete(token: int, error: int) -> None:
        assert not error
        lat.append(clock() - started[token])
        free.append(token)

    s.on_complete = complete
    s.on_batch_done = lambda: None
    s.start(loop)
    t0, c0 = time.monotonic(), os.times()
    free.extend(range(qd))
    while time.monotonic() - t0 < seconds:
        while free:
            i = free.pop()
            started[i] = clock()
            if s.readv([bufs[i]], rnd.randrange(blocks) * BLOCK, i) != PENDING:
                raise AssertionError("NBD reads complete later")
        loop.run_once(1.0)
    while len(free) < qd:
        loop.run_once(1.0)
    t1, c1 = time.monotonic(), os.times()
    for b in bufs:
        b.release()
    ram.close()
    s.close()
    cpu = (c1.user - c0.user) + (c1.system - c0.system)
    return len(lat) / (t1 - t0), statistics.fmean(lat) / 1000, cpu / len(lat) * 1e6


def run_libnbd(uri: str, qd: int, seconds: float) -> Result:
    h = nbd.NBD()
    h.connect_uri(uri)
    rnd = random.Random(1)
    blocks = SIZE // BLOCK
    clock = time.monotonic_ns
    lat: list[int] = []
    t0, c0 = time.monotonic(), os.times()
    if qd == 1:
        while time.monotonic() - t0 < seconds:
            start = clock()
            h.pread(BLOCK, rnd.randrange(blocks) * BLOCK)
            lat.append(clock() - start)
    else:
        bufs = [nbd.Buffer(BLOCK) for _ in range(qd)]
        started: dict[int, int] = {}
        free = list(range(qd))
        slot_of: dict[int, int] = {}
        while time.monotonic() - t0 < seconds or slot_of:
            if time.monotonic() - t0 < seconds:
                while free:
                    i = free.pop()
                    cookie = h.aio_pread(bufs[i], rnd.randrange(blocks) * BLOCK)
                    started[cookie] = clock()
                    slot_of[cookie] = i
            h.poll(1000)  # libnbd's own loop iteration: both directions
            while slot_of and (cookie := h.aio_peek_command_completed()) > 0:
                h.aio_command_completed(cookie)
                lat.append(clock() - started.pop(cookie))
                free.append(slot_of.pop(cookie))
    t1, c1 = time.monotonic(), os.times()
    del h  # closes the connection
    cpu = (c1.user - c0.user) + (c1.system - c0.system)
    return len(lat) / (t1 - t0), statistics.fmean(lat) / 1000, cpu / len(lat) * 1e6


def profile(uri: str, seconds: float) -> None:
    prof = cProfile.Profile()
    prof.enable()
    run_vhostd(uri, 1, seconds)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(15)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    p.add_argument("--delay", default="0,1ms", help="nbdkit rdelay values (0: no filter)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        for delay in args.delay.split(","):
            sock = Path(d) / "nbd.sock"
            sock.unlink(missing_ok=True)
            server = nbdkit(sock, delay)
            uri = f"nbd+unix:///?socket={sock}"
            try:
                print(f"\nnbdkit memory, rdelay={delay}")
                print(f"{'round':5} {'QD':>3} {'client':8} {'IOPS':>8} {'lat':>9} "
                      f"{'CPU/req':>9}")
                added: list[float] = []
                for rnd in range(args.rounds):
                    for qd in (1, 32):
                        # Alternate which goes first, as the guest benchmark does.
                        order = [("vhostd", run_vhostd), ("libnbd", run_libnbd)]
                        if rnd % 2:
                            order.reverse()
                        res = {}
                        for name, fn in order:
                            res[name] = fn(uri, qd, args.seconds)
                            iops, lat, cpu = res[name]
                            print(f"{rnd + 1:5} {qd:3} {name:8} {iops:8.0f} {lat:7.1f}us "
                                  f"{cpu:7.1f}us", flush=True)
                        if qd == 1:
                            added.append(res["vhostd"][1] - res["libnbd"][1])
                print(f"vhostd's added latency at QD1 (median of {len(added)} rounds): "
                      f"{statistics.median(added):.1f} us")
                if args.profile:
                    profile(uri, args.seconds)
            finally:
                server.kill()
                server.wait(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
