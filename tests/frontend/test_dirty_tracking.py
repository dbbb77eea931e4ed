"""Device-side dirty page tracking through the owner, without QEMU.

The test front end plays a guest whose member is driven directly, with nothing
trapping its data path. The "hypervisor" (this test) copies the guest's memory to a
second front end: a full first pass, then rounds that copy only pages the owner's
report names plus the pages the guest's CPU wrote (in a real hypervisor the vCPU
dirty log; here the driver's ring and request-slot areas, which it rewrites every
round), then a final stop-and-copy. Read buffers live in an area only the device
writes, so the device report alone must name them. Member 1's parts then go to
member 2 and the guest carries on there, every byte verified.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from vhostd.frontend.admin import AdminCommandError, AdminDriver
from vhostd.frontend.blk import BlkFrontend
from vhostd.frontend.memory import PAGE_SIZE, GuestMemory, RegionSpec
from vhostd_proto.virtio_admin import AdminStatus

MiB = 1 << 20
SECTORS = 4096  # the part of the disk the guest uses (2 MiB)
READ_AREA_GPA = 0x1000000  # region 2: read buffers only the device writes
READ_AREA = 2 * MiB



def pages_of(gpa: int, length: int) -> set[int]:
    first = gpa // PAGE_SIZE
    last = (gpa + length - 1) // PAGE_SIZE
    return {p * PAGE_SIZE for p in range(first, last + 1)}


def copy_pages(src: GuestMemory, dst: GuestMemory, pages: set[int]) -> None:
    for page in pages:
        dst.write(page, src.read(page, PAGE_SIZE))


def differing_pages(a: GuestMemory, b: GuestMemory) -> set[int]:
    out = set()
    for r in a.regions:
        for off in range(0, r.size, PAGE_SIZE):
            if a.read(r.gpa + off, PAGE_SIZE) != b.read(r.gpa + off, PAGE_SIZE):
                out.add(r.gpa + off)
    return out


class Guest:
    """The guest's view of its disk: what it wrote, to check every read."""

    def __init__(self, fe: BlkFrontend, rng: random.Random) -> None:
        self.fe = fe
        self.rng = rng
        self.disk: dict[int, bytes] = {}
        self.read_slot = 0

    def round(self, n: int = 40) -> set[int]:
        """Writes and reads; return the read-buffer pages the device filled."""
        filled: set[int] = set()
        for _ in range(n):
            sector = self.rng.randrange(0, SECTORS, 8)
            if self.rng.random() < 0.5 or sector not in self.disk:
                data = self.rng.randbytes(4096)
                self.fe.write(sector, data)
                self.disk[sector] = data
            else:
                # Reads land in the device-only area, at varying offsets (some cross
                # a page boundary).
                gpa = READ_AREA_GPA + (self.read_slot * 4096 + self.rng.randrange(0, 512))
                self.read_slot = (self.read_slot + 1) % (READ_AREA // 4096 - 1)
                token = self.fe.submit_read(0, sector, 4096, buf=gpa)
                _tok, status, data, _len = self.fe.wait(0, token)
                assert status == 0 and data == self.disk[sector]
                filled |= pages_of(gpa, 4096)
        return filled

    def verify_all(self) -> None:
        for sector, data in self.disk.items():
            assert self.fe.read(sector, 4096) == data, f"sector {sector}"


def cpu_pages(fe: BlkFrontend) -> set[int]:
    """Pages the guest's CPU writes: its rings, indirect tables and request slots."""
    pages: set[int] = set()
    for q in fe.queues:
        vq = q.vq
        pages |= pages_of(vq.desc_gpa, 16 * vq.size)
        pages |= pages_of(vq.avail_gpa, 6 + 2 * vq.size)
        if vq.indirect_gpa:
            pages |= pages_of(vq.indirect_gpa, 16 * vq.indirect_max * vq.size)
        pages |= pages_of(q.slot_gpa, fe._slot_size * fe.queue_size)
    return pages


# With one queue worker the members' queues are dealt to [main process, worker1]: member 1
# is served in the main process, member 2 in the worker. The guest starts on the member
# named first, which is tracked and then moved to the other: with a worker, the tracked
# member runs in the worker and its marks reach the report through recall and merge.
@pytest.mark.parametrize("queue_workers,src,dst", [(0, 1, 2), (1, 2, 1)],
                         ids=["workers0", "workers1-tracked-member-in-worker"])
def test_device_side_tracking_moves_a_directly_driven_guest(vhostd, short_dir: Path,
                                                            queue_workers: int, src: int,
                                                            dst: int) -> None:
    image = short_dir / "disk.img"
    with open(image, "wb") as f:
        f.truncate(16 * MiB)
    d = vhostd(f"--member=socket-path={short_dir}/m1.sock,blk-file={image}",
               f"--member=socket-path={short_dir}/m2.sock,blk-file={image}",
               f"--queue-workers={queue_workers}", socket_path=short_dir / "owner.sock")
    if queue_workers:
        assert "1 queue worker(s) (pids " in d.log and "serve 1 of 2 request queues" in d.log
    m1 = GuestMemory([RegionSpec(0, 16 * MiB), RegionSpec(READ_AREA_GPA, READ_AREA)])
    fe = BlkFrontend(short_dir / f"m{src}.sock", memory=m1, max_io=8192)
    guest = Guest(fe, random.Random(7))
    guest.round()
    admin = AdminDriver(short_dir / "owner.sock")
    admin.activate(vendor=True)
    ranges = [(r.gpa, r.size) for r in m1.regions]
    used_ring = pages_of(fe.queues[0].vq.used_gpa, 6 + 8 * fe.queue_size)

    # Pre-copy: one full pass while tracking, then rounds of reported pages only.
    admin.track_start(src, ranges)
    m2 = m1.clone_layout()
    copy_pages(m1, m2, {r.gpa + off for r in m1.regions for off in range(0, r.size, PAGE_SIZE)})
    for _ in range(3):
        # m2 is the shadow copy: it equals m1 as of the last copy.
        filled = guest.round()
        reported = admin.track_report(src, ranges)
        cpu = cpu_pages(fe)
        changed = differing_pages(m1, m2)
        # Every page the member wrote is in the report: the read buffers it filled, the
        # used ring, and whatever else changed that the CPU did not write.
        assert filled <= reported
        assert used_ring <= reported
        assert changed - cpu <= reported
        # The report names nothing outside guest memory or in the untouched area.
        assert all(any(g <= p < g + n for g, n in ranges) for p in reported)
        copy_pages(m1, m2, reported | cpu)
        assert differing_pages(m1, m2) == set()

    # Stop-and-copy: stop member 1 (every taken request completes), last report.
    guest.round(10)
    admin.stop(src)
    final = admin.track_report(src, ranges)
    copy_pages(m1, m2, final | cpu_pages(fe))
    assert differing_pages(m1, m2) == set(), "pages changed that neither log named"
    admin.track_stop(src)
    with pytest.raises(AdminCommandError) as e:
        admin.track_report(src, ranges)
    assert e.value.status == AdminStatus.VIRTIO_ADMIN_STATUS_EINVAL

    # Member 1's state goes to member 2; the guest continues there on the copy.
    fe.rebind_memory(m2)
    old = fe.attach(short_dir / f"m{dst}.sock")
    parts = admin.move(src, dst)
    old.close()
    assert parts
    guest.verify_all()
    guest.round()
    guest.verify_all()
    fe.close()
    admin.close()
    m1.close()
    m2.close()
    d.stop()
    served = {m: int(n) for m, n in re.findall(r"(member\d): requests served per queue: "
                                                 r"vq0=(\d+)", d.log)}
    assert served["member1"] > 0 and served["member2"] > 0
    assert "write tracking stopped" in d.log
    if queue_workers:
        assert "worker worker1 failed" not in d.log  # it served member 2 throughout


def test_tracking_commands_validate_their_input(vhostd, short_dir: Path) -> None:
    image = short_dir / "disk.img"
    with open(image, "wb") as f:
        f.truncate(MiB)
    vhostd(f"--member=socket-path={short_dir}/m1.sock,blk-file={image}",
           "--queue-workers=0", socket_path=short_dir / "owner.sock")
    with AdminDriver(short_dir / "owner.sock") as admin:
        admin.activate(vendor=True)
        for ranges, page in (([(0, MiB)], 1000), ([(0, MiB)], 2048), ([], 4096),
                             ([(0, 0)], 4096), ([((1 << 64) - 4096, 8192)], 4096)):
            with pytest.raises(AdminCommandError, match=r"EINVAL.*INVALID_FIELD"):
                admin.track_start(1, ranges, page)  # type: ignore[arg-type]
        admin.track_start(1, [(0, MiB)])
        with pytest.raises(AdminCommandError, match="EBUSY"):
            admin.track_start(1, [(0, MiB)])
        # A result buffer too small for the bitmap: ENOMEM, nothing cleared.
        r = admin.submit(0x31, 1, 1, bytes(8), result_size=8)
        assert r.status == AdminStatus.VIRTIO_ADMIN_STATUS_ENOMEM
        assert admin.track_report(1, [(0, MiB)]) == set()
        admin.track_stop(1)
        admin.track_stop(1)  # idempotent
    # Without vendor=True in LIST_USE (as Linux does it), the commands are not enabled.
    with AdminDriver(short_dir / "owner.sock") as admin:
        admin.activate()
        with pytest.raises(AdminCommandError, match="INVALID_OPCODE"):
            admin.track_start(1, [(0, MiB)])
