"""Queue worker processes (``--queue-workers``) over a real socket to a real vhostd.

With N workers the request queues of every blk device are dealt round-robin to
[main process, worker1, ..., workerN], so with one worker a two-queue disk has vq0 in
the main process and vq1 in the worker. The worker is a child process of the daemon
(``python -m vhostd.shell.worker``); the daemon logs its pid. Whether a queue is served
in the worker is observed from the outside: stop the worker (SIGSTOP) and only its
queue stalls; kill it and the daemon takes the queue over.

The ``vhostd`` fixture (tests/conftest.py) checks at teardown that the log has no
traceback or internal error and that the daemon exited 0 (or was SIGKILLed on purpose).
"""

from __future__ import annotations

import mmap
import os
import re
import signal
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from frontend_support import SECTOR, MiB, collect, rand

from vhostd.engine.seals import sealed_memfd
from vhostd.frontend.admin import AdminDriver
from vhostd.frontend.blk import BlkFrontend
from vhostd.frontend.memory import PAGE_SIZE
from vhostd_proto.vhost_user import VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES

DISK = 64 * MiB
BLOCK = 4096
S_OK = 0
# Generous: another engineer may run QEMU on this 2-core machine at the same time.
TIMEOUT = 10.0


# ---- processes ------------------------------------------------------------------------


def worker_pids(log: str) -> list[int]:
    """The pids the daemon logged for its queue workers ([] if it started none)."""
    found = re.findall(r"queue worker\(s\) \(pids ([\d ]+)\) serve", log)
    assert len(found) <= 1, log
    return [int(p) for p in found[0].split()] if found else []


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def state(pid: int) -> str | None:
    """The process state letter, None once the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def gone(pid: int) -> bool:
    """Exited: no process, or a zombie nobody reaped yet (it serves nothing any more)."""
    return state(pid) in (None, "Z")


def wait_gone(pid: int, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not gone(pid):
        assert time.monotonic() < deadline, f"process {pid} still runs ({state(pid)})"
        time.sleep(0.01)


def cpu_ticks(pid: int) -> int:
    """utime + stime of the process, in clock ticks (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def eventfd_count(fd: int) -> int:
    """The counter of one of our eventfds, without consuming it."""
    text = Path(f"/proc/self/fdinfo/{fd}").read_text()
    return int(re.search(r"eventfd-count:\s*([0-9a-f]+)", text).group(1), 16)  # type: ignore[union-attr]


def wait_for(cond: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout} s"
        time.sleep(0.01)


# ---- fixtures -------------------------------------------------------------------------


@pytest.fixture
def start(vhostd: Callable[..., Any], sparse_image: Callable[..., Path]) -> Callable[..., Any]:
    """A blk daemon with these extra args (``--num-queues=2 --queue-workers=1`` default)."""
    def run(*args: str) -> Any:
        args = args or ("--num-queues=2", "--queue-workers=1")
        return vhostd(f"--blk-file={sparse_image(DISK)}", *args)
    return run


@pytest.fixture
def frontends() -> Iterator[Callable[..., BlkFrontend]]:
    opened: list[BlkFrontend] = []

    def make(path: Path, **kw: Any) -> BlkFrontend:
        kw.setdefault("num_queues", 2)
        kw.setdefault("timeout", TIMEOUT)
        fe = BlkFrontend(path, **kw)
        opened.append(fe)
        return fe

    yield make
    for fe in opened:
        fe.close()



class Disk:
    """Verified block I/O on chosen queues: what was written, read back exactly."""

    def __init__(self, fe: BlkFrontend) -> None:
        self.fe = fe
        self.model: dict[int, bytes] = {}
        self.outstanding: dict[int, tuple[int, str, int, bytes | None]] = {}

    def submit_writes(self, q: int, blocks: list[int]) -> list[int]:
        tokens = []
        for b in blocks:
            data = rand(BLOCK)
            t = self.fe.submit_write(q, b * BLOCK // SECTOR, data)
            self.outstanding[t] = (q, "w", b, data)
            tokens.append(t)
        return tokens

    def submit_reads(self, q: int, blocks: list[int]) -> list[int]:
        tokens = []
        for b in blocks:
            t = self.fe.submit_read(q, b * BLOCK // SECTOR, BLOCK)
            self.outstanding[t] = (q, "r", b, self.model.get(b, bytes(BLOCK)))
            tokens.append(t)
        return tokens

    def drain(self, queues: list[int] | None = None, timeout: float = TIMEOUT) -> None:
        """Every outstanding request (of ``queues``; default all) completes once, OK,
        with the right data."""
        deadline = time.monotonic() + timeout
        qs = sorted({q for q, *_ in self.outstanding.values()}) if queues is None else queues
        for q in qs:
            self.fe.kick(q)

        def left() -> int:
            return sum(1 for q, *_ in self.outstanding.values() if q in qs)

        while left():
            assert time.monotonic() < deadline, f"{left()} request(s) never completed"
            for q in qs:
                for token, status, data in self.fe.complete(q, 0.2):
                    assert token in self.outstanding, f"request {token} completed twice"
                    _q, kind, b, expect = self.outstanding.pop(token)
                    assert status == S_OK, (kind, b, status)
                    if kind == "w":
                        self.model[b] = expect  # type: ignore[assignment]
                    else:
                        assert data == expect, f"block {b} read back wrong data"

    def round(self, q: int, blocks: list[int]) -> None:
        """Write the blocks, then read them back, on queue ``q``."""
        self.submit_writes(q, blocks)
        self.drain([q])
        self.submit_reads(q, blocks)
        self.drain([q])

    def verify(self, q: int) -> None:
        blocks = sorted(self.model)
        for k in range(0, len(blocks), 32):
            self.submit_reads(q, blocks[k:k + 32])
            self.drain()


def one_worker(p: Any) -> int:
    pids = worker_pids(p.log)
    assert len(pids) == 1, p.log
    assert "1 queue worker(s)" in p.log and "serve 1 of 2 request queues" in p.log
    return pids[0]


# ---- which process serves what --------------------------------------------------------


def test_one_worker_serves_the_second_queue(start: Callable[..., Any],
                                            frontends: Callable[..., BlkFrontend]) -> None:
    p = start()
    pid = one_worker(p)
    assert children(p.proc.pid) == [pid]
    assert b"vhostd.shell.worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    fe = frontends(p.socket_path)
    disk = Disk(fe)
    disk.round(0, list(range(0, 16)))
    disk.round(1, list(range(16, 32)))
    # A stopped worker stalls vq1 and only vq1: that is where it is served.
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: state(pid) == "T", "worker stopped")
        stalled = disk.submit_writes(1, list(range(32, 40)))
        fe.kick(1)
        disk.round(0, list(range(40, 48)))  # vq0 is the main process's
        assert not fe.complete(1, 0.5), "vq1 completed while its worker was stopped"
        assert set(stalled) <= set(disk.outstanding)
    finally:
        os.kill(pid, signal.SIGCONT)
    disk.drain()
    disk.verify(0)
    disk.verify(1)
    assert fe.stop() == [q.vq.used_idx() for q in fe.queues]
    assert "worker worker1 failed" not in p.log


def test_worker_cpu_time_grows_with_its_queue_only(start: Callable[..., Any],
                                                   frontends: Callable[..., BlkFrontend]
                                                   ) -> None:
    p = start()
    pid = one_worker(p)
    fe = frontends(p.socket_path)

    def drive(q: int) -> int:
        """Worker CPU ticks spent while 16384 requests of 64 KiB run on queue ``q``."""
        before = cpu_ticks(pid)
        for _ in range(256):
            blob = rand(64 * 1024)
            writes = [fe.submit_write(q, 128 * i, blob) for i in range(32)]
            got = collect(fe, [q], timeout=TIMEOUT)
            assert sorted(got) == writes and all(st == S_OK for st, _, _ in got.values())
            reads = [fe.submit_read(q, 128 * i, 64 * 1024) for i in range(32)]
            got = collect(fe, [q], timeout=TIMEOUT)
            assert sorted(got) == reads
            assert all(st == S_OK and data == blob for st, data, _ in got.values())
        return cpu_ticks(pid) - before

    # The worker has started (imports, event loop) and holds vq1 once vq1 has served.
    Disk(fe).round(1, list(range(8)))
    on_vq0 = drive(0)
    on_vq1 = drive(1)
    # The worker sleeps while the main process serves vq0; vq1's requests are its work
    # (about 1 ms of CPU per 64 requests here: some ten ticks of 10 ms).
    assert on_vq1 > 0
    assert on_vq1 > on_vq0


def test_zero_workers_start_no_process(start: Callable[..., Any],
                                       frontends: Callable[..., BlkFrontend]) -> None:
    p = start("--num-queues=2", "--queue-workers=0")
    assert "queue worker" not in p.log
    assert children(p.proc.pid) == []
    disk = Disk(frontends(p.socket_path))
    disk.round(0, list(range(8)))
    disk.round(1, list(range(8, 16)))
    assert children(p.proc.pid) == []


@pytest.mark.parametrize("queues", [1, 2, 4])
def test_auto_is_one_less_than_half_the_cpus_or_queues(start: Callable[..., Any],
                                                       queues: int) -> None:
    p = start(f"--num-queues={queues}")  # default: auto
    expect = max(0, min(len(os.sched_getaffinity(0)) // 2, queues) - 1)
    pids = worker_pids(p.log)
    assert len(pids) == expect
    assert sorted(children(p.proc.pid)) == sorted(pids)
    if expect:
        served = queues - (queues + expect) // (expect + 1)
        assert f"serve {served} of {queues} request queues" in p.log


# ---- failures -------------------------------------------------------------------------


def test_killed_worker_ring_is_taken_over_by_the_daemon(
        start: Callable[..., Any], frontends: Callable[..., BlkFrontend]) -> None:
    p = start()
    pid = one_worker(p)
    fe = frontends(p.socket_path)
    disk = Disk(fe)
    disk.round(1, list(range(32)))
    # A batch in flight on vq1 when the worker dies: taken, completed, or not yet seen.
    disk.submit_writes(1, list(range(32, 64)))
    fe.kick(1)
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid)
    disk.submit_writes(1, list(range(64, 72)))
    fe.kick(1, force=True)
    # The daemon learns of the death when it next recalls the ring, i.e. at the next
    # control message the back end handles (GET_FEATURES would not do: the protocol
    # core answers it alone); the test below covers a front end that sends none.
    fe.client.get_config(0, 60)
    wait_for(lambda: "worker worker1 failed" in p.log, "the failure logged")
    assert "vq1: worker worker1 failed" in p.log
    assert "this process serves the ring from now on" in p.log
    # Nothing was lost: every request completes once, the data is all there.
    disk.drain()
    disk.verify(1)
    disk.round(1, list(range(104, 120)))
    disk.round(0, list(range(120, 128)))
    disk.verify(0)
    # The daemon serves vq1 itself now, across a ring restart too.
    bases = fe.stop()
    assert bases == [q.vq.used_idx() for q in fe.queues]
    fe.start(bases)
    disk.round(1, list(range(128, 136)))
    assert p.alive()


def test_killed_worker_is_noticed_without_a_control_message(
        start: Callable[..., Any], frontends: Callable[..., BlkFrontend]) -> None:
    p = start()
    pid = one_worker(p)
    fe = frontends(p.socket_path)
    disk = Disk(fe)
    disk.round(1, list(range(8)))
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid)
    disk.submit_writes(1, list(range(8, 16)))
    disk.drain(timeout=5.0)  # only kicks, as a running guest sends
    disk.verify(1)
    # Noticed by the exit watcher, or (on a loaded machine, first) by the closed channel.
    assert ("queue worker worker1" in p.log and "exited" in p.log) \
        or "worker1 does not answer: peer closed the channel" in p.log, p.log
    assert "this process serves the ring from now on" in p.log


def test_worker_dies_with_a_killed_daemon(start: Callable[..., Any],
                                          frontends: Callable[..., BlkFrontend]) -> None:
    p = start()
    pid = one_worker(p)
    fe = frontends(p.socket_path)
    Disk(fe).round(1, list(range(8)))  # the worker holds a ring, memory, the image
    p.proc.kill()
    p.proc.wait()
    wait_gone(pid)


def test_sigterm_exits_0_and_stops_the_workers(start: Callable[..., Any],
                                               frontends: Callable[..., BlkFrontend]) -> None:
    p = start("--num-queues=4", "--queue-workers=3")
    pids = worker_pids(p.log)
    assert len(pids) == 3 and sorted(children(p.proc.pid)) == sorted(pids)
    fe = frontends(p.socket_path, num_queues=4)
    disk = Disk(fe)
    for q in range(4):
        disk.round(q, [8 * q + i for i in range(8)])
    # SIGTERM with a front end connected and rings in the workers.
    assert p.stop(timeout=TIMEOUT) == 0
    for pid in pids:
        assert gone(pid), f"worker {pid} outlived the daemon"
    assert "shutting down" in p.log


# ---- ring positions -------------------------------------------------------------------


def test_get_vring_base_and_restart_with_a_ring_in_the_worker(
        start: Callable[..., Any], frontends: Callable[..., BlkFrontend]) -> None:
    p = start()
    one_worker(p)
    fe = frontends(p.socket_path)
    for i in range(7):
        fe.write(8 * i, rand(BLOCK), q=i % 2)
    bases = fe.stop()
    assert bases == [4, 3] == [q.vq.used_idx() for q in fe.queues]
    assert fe.stop() == bases  # GET_VRING_BASE changes nothing
    # A published but unkicked request: the ring may take it (a ring sent to the worker
    # looks at the avail ring at once, since kick batching lets the driver skip kicks)
    # or not before the stop; either way the base says so exactly, and after a
    # restart it completes once.
    fe.start(bases)
    fe.client.get_features()
    late = rand(BLOCK)
    tok = fe.submit_write(1, 900, late)
    fe.queues[1].vq.publish()
    stopped = fe.stop()
    assert stopped in ([4, 3], [4, 4]) and stopped == [q.vq.used_idx() for q in fe.queues]
    fe.start(stopped)
    _, status, _, _ = fe.wait(1, tok, timeout=TIMEOUT)
    assert status == S_OK and fe.read(900, BLOCK) == late
    assert fe.stop() == [5, 4]
    fe.start()
    # Many cycles with I/O in between: positions always continue exactly.
    expect = [5, 4]
    for cycle in range(10):
        blob = rand(BLOCK)
        fe.write(1000 + 8 * cycle, blob, q=1)
        assert fe.read(1000 + 8 * cycle, BLOCK, q=1) == blob
        expect[1] += 2
        if cycle % 3 == 0:
            fe.write(2000 + 8 * cycle, blob, q=0)
            expect[0] += 1
        bases = fe.stop()
        assert bases == expect == [q.vq.used_idx() for q in fe.queues]
        fe.start()
    assert "worker worker1 failed" not in p.log


def seven_on_vq0_thirteen_on_vq1(fe: BlkFrontend) -> None:
    """7 writes in the main process's queue, 13 reads in the worker's."""
    for i in range(7):
        fe.write(8 * i, rand(BLOCK), q=0)
    for i in range(13):
        fe.read(8 * i, BLOCK, q=1)


def test_served_per_queue_counts_the_workers_requests(
        start: Callable[..., Any], frontends: Callable[..., BlkFrontend]) -> None:
    p = start()
    one_worker(p)
    fe = frontends(p.socket_path)
    seven_on_vq0_thirteen_on_vq1(fe)
    fe.close()
    wait_for(lambda: "requests served per queue: vq0=7 vq1=13" in p.log, "the counts")
    # Totals across front ends: the ring went to the worker again for the next one.
    fe2 = frontends(p.socket_path)
    for i in range(5):
        fe2.write(8 * i, rand(BLOCK), q=1)
    fe2.close()
    wait_for(lambda: "requests served per queue: vq0=7 vq1=18" in p.log, "the totals")


def test_sigusr1_logs_every_ring_with_exact_positions(
        start: Callable[..., Any], frontends: Callable[..., BlkFrontend]) -> None:
    p = start()
    one_worker(p)
    fe = frontends(p.socket_path)
    seven_on_vq0_thirteen_on_vq1(fe)

    def report(vq: int, n: int, where: str) -> str:
        return (rf"state: blk0/vq{vq}: running, size \d+, next avail {n}, next used {n} "
                rf"\(guest memory: avail.idx {n}, used.idx {n}\), served {n}, "
                rf"kicks [1-9]\d*, outstanding 0{where}\n")

    p.proc.send_signal(signal.SIGUSR1)
    # vq1 is in the worker, which reports it where it runs.
    wait_for(lambda: re.search(report(1, 13, ", in worker1"), p.log) is not None, "vq1's line")
    assert re.search(report(0, 7, ""), p.log), p.log
    assert "state: a front end connected" in p.log
    # The ring stayed in the worker, and goes on from where it was.
    fe.read(0, BLOCK, q=1)
    p.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: re.search(report(1, 14, ", in worker1"), p.log) is not None, "vq1 again")


# ---- QEMU's dirty log from a worker ---------------------------------------------------


def test_dirty_logging_serves_every_ring_in_the_daemon(
        start: Callable[..., Any], frontends: Callable[..., BlkFrontend]) -> None:
    """Marking a page is a read-modify-write of a byte of the shared log: two processes
    marking at once could lose a mark. While logging, the daemon serves every ring,
    marks what the worker's ring writes, and gives the ring back afterwards."""
    p = start()
    one_worker(p)
    fe = frontends(p.socket_path, max_io=3 * PAGE_SIZE)
    pages = max(r.end for r in fe.mem.regions) // PAGE_SIZE
    size = (pages + 63) // 64 * 8
    fd = sealed_memfd("vhostd-test-dirty-log", size)
    mm = mmap.mmap(fd, size)
    try:
        def logged() -> set[int]:
            raw = mm[:]
            return {8 * i + b for i, byte in enumerate(raw) if byte for b in range(8)
                    if byte >> b & 1}

        def read_on_1(sector: int) -> set[int]:
            token = fe.submit_read(1, sector, 3 * PAGE_SIZE)
            entry = next(e for e in fe.queues[1].inflight.values() if e[0] == token)
            _, _, in_gpa, in_len, status, _ = entry
            fe.kick(1)
            assert fe.wait(1, token)[1] == S_OK
            return set(range(in_gpa // PAGE_SIZE, (in_gpa + in_len - 1) // PAGE_SIZE + 1)) \
                | {status // PAGE_SIZE}

        features = fe.features | 1 << VHOST_USER_F_PROTOCOL_FEATURES
        fe.client.set_log_base(fd, size, 0)
        read_on_1(0)
        assert logged() == set(), "logged before LOG_ALL"
        fe.client.set_features(features | 1 << VHOST_F_LOG_ALL, need_reply=True)
        wait_for(lambda: "this process serves every ring" in p.log, "rings called home")
        expect = read_on_1(8) | read_on_1(64)
        assert logged() == expect
        mm[:] = bytes(size)
        fe.client.set_features(features)
        fe.client.get_features()
        read_on_1(128)
        assert logged() == set(), "logged after LOG_ALL was cleared"
        assert "dirty logging ended; rings go back to their queue workers" in p.log
    finally:
        mm.close()
        os.close(fd)
    fe.close()
    wait_for(lambda: "front end disconnected" in p.log, "disconnect")
    assert "worker worker1 failed" not in p.log


# ---- owner members in workers ---------------------------------------------------------


def test_kick_is_not_stolen_by_the_stopped_source_member(
        short_dir: Path, vhostd: Callable[..., Any], sparse_image: Callable[..., Path],
        frontends: Callable[..., BlkFrontend]) -> None:
    image = sparse_image(DISK, "shared.img")
    p = vhostd(f"--member=socket-path={short_dir}/m1.sock,blk-file={image}",
               f"--member=socket-path={short_dir}/m2.sock,blk-file={image}",
               "--queue-workers=1", socket_path=short_dir / "o.sock")
    pid = one_worker(p)  # member 1 in the main process, member 2 in the worker
    fe = frontends(short_dir / "m1.sock", num_queues=1)
    disk = Disk(fe)
    disk.round(0, list(range(16)))
    with AdminDriver(short_dir / "o.sock") as admin:
        admin.activate()
        old = fe.attach(short_dir / "m2.sock")
        admin.move(1, 2)  # member 1 stopped, its front end still connected
        try:
            # Make the race deterministic: the worker sleeps while the kick comes.
            os.kill(pid, signal.SIGSTOP)
            wait_for(lambda: state(pid) == "T", "worker stopped")
            disk.submit_writes(0, [100])
            fe.kick(0, force=True)
            # The stopped member 1 (main process) must leave the shared eventfd alone.
            kick = fe.queues[0].vq.kick_fd
            fe.client.get_features()  # the main process's loop has run since the kick
            time.sleep(0.2)
            assert eventfd_count(kick) == 1, "the stopped member consumed the kick"
        finally:
            os.kill(pid, signal.SIGCONT)
        disk.drain([0], timeout=3.0)  # member 2 must serve the request all the same
        old.close()
        disk.verify(0)


def test_members_in_workers_move_and_serve(short_dir: Path, vhostd: Callable[..., Any],
                                           sparse_image: Callable[..., Path],
                                           frontends: Callable[..., BlkFrontend]) -> None:
    """Three members, two workers: member 2 in worker1, member 3 in worker2. A guest
    moves 2 -> 3 -> 2 (worker to worker), and stop/resume keeps its position."""
    image = sparse_image(DISK, "shared.img")
    args = [f"--member=socket-path={short_dir}/m{i}.sock,blk-file={image}" for i in (1, 2, 3)]
    p = vhostd(*args, "--queue-workers=2", socket_path=short_dir / "o.sock")
    assert "2 queue worker(s)" in p.log and "serve 2 of 3 request queues" in p.log
    fe = frontends(short_dir / "m2.sock", num_queues=1)
    disk = Disk(fe)
    disk.round(0, list(range(32)))
    with AdminDriver(short_dir / "o.sock") as admin:
        admin.activate()
        for src, dst in ((2, 3), (3, 2)):
            old = fe.attach(short_dir / f"m{dst}.sock")
            parts = admin.move(src, dst)
            used = fe.queues[0].vq.used_idx()
            last_avail, used_part = struct.unpack_from(
                "<HH", parts, parts.index(struct.pack("<HBB8sI", 0x5F0, 0, 0, bytes(8), 8)) + 16)
            assert (last_avail, used_part) == (used, used)
            old.close()
            wait_for(lambda s=src: f"member{s}: front end disconnected" in p.log, "disconnect")
            disk.round(0, list(range(32, 64)))
            admin.stop(dst)
            stalled = disk.submit_writes(0, [200, 201])
            fe.kick(0, force=True)
            assert not fe.complete(0, 0.3), "a stopped member served a request"
            admin.resume(dst)
            disk.drain()
            assert not set(stalled) & set(disk.outstanding)
        disk.verify(0)
    assert "worker worker" not in p.log  # no worker failed


def test_a_slow_worker_holds_up_nobody_else(short_dir: Path, vhostd: Callable[..., Any],
                                            sparse_image: Callable[..., Path],
                                            frontends: Callable[..., BlkFrontend]) -> None:
    """Member 2's ring is in the worker, which is stopped (SIGSTOP) for a second while
    member 2's front end asks for the ring's base (the ring must come home first). The
    owner's admin queue and member 1's front end are answered meanwhile, at once."""
    image = sparse_image(DISK, "shared.img")
    p = vhostd(f"--member=socket-path={short_dir}/m1.sock,blk-file={image}",
               f"--member=socket-path={short_dir}/m2.sock,blk-file={image}",
               "--queue-workers=1", socket_path=short_dir / "o.sock")
    pid = one_worker(p)  # member 1 in the main process, member 2 in the worker
    fe1 = frontends(short_dir / "m1.sock", num_queues=1)
    fe2 = frontends(short_dir / "m2.sock", num_queues=1)
    fe2.write(0, rand(BLOCK))
    with AdminDriver(short_dir / "o.sock") as admin:
        admin.activate()
        os.kill(pid, signal.SIGSTOP)
        try:
            wait_for(lambda: state(pid) == "T", "worker stopped")
            fe2.client.request(0xB, struct.pack("<II", 0, 0))  # GET_VRING_BASE, ring 0
            time.sleep(0.1)  # the daemon has asked the worker for the ring by now
            t0 = time.monotonic()
            assert admin.member_count() == 2
            fe1.client.get_features()
            fe1.write(8, rand(BLOCK))
            admin.stop(1)
            admin.resume(1)
            answered = time.monotonic() - t0
            fe2.client.sock.settimeout(0.2)
            with pytest.raises(TimeoutError):
                fe2.client.recv_message()  # still waiting for the worker
            time.sleep(max(0.0, 1.0 - (time.monotonic() - t0)))
        finally:
            os.kill(pid, signal.SIGCONT)
        fe2.client.sock.settimeout(TIMEOUT)
        _req, _flags, payload, _fds = fe2.client.recv_message()
        assert struct.unpack("<II", payload) == (0, 1)  # ring 0 had taken one chain
    assert answered < 0.5, f"the others waited {answered:.3f} s for the stopped worker"
