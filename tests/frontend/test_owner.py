"""The owner device over real sockets: a vhostd process with an owner and three blk members.

The hypervisor side is ``AdminDriver`` (the admin queue of the owner) and the guest side is
``BlkFrontend`` keeping a member busy with verified I/O. Members 1 and 2 serve the SAME
image file (shared storage), so a guest moved from one to the other sees one disk;
member 3 has an image of its own. Command bytes in the Linux replays are written with
``struct`` from the reference (virtio-admin-migration.md sections 5.1, 5.3, 5.4).

The ``vhostd`` fixture (tests/conftest.py) checks at teardown that the daemon's log has
no traceback or internal error and that it exited 0.
"""

from __future__ import annotations

import os
import random
import re
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from vhostd.frontend.admin import AdminDriver
from vhostd.frontend.blk import STATUS_UNSET, BlkFrontend
from vhostd.frontend.client import recv_backend_message
from vhostd.frontend.memory import PAGE_SIZE
from vhostd_proto.vhost_user import BackendRequest

MiB = 1 << 20
DISK = 16 * MiB
BLOCK = 4096
SECTORS = BLOCK // 512

SELF, SRIOV = 0, 1
LIST_QUERY, LIST_USE = 0x0, 0x1
CAP_ID_LIST_QUERY, DEVICE_CAP_GET, DRIVER_CAP_SET = 0x7, 0x8, 0x9
CREATE, DESTROY, METADATA_GET, PARTS_GET, PARTS_SET, MODE_SET = 0xA, 0xD, 0xE, 0xF, 0x10, 0x11
OK, EBUSY, EINVAL = 0, 16, 22
Q_OK, Q_INVALID_OPCODE, Q_INVALID_FIELD, Q_INVALID_MEMBER = 0, 2, 3, 5
GET, SET = 0, 1
LINUX_BITMAP = sum(1 << op for op in (7, 8, 9, 0xA, 0xD, 0xE, 0xF, 0x10, 0x11))

DEVICE_STATUS, VQ_CFG, VQ_STATE, WCE = 0x103, 0x104, 0x5F0, 0x5F1
WCE_OFFSET = 32


# ---- the daemon ----------------------------------------------------------------------


@dataclass
class Rig:
    proc: Any  # tests/conftest.py VhostdProcess
    owner: Path
    members: list[Path]  # sockets of members 1..3
    shared: Path  # image of members 1 and 2
    own: Path  # image of member 3

    def member(self, n: int) -> str:
        return str(self.members[n - 1])

    def served(self, n: int) -> int | None:
        """Requests the member reports at its last front-end disconnect (its lifetime total)."""
        found = re.findall(rf"vhostd\.member{n}: requests served per queue: vq0=(\d+)",
                           self.proc.log)
        return int(found[-1]) if found else None

    def wait_served(self, n: int, expect: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while self.served(n) != expect:
            assert time.monotonic() < deadline, (n, self.served(n), expect, self.proc.log)
            time.sleep(0.01)



@pytest.fixture
def queue_workers() -> int:
    """Queue worker processes of the rig's daemon (tests parametrize it directly)."""
    return 0


# The members' queues are dealt round-robin to [main process, worker1, ...]: with one
# worker member 2 is served in it (members 1 and 3 in the main process), with two
# workers member 2 is in worker1 and member 3 in worker2.
MEMBER2_WORKERS = pytest.mark.parametrize("queue_workers", [0, 1], ids=["workers0", "workers1"])
MEMBER3_WORKERS = pytest.mark.parametrize("queue_workers", [0, 2], ids=["workers0", "workers2"])
PRECOPY_WORKERS = MEMBER2_WORKERS


@pytest.fixture
def rig(short_dir: Path, vhostd: Callable[..., Any],
        sparse_image: Callable[..., Path], queue_workers: int) -> Rig:
    shared = sparse_image(DISK, "shared.img")
    own = sparse_image(DISK, "own.img")
    socks = [short_dir / f"m{i}.sock" for i in (1, 2, 3)]
    images = [shared, shared, own]
    args = []
    for s, img in zip(socks, images, strict=True):
        args += ["--member", f"socket-path={s},blk-file={img}"]
    proc = vhostd(*args, f"--queue-workers={queue_workers}", socket_path=short_dir / "o.sock")
    if queue_workers:
        assert (f"{queue_workers} queue worker(s) (pids " in proc.log
                and f"serve {queue_workers} of 3 request queues" in proc.log), proc.log
    else:
        assert "queue worker" not in proc.log
    return Rig(proc, short_dir / "o.sock", socks, shared, own)


@pytest.fixture
def admin(rig: Rig) -> Iterator[AdminDriver]:
    d = AdminDriver(rig.owner)
    yield d
    d.close()


# ---- guest I/O with a model of the disk ------------------------------------------------


@dataclass
class Workload:
    """Batches of random 4 KiB writes and reads on queue 0, checked against a model.

    Blocks with a request in flight are never picked again until it completes, so the
    result of every request is known. Every token must complete exactly once.
    """

    fe: BlkFrontend
    blocks: int = 512
    seed: int = 1
    rng: random.Random = field(init=False)
    model: dict[int, bytes] = field(default_factory=dict)
    outstanding: dict[int, tuple[str, int, bytes]] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)
    submitted: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def expected(self, block: int) -> bytes:
        return self.model.get(block, bytes(BLOCK))

    def submit(self, n: int, kick: bool = True, force: bool = False) -> list[int]:
        busy = {b for _, b, _ in self.outstanding.values()}
        free = [b for b in range(self.blocks) if b not in busy]
        tokens = []
        for block in self.rng.sample(free, n):
            if self.rng.random() < 0.6:
                data = self.rng.randbytes(BLOCK)
                token = self.fe.submit_write(0, block * SECTORS, data)
                self.outstanding[token] = ("w", block, data)
            else:
                token = self.fe.submit_read(0, block * SECTORS, BLOCK)
                self.outstanding[token] = ("r", block, self.expected(block))
            tokens.append(token)
        self.submitted += n
        if kick:
            self.fe.kick(0, force=force)
        return tokens

    def reap(self, timeout: float | None = None) -> list[int]:
        got = []
        for token, status, data in self.fe.complete(0, timeout):
            assert token not in self.done, f"request {token} completed twice"
            kind, block, expect = self.outstanding.pop(token)
            assert status == 0, (kind, block, status)
            if kind == "w":
                self.model[block] = expect
            else:
                assert data == expect, f"block {block} read back wrong data"
            self.done.add(token)
            got.append(token)
        return got

    def drain(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while self.outstanding:
            assert time.monotonic() < deadline, f"{len(self.outstanding)} requests never completed"
            self.reap(0.5)

    def busy(self, batches: int = 3, n: int = 8) -> None:
        for _ in range(batches):
            self.submit(n)
            self.drain()

    def verify(self) -> None:
        """Read back every block the model knows (in batches), then drain."""
        blocks = sorted(self.model)
        for k in range(0, len(blocks), 32):
            for block in blocks[k:k + 32]:
                token = self.fe.submit_read(0, block * SECTORS, BLOCK)
                self.outstanding[token] = ("r", block, self.expected(block))
                self.submitted += 1
            self.fe.kick(0)
            self.drain()


def verify_image(path: Path, w: Workload) -> None:
    with open(path, "rb") as f:
        for block, data in w.model.items():
            f.seek(block * BLOCK)
            assert f.read(BLOCK) == data, f"block {block} not in the image"


# ---- parts and ring helpers ----------------------------------------------------------


def parse_parts(data: bytes) -> list[tuple[int, int, bytes, bytes]]:
    out = []
    off = 0
    while off < len(data):
        ptype, flags, _res, sel, length = struct.unpack_from("<HBB8sI", data, off)
        off += 16
        out.append((ptype, flags, sel, data[off:off + length]))
        off += length
    assert off == len(data)
    return out


def part_value(parts: bytes, ptype: int, index: int | None = None) -> bytes:
    sel = bytes(8) if index is None else struct.pack("<H6x", index)
    found = [v for t, _f, s, v in parse_parts(parts) if t == ptype and s == sel]
    assert len(found) == 1
    return found[0]


def vq_state(parts: bytes) -> tuple[int, int]:
    """(next avail, used idx) of queue 0 from VHOSTD_DEV_PART_VQ_STATE."""
    last_avail, used, aw, uw = struct.unpack("<HHBB2x", part_value(parts, VQ_STATE, 0))
    assert (aw, uw) == (0, 0)
    return last_avail, used


def used_idx(fe: BlkFrontend, q: int = 0) -> int:
    vq = fe.queues[q].vq
    return struct.unpack("<H", fe.mem.read(vq.used_gpa + 2, 2))[0]


def guest_ram(fe: BlkFrontend) -> bytes:
    return b"".join(bytes(r.buf) for r in fe.mem.regions)


def call_pending(fe: BlkFrontend, wait: float = 0.0) -> bool:
    """Whether the call eventfd was signalled (consumes it)."""
    fd = fe.queues[0].vq.call_fd
    r, _, _ = select.select([fd], [], [], wait)
    if not r:
        return False
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        return False
    return True


def obj_hdr(obj_id: int) -> bytes:
    return struct.pack("<H2xI", 0, obj_id)


def expect_ok(r: Any, result_len: int | None = None) -> bytes:
    assert (r.status, r.qualifier) == (OK, Q_OK), r
    # Linux takes the record length from the used length: exactly 8 + result bytes.
    assert r.used_len == 8 + len(r.result)
    if result_len is not None:
        assert len(r.result) == result_len
    return bytes(r.result)


# ---- Linux's exact command sequences (reference 5.1, 5.3, 5.4) -------------------------


class Linux:
    """The admin commands drivers/vfio/pci/virtio and virtio_pci send, byte for byte."""

    def __init__(self, d: AdminDriver, cap_group: int = SELF,
                 between: Callable[[], object] | None = None) -> None:
        self.d = d
        self.cap_group = cap_group
        self.limit = 0
        self.between = between  # guest I/O run after every admin command

    def submit(self, opcode: int, group: int, member: int, data: bytes,
               result_size: int) -> Any:
        r = self.d.submit(opcode, group, member, data, result_size)
        if self.between is not None:
            self.between()
        return r

    def activate(self) -> None:
        supported = int.from_bytes(
            expect_ok(self.submit(LIST_QUERY, SRIOV, 0, b"", 8), 8), "little")
        supported_cmds = supported & LINUX_BITMAP
        expect_ok(self.submit(LIST_USE, SRIOV, 0, supported_cmds.to_bytes(8, "little"), 0), 0)
        caps = expect_ok(self.submit(CAP_ID_LIST_QUERY, self.cap_group, 0, b"", 8), 8)
        assert int.from_bytes(caps, "little") & 1, "VIRTIO_DEV_PARTS_CAP missing"
        cap = expect_ok(self.submit(DEVICE_CAP_GET, self.cap_group, 0, struct.pack("<H6x", 0), 2),
                        2)
        limit = min(cap[0], cap[1])
        expect_ok(self.submit(DRIVER_CAP_SET, self.cap_group, 0,
                           struct.pack("<H6xBB", 0, limit, limit), 0), 0)
        # virtio_pci_admin_has_dev_parts(): all nine opcodes and a limit > 0
        assert supported_cmds == LINUX_BITMAP and limit > 0
        self.limit = limit

    def mode(self, vf: int, stop: bool) -> None:
        expect_ok(self.submit(MODE_SET, SRIOV, vf, bytes([1 if stop else 0]), 0), 0)

    def create(self, vf: int, obj_id: int, kind: int) -> None:
        data = struct.pack("<H2xIQB7x", 0, obj_id, 0, kind)
        assert len(data) == 24
        expect_ok(self.submit(CREATE, SRIOV, vf, data, 0), 0)

    def destroy(self, vf: int, obj_id: int) -> None:
        expect_ok(self.submit(DESTROY, SRIOV, vf, obj_hdr(obj_id), 0), 0)

    def size(self, vf: int, obj_id: int) -> int:
        r = self.submit(METADATA_GET, SRIOV, vf, obj_hdr(obj_id) + struct.pack("<B7x", 0), 8)
        size = struct.unpack("<I4x", expect_ok(r, 8))[0]
        assert size > 0  # Linux rejects 0
        return size

    def get_all(self, vf: int, obj_id: int, size: int) -> bytes:
        room = (size + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE  # whole pages, not trimmed
        r = self.submit(PARTS_GET, SRIOV, vf, obj_hdr(obj_id) + struct.pack("<B7x", 1), room)
        record = expect_ok(r)
        assert 0 < len(record) <= size
        return record

    def save(self, vf: int, obj_id: int) -> bytes:
        """STOP -> STOP_COPY (or RUNNING -> PRE_COPY): CREATE(GET), SIZE, GET ALL."""
        self.create(vf, obj_id, GET)
        return self.get_all(vf, obj_id, self.size(vf, obj_id))

    def precopy_info(self, vf: int, obj_id: int) -> bytes:
        return self.get_all(vf, obj_id, self.size(vf, obj_id))

    def set_record(self, vf: int, obj_id: int, record: bytes) -> None:
        expect_ok(self.submit(PARTS_SET, SRIOV, vf, obj_hdr(obj_id) + record, 0), 0)


@pytest.mark.parametrize("cap_group", [SELF, SRIOV], ids=["caps-on-self", "caps-on-sriov"])
def test_linux_owner_activation(rig: Rig, cap_group: int) -> None:
    with AdminDriver(rig.owner) as d:
        linux = Linux(d, cap_group)
        linux.activate()
        assert linux.limit == 32
        # Linux's LIST_USE has no bits 0/1: the list commands are blocked on group 1 now
        r = d.submit(LIST_QUERY, SRIOV, 0, b"", 8)
        assert (r.status, r.qualifier) == (EINVAL, Q_INVALID_OPCODE)
        linux.create(1, 31, GET)
    # a new admin driver is an owner reset: lists reopen, caps and objects are gone
    with AdminDriver(rig.owner) as d:
        r = d.submit(CREATE, SRIOV, 1, struct.pack("<H2xIQB7x", 0, 31, 0, GET), 0)
        assert (r.status, r.qualifier) == (EINVAL, Q_INVALID_OPCODE)
        linux = Linux(d, cap_group)
        linux.activate()
        linux.create(1, 31, GET)  # id 31 is free again
        assert d.member_count() == 3


@MEMBER3_WORKERS
def test_linux_source_stop_copy_then_migration_fails(rig: Rig, admin: AdminDriver) -> None:
    """Stop-copy only (5.4): stop, CREATE(GET)+SIZE+GET, DESTROY; the migration then fails
    and the source resumes; the guest's I/O continues throughout."""
    linux = Linux(admin)
    linux.activate()
    with BlkFrontend(rig.member(3)) as fe:
        w = Workload(fe, seed=3)
        w.busy()
        linux.between = lambda: (w.submit(3), w.reap(0))
        # VFIO_DEVICE_FEATURE_MIG_DATA_SIZE while running: CREATE, SIZE, DESTROY
        linux.create(3, 0, GET)
        linux.size(3, 0)
        linux.destroy(3, 0)
        w.busy(2)
        w.submit(16)  # in flight when the stop comes
        linux.mode(3, stop=True)  # RUNNING -> RUNNING_P2P; -> STOP sends nothing
        record = linux.save(3, 1)  # -> STOP_COPY
        again = linux.get_all(3, 1, linux.size(3, 1))
        assert again == record  # GET works any number of times; nothing changes while stopped
        linux.destroy(3, 1)  # STOP_COPY -> STOP
        assert vq_state(record) == (used_idx(fe), used_idx(fe))
        linux.mode(3, stop=False)  # STOP -> RUNNING_P2P: nothing; -> RUNNING: resume
        w.drain()
        w.busy(3)
        w.verify()
    rig.wait_served(3, w.submitted)
    verify_image(rig.own, w)


@PRECOPY_WORKERS
def test_linux_migration_with_precopy_member_1_to_2(rig: Rig, admin: AdminDriver) -> None:
    """Source member 1 with PRE_COPY, destination member 2, guest busy all along."""
    linux = Linux(admin)
    linux.activate()
    fe = BlkFrontend(rig.member(1))
    try:
        w = Workload(fe, seed=12)
        w.busy()
        linux.between = lambda: (w.submit(3), w.reap(0))
        # destination, opened: RUNNING -> RUNNING_P2P stops it; -> RESUMING creates SET
        linux.mode(2, stop=True)
        linux.create(2, 1, SET)
        # source RUNNING -> PRE_COPY, member still running
        records = [linux.save(1, 0)]
        for _ in range(3):  # PRECOPY_INFO calls with I/O in between
            w.busy(2)
            records.append(linux.precopy_info(1, 0))
        assert len({vq_state(r) for r in records}) == len(records), "ring state did not move"
        for r in records:  # the destination writes each record as it arrives
            linux.set_record(2, 1, r)
        # the VM stops: PRE_COPY -> PRE_COPY_P2P, then STOP_COPY, then STOP
        w.submit(12)
        linux.mode(1, stop=True)
        final = linux.precopy_info(1, 0)
        linux.destroy(1, 0)
        served_by_1 = used_idx(fe)  # everything member 1 took (it served all from 0)
        assert vq_state(final) == (served_by_1, served_by_1)
        # the guest keeps submitting while the device is stopped
        late = w.submit(5, force=True)
        assert not set(late) & set(w.reap(0.2))
        old = fe.attach(rig.member(2))
        linux.set_record(2, 1, final)
        linux.destroy(2, 1)  # RESUMING -> STOP
        linux.mode(2, stop=False)  # -> RUNNING_P2P -> RUNNING: the parts take effect
        w.drain()
        assert set(late) <= w.done
        old.close()
        rig.wait_served(1, served_by_1)
        w.busy(4)
        w.verify()
    finally:
        fe.close()
    rig.wait_served(2, w.submitted - served_by_1)
    verify_image(rig.shared, w)


# ---- moves ---------------------------------------------------------------------------


@MEMBER2_WORKERS
def test_move_mid_stream_loses_and_repeats_nothing(rig: Rig, admin: AdminDriver) -> None:
    admin.activate()
    fe = BlkFrontend(rig.member(1))
    try:
        w = Workload(fe, seed=5)
        for _ in range(6):
            w.submit(10)
            w.reap()  # keep some in flight across batches
        w.submit(16)
        admin.stop(1)
        # member 1 served every request from 0 up to what it took before the stop (the
        # last batch may or may not have been taken: the kick races the admin command)
        served_by_1 = used_idx(fe)
        assert w.submitted - 16 <= served_by_1 <= w.submitted
        at_stop = admin.parts_get(1)
        state1 = vq_state(at_stop)
        assert state1 == (served_by_1, served_by_1)
        # submitted and kicked while member 1 is stopped: they wait
        late = w.submit(7, force=True)
        assert not set(late) & set(w.reap(0.3))
        old = fe.attach(rig.member(2))
        admin.stop(2)
        admin.parts_set(2, at_stop)
        admin.resume(2)
        w.drain()
        assert set(late) <= w.done  # completed by member 2
        after = admin.parts_get(2)
        # ring positions continue exactly where member 1 stopped, plus what it left
        left = w.submitted - served_by_1
        assert vq_state(after) == (state1[0] + left, state1[1] + left) == (used_idx(fe),) * 2
        old.close()
        rig.wait_served(1, served_by_1)  # member 1 did none of the late requests
        for _ in range(5):
            w.submit(10)
            w.reap()
        w.drain()
        w.verify()
        total = w.submitted
    finally:
        fe.close()
    rig.wait_served(2, total - served_by_1)
    assert len(w.done) == total and not w.outstanding
    verify_image(rig.shared, w)


@MEMBER2_WORKERS
def test_move_back_and_forth_with_admin_move(rig: Rig, admin: AdminDriver) -> None:
    """AdminDriver.move 1 -> 2 -> 1: member 1 takes the guest back on a new connection."""
    admin.activate()
    fe = BlkFrontend(rig.member(1))
    try:
        w = Workload(fe, seed=7)
        w.busy(4)
        old = fe.attach(rig.member(2))
        parts = admin.move(1, 2)
        assert vq_state(parts) == (w.submitted, w.submitted)
        old.close()
        w.busy(4)
        old = fe.attach(rig.member(1))
        parts = admin.move(2, 1, freeze=True)
        assert vq_state(parts) == (w.submitted, w.submitted)
        old.close()
        w.busy(4)
        w.verify()
        after = admin.parts_get(1)
        assert vq_state(after) == (w.submitted, w.submitted)
    finally:
        fe.close()
    verify_image(rig.shared, w)
    assert rig.served(1) is not None and rig.served(2) is not None


@MEMBER2_WORKERS
def test_move_with_attach_after_resume_then_qemu_restart(rig: Rig, admin: AdminDriver) -> None:
    """Member 2 resumed before the guest's transport reaches it: the ring starts when the
    kick eventfd arrives (docs 5.2), serving what was kicked meanwhile. Then the front end
    restarts its rings QEMU-style on member 2; its messages take precedence."""
    admin.activate()
    fe = BlkFrontend(rig.member(1))
    try:
        w = Workload(fe, seed=8)
        w.busy(3)
        admin.stop(2)
        admin.stop(1)
        parts = admin.parts_get(1)
        served_by_1 = used_idx(fe)
        admin.parts_set(2, parts)
        admin.resume(2)  # no transport yet: nothing to run
        late = w.submit(6, force=True)
        assert not w.reap(0.2)
        old = fe.attach(rig.member(2))
        w.drain()
        assert set(late) <= w.done
        old.close()
        rig.wait_served(1, served_by_1)
        w.busy(2)
        bases = fe.stop()
        assert bases == [used_idx(fe)]
        fe.start()
        w.busy(3)
        w.verify()
        assert vq_state(admin.parts_get(2)) == (w.submitted, w.submitted)
    finally:
        fe.close()
    rig.wait_served(2, w.submitted - served_by_1)
    verify_image(rig.shared, w)


@MEMBER2_WORKERS
def test_move_carries_writethrough(rig: Rig, admin: AdminDriver) -> None:
    admin.activate()
    fe = BlkFrontend(rig.member(1))
    try:
        w = Workload(fe, seed=9)
        w.busy(2)
        fe.client.set_config(WCE_OFFSET, b"\x00")  # the guest picks writethrough
        assert fe.reread_config()[WCE_OFFSET] == 0
        w.busy(2)
        old = fe.attach(rig.member(2))
        assert fe.client.get_config(0, 60)[WCE_OFFSET] == 1  # member 2 before the move
        parts = admin.move(1, 2)
        assert part_value(parts, WCE) == b"\x00"
        old.close()
        assert fe.client.get_config(0, 60)[WCE_OFFSET] == 0
        assert part_value(admin.parts_get(2), WCE) == b"\x00"
        w.busy(3)
        w.verify()
    finally:
        fe.close()
    verify_image(rig.shared, w)


# ---- DEV_MODE_SET semantics ----------------------------------------------------------


@MEMBER3_WORKERS
def test_stop_with_a_busy_member_at_queue_depth_32(rig: Rig, admin: AdminDriver) -> None:
    admin.activate()
    with BlkFrontend(rig.member(3)) as fe:
        w = Workload(fe, seed=32)
        w.busy(2)
        for _ in range(3):
            w.submit(32)  # depth 32, kicked
            admin.stop(3)
            # every request the member took has its used entry, and nothing else was taken
            parts = admin.parts_get(3)
            taken = used_idx(fe)
            assert vq_state(parts) == (taken, taken)
            statuses = [fe.mem.read(q[4], 1)[0] for q in fe.queues[0].inflight.values()]
            # the reaped-or-not requests that are still in the front end's table were not
            # taken: their status byte is untouched
            done_not_reaped = (taken - fe.queues[0].vq.last_used_idx) & 0xFFFF
            assert statuses.count(STATUS_UNSET) == len(statuses) - done_not_reaped
            if done_not_reaped:
                w.reap()  # the driver acknowledges them (used_event moves on)
            call_pending(fe)
            # while stopped: more requests, kicks, vhost-user messages, stop again
            w.submit(8, force=True)
            fe.kick(0, force=True)
            before = guest_ram(fe)
            assert fe.client.get_config(0, 60)[WCE_OFFSET] == 1
            assert fe.client.get_features() >> 32 & 1  # VERSION_1
            assert fe.client.get_protocol_features()
            admin.stop(3)  # idempotent
            fe.kick(0, force=True)
            assert not call_pending(fe, 0.2)
            assert guest_ram(fe) == before
            assert vq_state(admin.parts_get(3)) == (taken, taken)
            admin.resume(3)
            assert call_pending(fe, 2.0)
            admin.resume(3)  # idempotent
            w.drain()
            assert used_idx(fe) == w.submitted
        w.verify()
    rig.wait_served(3, w.submitted)
    verify_image(rig.own, w)


@MEMBER3_WORKERS
def test_stop_before_the_kick_is_seen(rig: Rig, admin: AdminDriver) -> None:
    """Requests published before the stop whose kick the member handles after it are not
    taken: they run at resume, never twice."""
    admin.activate()
    with BlkFrontend(rig.member(3)) as fe:
        w = Workload(fe, seed=33)
        w.busy(1)
        base = used_idx(fe)
        admin.stop(3)
        tokens = w.submit(32, force=True)
        assert not w.reap(0.3)
        assert vq_state(admin.parts_get(3)) == (base, base)
        admin.resume(3)
        w.drain()
        assert set(tokens) <= w.done and used_idx(fe) == base + 32
    rig.wait_served(3, w.submitted)


# docs/admin-over-vhost-user.md section 6: DEV_PARTS_GET(ALL) of a one-queue member after
# 50 requests (queue size 128, rings at GPA 0x0 / 0x800 / 0x908, writeback).
DOC_PARTS_AFTER_50 = bytes.fromhex(
    "00010100000000000000000008000000 467e003005000000"
    "01010000000000000000000008000000 466e003001000000"
    "02010000120000000000000002000000 0100"
    "03010000000000000000000001000000 0f"
    "04010000000000000000000020000000 8000000001000000 0000000000000000"
    " 0008000000000000 0809000000000000"
    "05010000000000000000000008000000 0000000000000000"
    "f0050000000000000000000008000000 3200320000000000"
    "f1050000000000000000000001000000 01".replace(" ", ""))


@MEMBER3_WORKERS
def test_parts_match_the_documented_vector(rig: Rig, admin: AdminDriver) -> None:
    admin.activate()
    with BlkFrontend(rig.member(3)) as fe:
        vq = fe.queues[0].vq
        assert (vq.desc_gpa, vq.avail_gpa, vq.used_gpa) == (0, 0x800, 0x908)
        for k in range(50):
            fe.write(k * 8, bytes([k]) * 512)
        admin.stop(3)
        parts = admin.parts_get(3)
        assert len(parts) == 196
        assert parts == DOC_PARTS_AFTER_50
        admin.resume(3)


@MEMBER3_WORKERS
def test_config_change_while_stopped_waits_for_resume(rig: Rig, admin: AdminDriver) -> None:
    """A stopped member raises no configuration-change notification; it is latched and
    sent at resume (reference 6 item 4)."""
    admin.activate()
    with BlkFrontend(rig.member(3)) as fe:
        assert fe.backend_sock is not None
        w = Workload(fe, seed=34)
        w.busy(1)
        admin.stop(3)
        os.truncate(rig.own, DISK + 8 * MiB)
        rig.proc.signal(signal.SIGHUP)
        assert recv_backend_message(fe.backend_sock, 0.3) is None
        admin.resume(3)
        msg = recv_backend_message(fe.backend_sock, 2.0)
        assert msg is not None and msg[0] == BackendRequest.CONFIG_CHANGE_MSG
        fe.reread_config()
        assert fe.capacity == (DISK + 8 * MiB) // 512
        w.busy(1)
        w.verify()


def test_owner_with_its_own_disk(short_dir: Path, vhostd: Callable[..., Any],
                                 sparse_image: Callable[..., Path]) -> None:
    """With --blk-file the owner's disk queues come first and the admin queue is last."""
    m = short_dir / "m1.sock"
    vhostd(f"--blk-file={sparse_image(DISK, 'owner.img')}", "--num-queues=2", "--member",
           f"socket-path={m},blk-file={sparse_image(DISK, 'm.img')}", "--queue-workers=0",
           socket_path=short_dir / "o.sock")
    with AdminDriver(short_dir / "o.sock") as d:
        assert (d.queue_num, d.admin_index) == (3, 2)
        Linux(d).activate()
        assert d.member_count() == 1
        with BlkFrontend(m) as fe:
            w = Workload(fe, seed=35)
            w.busy(2)
            d.stop(1)
            assert vq_state(d.parts_get(1)) == (w.submitted, w.submitted)
            d.resume(1)
            w.busy(2)
            w.verify()


# ---- malformed admin commands --------------------------------------------------------


def _raw(d: AdminDriver, outs: list[tuple[int, int]], ins: list[tuple[int, int]],
         timeout: float = 2.0) -> int | None:
    """Put an arbitrary chain on the admin queue; its used length, or None if the owner
    stopped the queue (ring error)."""
    vq = d.vq
    head = vq.add(outs, ins)
    vq.publish()
    vq.kick(force=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for done, used in vq.reap():
            if done == head:
                return used
        r, _, _ = select.select([vq.call_fd, d.err_fd], [], [], 0.1)
        if d.err_fd in r:
            return None
        if vq.call_fd in r:
            try:
                os.eventfd_read(vq.call_fd)
            except BlockingIOError:
                pass
    raise TimeoutError("admin command neither completed nor broke the queue")


def test_malformed_admin_commands_do_not_disturb_members(rig: Rig) -> None:
    fe = BlkFrontend(rig.member(1))
    try:
        w = Workload(fe, seed=21)
        w.busy(1)
        rng = random.Random(21)
        d = AdminDriver(rig.owner)
        d.activate()
        cmd, res = d.cmd_gpa, d.res_gpa
        # garbage command bytes of every length, normal status and result room
        for n in (0, 1, 7, 23, 24, 25, 100, 4096, 60000):
            d.mem.write(cmd, rng.randbytes(n))
            w.submit(4)
            used = _raw(d, [(cmd, n)] if n else [], [(res, 8), (res + 8, 4096)])
            assert (used is not None and used >= 8) or n == 0
            w.drain()
        # real opcodes with garbage or huge data (no member is stopped by chance)
        for op in range(0x13):
            for group in (0, 1):
                members = [0, 4, 1 << 63] if op == MODE_SET else [0, 1, 2, 3, 4, 1 << 63]
                data = rng.randbytes(rng.choice([1, 9, 17, 40, 5000]))
                r = d.submit(op, group, rng.choice(members), data, rng.choice([0, 1, 8, 100]))
                assert r.status in (0, 6, 12, 16, 17, 22), r
        w.busy(1)
        d.close()  # the garbage may have blocked opcodes: start over (an owner reset)
        d = AdminDriver(rig.owner)
        d.activate()
        cmd, res = d.cmd_gpa, d.res_gpa
        # room for part of the status only: the command runs and what fits is written
        d.mem.fill(res, 8, 0xEE)
        d.mem.write(cmd, struct.pack("<HH12xQ", CAP_ID_LIST_QUERY, SELF, 0))
        assert _raw(d, [(cmd, 24)], [(res, 4)]) == 4
        assert d.mem.read(res, 8) == bytes(4) + b"\xee" * 4  # OK, OK; nothing past the room
        d.mem.write(cmd, struct.pack("<HH12xQ", 0x7777, SRIOV, 0))  # no such opcode
        assert _raw(d, [(cmd, 24)], [(res, 2)]) == 2
        assert d.mem.read(res, 2) == (22).to_bytes(2, "little")  # EINVAL
        # no writable part at all: nothing could report the outcome, so nothing runs
        d.mem.write(cmd, struct.pack("<HH12xQ", MODE_SET, SRIOV, 1) + b"\x01")
        assert _raw(d, [(cmd, 25)], []) == 0
        w.busy(1)  # and member 1 was not stopped
        # status and result cut into 1-byte pieces still land right
        d.mem.write(cmd, struct.pack("<HH12xQ", CAP_ID_LIST_QUERY, SELF, 0))
        d.mem.fill(res, 32, 0xEE)
        used = _raw(d, [(cmd, 24)], [(res + i, 1) for i in range(16)])
        assert used == 16
        assert d.mem.read(res, 16) == bytes(8) + (1).to_bytes(8, "little")
        d.close()
        # chains that break the ring rules stop the admin queue, not the daemon
        breakers: list[Callable[[AdminDriver], tuple[list[tuple[int, int]],
                                                     list[tuple[int, int]]]]] = [
            lambda d: ([(d.cmd_gpa, 0xFFFFFFFF)], [(d.res_gpa, 8)]),  # huge length
            lambda d: ([(1 << 50, 24)], [(d.res_gpa, 8)]),  # outside guest memory
            lambda d: ([(d.cmd_gpa, 24)], [(d.res_gpa, 8), (d.res_gpa + 64, 1 << 31)]),
        ]
        for make in breakers:
            with AdminDriver(rig.owner) as d:
                d.activate()
                d.mem.write(d.cmd_gpa, struct.pack("<HH12xQ", LIST_QUERY, SRIOV, 0))
                outs, ins = make(d)
                w.submit(4)
                assert _raw(d, outs, ins) is None
                w.drain()
        # the owner still works for the next admin driver, and member 1 never noticed
        with AdminDriver(rig.owner) as d:
            d.activate()
            assert d.member_count() == 3
            w.submit(6)
            d.stop(1)
            d.resume(1)
            w.drain()
        w.busy(2)
        w.verify()
    finally:
        fe.close()
    rig.wait_served(1, w.submitted)
    assert "queue stopped" in rig.proc.log  # the owner logged the broken admin rings


# ---- the vhostd-admin CLI ------------------------------------------------------------


def cli(rig: Rig, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vhostd.tools.admin_cli",
                           f"--socket-path={rig.owner}", *args],
                          capture_output=True, text=True, timeout=30)


@MEMBER2_WORKERS
def test_cli_round_trip(rig: Rig, short_dir: Path) -> None:
    f = short_dir / "parts.bin"
    r = cli(rig, "members")
    assert (r.returncode, r.stdout.strip()) == (0, "3 member(s): 1, 2, 3"), r
    r = cli(rig, "caps")
    assert r.returncode == 0 and "device-parts objects limit 32" in r.stdout, r
    assert "admin queue index 0" in r.stdout
    fe = BlkFrontend(rig.member(1))
    try:
        w = Workload(fe, seed=40)
        w.busy(3)
        fe.client.set_config(WCE_OFFSET, b"\x00")
        assert cli(rig, "stop", "1").stdout.strip() == "member 1: stop done"
        r = cli(rig, "parts-get", "1", "-o", str(f))
        assert r.returncode == 0 and f"written to {f}" in r.stdout, r
        raw = f.read_bytes()
        assert vq_state(raw) == (w.submitted, w.submitted)
        r = subprocess.run([sys.executable, "-m", "vhostd.tools.admin_cli", "parts-show",
                            str(f)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r
        lines = r.stdout.splitlines()
        assert len(lines) == len(parse_parts(raw)) == 8
        n = w.submitted
        assert lines[0].startswith("VIRTIO_DEV_PART_DEV_FEATURES optional [8 bytes] 0x")
        assert lines[1].startswith("VIRTIO_DEV_PART_DRV_FEATURES [8 bytes] 0x")
        assert "32" in lines[1].split("bits", 1)[1]  # VERSION_1 acked
        assert lines[2] == "VIRTIO_DEV_PART_PCI_COMMON_CFG [2 bytes] offset 18: 1"
        assert lines[3] == ("VIRTIO_DEV_PART_DEVICE_STATUS [1 bytes] 0x0f "
                            "(ACKNOWLEDGE|DRIVER|DRIVER_OK|FEATURES_OK)")
        vq = fe.queues[0].vq
        assert lines[4] == (f"VIRTIO_DEV_PART_VQ_CFG [32 bytes] vq 0: size 128 enabled 1 "
                            f"vector 0 desc {vq.desc_gpa:#x} driver {vq.avail_gpa:#x} "
                            f"device {vq.used_gpa:#x}")
        assert lines[5] == ("VIRTIO_DEV_PART_VQ_NOTIFY_CFG [8 bytes] vq 0: notify_off 0 "
                            "notif_config_data 0")
        assert lines[6] == f"VHOSTD_DEV_PART_VQ_STATE [8 bytes] vq 0: next avail {n} used {n}"
        assert lines[7] == "VHOSTD_BLK_PART_WCE [1 bytes] writethrough"
        # member 2 runs: refused, with command, status and qualifier named
        r = cli(rig, "parts-set", "2", "-i", str(f))
        assert r.returncode == 1 and r.stdout == ""
        assert r.stderr.strip() == ("vhostd-admin: VIRTIO_ADMIN_CMD_DEV_PARTS_SET failed: "
                                    "VIRTIO_ADMIN_STATUS_EBUSY "
                                    "(VIRTIO_ADMIN_STATUS_Q_INVALID_COMMAND)")
        assert cli(rig, "stop", "2").returncode == 0
        old = fe.attach(rig.member(2))
        late = w.submit(3, force=True)
        r = cli(rig, "parts-set", "2", "-i", str(f))
        assert r.returncode == 0 and "applied at resume" in r.stdout, r
        assert not w.reap(0.1)
        r = cli(rig, "resume", "2")
        assert (r.returncode, r.stdout.strip()) == (0, "member 2: resume done")
        w.drain()
        assert set(late) <= w.done
        assert fe.client.get_config(0, 60)[WCE_OFFSET] == 0
        old.close()
        w.busy(2)
        # and back with one command
        old = fe.attach(rig.member(1))
        r = cli(rig, "move", "2", "1")
        assert r.returncode == 0, r
        assert r.stdout.strip().endswith("member 1 is running, member 2 stopped")
        old.close()
        w.busy(2)
        w.verify()
    finally:
        fe.close()
    # errors: command, status and qualifier named, exit code 1
    r = cli(rig, "stop", "9")
    assert r.returncode == 1
    assert r.stderr.strip() == ("vhostd-admin: VIRTIO_ADMIN_CMD_DEV_MODE_SET failed: "
                                "VIRTIO_ADMIN_STATUS_EINVAL "
                                "(VIRTIO_ADMIN_STATUS_Q_INVALID_MEMBER)")
    r = cli(rig, "parts-get", "0", "-o", str(f))
    assert r.returncode == 1 and "Q_INVALID_MEMBER" in r.stderr
    f.write_bytes(f.read_bytes() + b"\x01\x02")  # stray bytes
    r = subprocess.run([sys.executable, "-m", "vhostd.tools.admin_cli", "parts-show", str(f)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and r.stderr.startswith("vhostd-admin: ") and \
        "Traceback" not in r.stderr


def test_cli_parts_set_with_an_oversized_file_fails_cleanly(rig: Rig, short_dir: Path) -> None:
    f = short_dir / "big.bin"
    f.write_bytes(bytes(70000))
    assert cli(rig, "stop", "2").returncode == 0
    r = cli(rig, "parts-set", "2", "-i", str(f))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("vhostd-admin: ")
