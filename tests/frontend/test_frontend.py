"""The test front end (vhostd.frontend) against both back ends over a real unix socket:
qemu-storage-daemon (qsd, QEMU's own C back end on libvhost-user) and vhostd.

Passing against qsd validates the front end, so a failure against vhostd points at vhostd.
Tests named ``test_qsd_quirk_*`` pin down where qsd 7.2 departs from what QEMU expects
or the virtio spec says; they run against qsd only, and the test next to each asserts the
correct behaviour for vhostd.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest
from frontend_support import DISK_SIZE, SECTOR, Backend, MiB, drain, rand

from vhostd.frontend.blk import BlkError, BlkFrontend
from vhostd.frontend.client import VhostUserClient, VhostUserProtocolError
from vhostd.frontend.memory import PAGE_SIZE, GuestMemory, RegionSpec
from vhostd.frontend.virtqueue import vring_need_event
from vhostd_proto.inflight import inflight_queue_stride
from vhostd_proto.vhost_user import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    Config,
    Inflight,
    ProtocolFeature,
    Request,
    VringState,
)
from vhostd_proto.virtio import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, Feature
from vhostd_proto.virtio_blk import BlkFeature, BlkRequestType

QSD_ONLY = pytest.mark.parametrize("backend", ["qsd"], indirect=True)
# Both vhostd set-ups of conftest.py (no queue worker, one serving queue 1); kind "vhostd".
VHOSTD_ONLY = pytest.mark.parametrize("backend", ["vhostd", "vhostd-workers"], indirect=True)

Frontend = Callable[..., BlkFrontend]


# -- negotiation -------------------------------------------------------------------------


def test_realize_and_start_negotiation(frontend: Frontend, backend: Backend) -> None:
    fe = frontend()
    offered = fe.offered_features
    assert offered >> VHOST_USER_F_PROTOCOL_FEATURES & 1
    assert offered >> Feature.VIRTIO_F_VERSION_1 & 1
    assert fe.has_protocol(ProtocolFeature.CONFIG)
    assert fe.has_protocol(ProtocolFeature.MQ) and fe.queue_num is not None
    assert fe.queue_num >= 2
    # Acked = what a driver would take of the offer; never un-offered bits.
    assert fe.features & ~offered == 0
    assert fe.has_feature(Feature.VIRTIO_F_VERSION_1)
    assert fe.has_feature(BlkFeature.VIRTIO_BLK_F_MQ)
    assert not fe.has_feature(26)  # VHOST_F_LOG_ALL: only while migrating
    cfg = fe.parsed_config()
    assert len(fe.config) == 57
    assert fe.capacity == DISK_SIZE // SECTOR == cfg.capacity
    assert cfg.num_queues == 2
    if fe.has_protocol(ProtocolFeature.BACKEND_REQ):
        assert fe.backend_sock is not None
    if backend.kind == "vhostd":
        # docs/architecture.md: inflight tracking is what makes a back-end restart safe.
        assert fe.has_protocol(ProtocolFeature.INFLIGHT_SHMFD)
        assert fe.inflight_fd is not None and fe.inflight_size > 0
        assert not fe.has_protocol(ProtocolFeature.STATUS)


def test_ack_options_drop_event_idx_and_indirect(frontend: Frontend) -> None:
    fe = frontend(event_idx=False, indirect=False, num_queues=1)
    assert not fe.has_feature(Feature.VIRTIO_RING_F_EVENT_IDX)
    assert not fe.has_feature(Feature.VIRTIO_RING_F_INDIRECT_DESC)
    assert not fe.has_feature(BlkFeature.VIRTIO_BLK_F_MQ)
    data = rand(4096)
    fe.write(3, data)
    assert fe.read(3, 4096) == data


@QSD_ONLY
def test_qsd_quirk_echoes_need_reply_in_flags(backend: Backend) -> None:
    # qsd quirk: libvhost-user echoes NEED_REPLY in the reply to a GET_* request that had it
    # set (flags 0xd); QEMU never sets NEED_REPLY there, and would reject such a reply.
    with VhostUserClient(backend.sock) as c:
        c.request(Request.GET_FEATURES, need_reply=True)
        with pytest.raises(VhostUserProtocolError, match="flags 0xd"):
            c.recv_reply(Request.GET_FEATURES)


@VHOSTD_ONLY
def test_every_reply_has_flags_exactly_0x5(backend: Backend) -> None:
    # NEED_REPLY on every request: body replies must still carry 0x5 (recv_reply checks the
    # flags, the id and the size), acks too.
    with VhostUserClient(backend.sock) as c:

        def ask(req: Request, payload: bytes = b"", size: int | None = None) -> bytes:
            c.request(req, payload, need_reply=True)
            reply, fds = c.recv_reply(req, size)
            for fd in fds:
                os.close(fd)
            return reply

        ask(Request.GET_FEATURES, size=8)
        protocol = int.from_bytes(ask(Request.GET_PROTOCOL_FEATURES, size=8), "little")
        c.set_protocol_features(protocol)
        ask(Request.SET_OWNER, size=8)  # an ack: REPLY_ACK is negotiated now
        ask(Request.GET_QUEUE_NUM, size=8)
        ask(Request.GET_MAX_MEM_SLOTS, size=8)
        cfg = Config.build({"offset": 0, "size": 57, "flags": 0, "region": bytes(57)})
        ask(Request.GET_CONFIG, cfg, size=len(cfg))
        ask(Request.GET_VRING_BASE, VringState.build({"index": 1, "num": 0}), size=8)
        inflight = Inflight.build({"mmap_size": 0, "mmap_offset": 0, "num_queues": 2,
                                   "queue_size": 128})
        ask(Request.GET_INFLIGHT_FD, inflight, size=len(inflight))
        ask(Request.SET_FEATURES, (1 << Feature.VIRTIO_F_VERSION_1).to_bytes(8, "little"),
            size=8)
        # Without NEED_REPLY nothing comes back: the next reply belongs to the next request.
        c.request(Request.SET_VRING_NUM, VringState.build({"index": 0, "num": 64}))
        assert c.get_queue_num() == 2


def test_client_inflight_fd_helpers(backend: Backend) -> None:
    # Checks the helpers' framing (24-byte payload both ways, fd with the reply). qsd does
    # not offer INFLIGHT_SHMFD (pinned below) but libvhost-user answers anyway.
    with VhostUserClient(backend.sock) as c:
        c.set_protocol_features(c.get_protocol_features())
        c.set_owner()
        size, offset, fd = c.get_inflight_fd(2, 128)
        assert fd is not None and size > 0 and offset == 0
        assert os.fstat(fd).st_size >= size
        if backend.kind == "vhostd":
            # Split layout of proto/inflight.py, zeroed: "version 0" means fresh.
            assert size == 2 * inflight_queue_stride(128)
            assert os.pread(fd, size, 0) == bytes(size)
        c.set_inflight_fd(fd, size, offset, 2, 128)
        os.close(fd)
        assert c.get_queue_num() == 2  # still in step after SET_INFLIGHT_FD


@QSD_ONLY
def test_qsd_quirk_inflight_not_offered(backend: Backend) -> None:
    # qsd quirk: its export does not offer INFLIGHT_SHMFD, so a back-end restart can lose
    # or repeat requests. vhostd offers it (asserted in test_realize_and_start_negotiation).
    with VhostUserClient(backend.sock) as c:
        assert not c.get_protocol_features() >> ProtocolFeature.INFLIGHT_SHMFD & 1


# -- I/O ---------------------------------------------------------------------------------


def test_write_read_several_sectors(frontend: Frontend, backend: Backend) -> None:
    fe = frontend()
    last = fe.capacity - 8
    written = {}
    for sector in (0, 8, 17, 1000, last):
        data = rand(4096)
        fe.write(sector, data)
        written[sector] = data
    for sector, data in written.items():
        assert fe.read(sector, 4096) == data
    fe.flush()
    for sector, data in written.items():
        assert backend.image_bytes(sector, 4096) == data


def test_two_queues_batched(frontend: Frontend) -> None:
    fe = frontend()
    expect = {}
    tokens: dict[int, dict[int, int]] = {0: {}, 1: {}}
    for k in range(16):
        q = k % 2
        data = rand(8192)
        expect[k * 16] = data
        tokens[q][fe.submit_write(q, k * 16, data)] = k
    got = drain(fe, (0, 1))
    assert sorted(got) == sorted(t for q in (0, 1) for t in tokens[q])
    assert all(st == 0 and d is None for st, d in got.values())
    reads = {fe.submit_read(k % 2, k * 16, 8192): k * 16 for k in range(16)}
    got = drain(fe, (0, 1))
    assert {reads[t]: d for t, (st, d) in got.items()} == expect
    assert all(st == 0 for st, _ in got.values())


@pytest.mark.parametrize("use_indirect", [False, True])
@pytest.mark.parametrize("seg_size,merge", [(None, False), (None, True), (PAGE_SIZE, False),
                                            (PAGE_SIZE, True), (512, False)])
def test_descriptor_layouts(frontend: Frontend, use_indirect: bool,
                            seg_size: int | None, merge: bool) -> None:
    fe = frontend(use_indirect=use_indirect, seg_size=seg_size, merge=merge)
    assert fe.has_feature(Feature.VIRTIO_RING_F_INDIRECT_DESC)
    for q, sector in ((0, 40), (1, 300)):
        data = rand(32 * 1024)  # 64 descriptors of 512 bytes: within seg_max (126 for both)
        fe.write(sector, data, q=q)
        token = fe.submit_read(q, sector, len(data))
        fe.kick(q)
        _, status, got, used_len = fe.wait(q, token)
        assert status == 0 and got == data
        # Used length counts every byte the device wrote: data plus the status byte.
        assert used_len == len(data) + 1


def test_mixed_direct_and_indirect_in_flight(frontend: Frontend) -> None:
    fe = frontend()
    data = [rand(4096) for _ in range(8)]
    toks = [fe.submit_write(0, 8 * i, d, use_indirect=bool(i % 2), seg_size=1024)
            for i, d in enumerate(data)]
    fe.kick(0)
    for t in toks:
        assert fe.wait(0, t)[1] == 0
    for i, d in enumerate(data):
        assert fe.read(8 * i, 4096, use_indirect=not i % 2) == d


def _two_regions() -> GuestMemory:
    # Second region: non-zero mmap_offset, GPA-contiguous with the first.
    return GuestMemory([RegionSpec(0, 32 * MiB), RegionSpec(32 * MiB, 4 * MiB, 64 * 1024)])


@pytest.mark.parametrize("mem_slots", [True, False])
def test_two_regions_straddling_buffer(frontend: Frontend, mem_slots: bool) -> None:
    mem = _two_regions()
    mask = None if mem_slots else ~(1 << ProtocolFeature.CONFIGURE_MEM_SLOTS)
    fe = frontend(memory=mem, protocol_features=mask)
    assert fe.has_protocol(ProtocolFeature.CONFIGURE_MEM_SLOTS) == mem_slots
    buf = mem.alloc_straddling(16 * 1024, before=5000)
    assert mem.region_at(buf) is mem.regions[0]
    assert mem.region_at(buf + 16 * 1024 - 1) is mem.regions[1]
    data = rand(16 * 1024)
    fe.write(64, data, buf=buf)
    assert fe.read(64, len(data)) == data
    mem.fill(buf, len(data), 0)
    assert fe.read(64, len(data), buf=buf, q=1) == data
    assert mem.read(buf, len(data)) == data
    # Direct chain where one descriptor of several crosses the boundary.
    fe.write(200, data, buf=buf, seg_size=3000)
    assert fe.read(200, len(data), buf=buf, seg_size=4096) == data
    # Indirect: descriptors split exactly at the boundary (1000 divides 5000), which qsd
    # handles; a crossing descriptor in an indirect table is the next two tests.
    fe.write(300, data, buf=buf, seg_size=1000, use_indirect=True)
    assert fe.read(300, len(data), buf=buf, seg_size=1000, use_indirect=True) == data
    fe.close()
    mem.close()


@QSD_ONLY
def test_qsd_quirk_indirect_descriptor_straddling_regions(frontend: Frontend,
                                                          backend: Backend) -> None:
    # qsd quirk: a descriptor in an indirect table that crosses a region boundary makes
    # libvhost-user panic "Looped descriptor" (it compares the number of iovecs, not of
    # descriptors, with the table length); the request never completes.
    mem = _two_regions()
    fe = frontend(memory=mem)
    buf = mem.alloc_straddling(16 * 1024, before=5000)
    token = fe.submit_write(0, 300, rand(16 * 1024), buf=buf, use_indirect=True)
    fe.kick(0)
    with pytest.raises(TimeoutError):
        fe.wait(0, token, timeout=0.3)
    assert "Looped descriptor" in backend.log
    fe.close()
    mem.close()


@VHOSTD_ONLY
def test_indirect_descriptor_straddling_regions(frontend: Frontend) -> None:
    mem = _two_regions()
    fe = frontend(memory=mem)
    buf = mem.alloc_straddling(16 * 1024, before=5000)
    data = rand(16 * 1024)
    # One data descriptor crossing the boundary, then several, inside an indirect table.
    fe.write(300, data, buf=buf, use_indirect=True)
    assert fe.read(300, len(data), q=1) == data
    mem.fill(buf, len(data), 0)
    assert fe.read(300, len(data), buf=buf, seg_size=3000, use_indirect=True) == data
    assert mem.read(buf, len(data)) == data
    fe.close()
    mem.close()


def test_flush_and_get_id(frontend: Frontend, backend: Backend) -> None:
    fe = frontend()
    assert fe.has_feature(BlkFeature.VIRTIO_BLK_F_FLUSH)
    fe.write(10, rand(512))
    fe.flush()
    fe.flush(q=1, use_indirect=True)
    assert fe.get_id() == backend.device_id
    token = fe.submit_get_id(1)
    fe.kick(1)
    _, status, data, used_len = fe.wait(1, token)
    assert status == 0 and data is not None and data.startswith(backend.device_id + b"\0")
    assert used_len == 21  # the whole 20-byte ID buffer plus the status byte


def _get_id_used_len(fe: BlkFrontend, in_len: int) -> int:
    token = fe.submit(0, BlkRequestType.VIRTIO_BLK_T_GET_ID, in_len=in_len)
    fe.kick(0)
    _, status, _, used_len = fe.wait(0, token)
    assert status == 0
    return used_len


@QSD_ONLY
def test_qsd_quirk_get_id_used_len_is_buffer_size(frontend: Frontend) -> None:
    # qsd quirk: the used length of GET_ID is the buffer size + 1, not the bytes written.
    assert _get_id_used_len(frontend(), 512) == 513


@VHOSTD_ONLY
def test_get_id_used_len_is_bytes_written(frontend: Frontend) -> None:
    fe = frontend()
    # The ID is at most 20 bytes: a larger buffer gets 20 bytes, a smaller one is filled.
    assert _get_id_used_len(fe, 512) == 20 + 1
    assert _get_id_used_len(fe, 8) == 8 + 1


def test_write_zeroes_and_discard(frontend: Frontend) -> None:
    fe = frontend()
    if not fe.has_feature(BlkFeature.VIRTIO_BLK_F_WRITE_ZEROES):
        pytest.skip("back end does not offer WRITE_ZEROES")
    fe.write(100, rand(8 * SECTOR))
    fe.write_zeroes([(101, 2)])
    got = fe.read(100, 8 * SECTOR)
    assert got[SECTOR:3 * SECTOR] == bytes(2 * SECTOR) and got[:SECTOR] != bytes(SECTOR)
    fe.write_zeroes([(104, 4)], unmap=True)
    assert fe.read(104, 4 * SECTOR) == bytes(4 * SECTOR)
    if fe.has_feature(BlkFeature.VIRTIO_BLK_F_DISCARD):
        fe.discard([(2048, 8)])


def test_unsupported_request_type(frontend: Frontend) -> None:
    fe = frontend()
    token = fe.submit(0, BlkRequestType.VIRTIO_BLK_T_GET_LIFETIME, in_len=8)
    fe.kick(0)
    assert fe.wait(0, token)[1] == 2  # VIRTIO_BLK_S_UNSUPP
    with pytest.raises(BlkError):
        fe._sync("read past end", 0, fe.submit_read(0, fe.capacity, 512))


# -- ring lifecycle ----------------------------------------------------------------------


def test_stop_and_restart_with_base(frontend: Frontend) -> None:
    fe = frontend()
    for i in range(5):
        fe.write(i * 8, rand(4096))
    fe.flush(q=1)
    bases = fe.stop()
    assert bases == [5, 1]
    assert [q.vq.avail_idx for q in fe.queues] == bases
    # GET_VRING_BASE must not reset anything: a second stop returns the same.
    assert fe.stop() == bases
    fe.start(bases)
    data = rand(4096)
    fe.write(77, data, q=1)
    assert fe.read(77, 4096) == data
    assert fe.stop() == [6, 2]
    fe.start()
    assert fe.read(77, 4096, q=1) == data


def test_event_idx_avail_event_and_used_event(frontend: Frontend) -> None:
    fe = frontend()
    assert fe.has_feature(Feature.VIRTIO_RING_F_EVENT_IDX)
    vq = fe.queues[0].vq
    for i in range(3):
        fe.write(i, rand(512))
    # The device asks to be kicked for the next avail entry it has not seen yet.
    assert vq.avail_event() == vq.avail_idx == 3
    assert vring_need_event(vq.avail_event(), 4, 3)
    assert not vring_need_event(vq.avail_event(), 3, 2)


def test_raw_descriptors(frontend: Frontend) -> None:
    # Hand-built chain through the raw API: header, 2 data descriptors, status.
    fe = frontend(num_queues=1)
    mem = fe.mem
    vq = fe.queues[0].vq
    hdr = mem.alloc(16, 16)
    data = mem.alloc(1024, 512)
    status = mem.alloc(1, 1)
    payload = rand(1024)
    mem.write(hdr, (1).to_bytes(4, "little") + bytes(4) + (50).to_bytes(8, "little"))
    mem.write(data, payload)
    mem.write(status, b"\xff")
    base = vq.free_head  # descriptors the free list does not hand out in this test
    vq.raw_write_desc(base, hdr, 16, VIRTQ_DESC_F_NEXT, base + 1)
    vq.raw_write_desc(base + 1, data, 512, VIRTQ_DESC_F_NEXT, base + 2)
    vq.raw_write_desc(base + 2, data + 512, 512, VIRTQ_DESC_F_NEXT, base + 3)
    vq.raw_write_desc(base + 3, status, 1, VIRTQ_DESC_F_WRITE, 0)
    before = vq.used_idx()
    vq.raw_put_avail(base)
    vq.raw_kick()
    deadline = time.monotonic() + 2
    while vq.used_idx() == before and time.monotonic() < deadline:
        vq.wait_call(0.1)
    assert vq.used_idx() == (before + 1) & 0xFFFF
    assert vq.raw_read_used(before) == (base, 1)
    assert mem.read(status, 1) == b"\0"
    # Keep the driver shadow consistent for the normal API; with EVENT_IDX the device only
    # signals once used_event says so.
    vq.last_used_idx = vq.used_idx()
    vq.raw_set_used_event(vq.last_used_idx)
    t0 = time.monotonic()
    assert fe.read(50, 1024) == payload
    assert time.monotonic() - t0 < 1


def test_memory_helpers_straddle() -> None:
    with GuestMemory([RegionSpec(0, 2 * MiB), RegionSpec(2 * MiB, MiB, 2 * PAGE_SIZE),
                      RegionSpec(8 * MiB, MiB)]) as mem:
        buf = mem.alloc_straddling(3000, before=1000)
        assert buf == 2 * MiB - 1000
        blob = rand(3000)
        mem.write(buf, blob)
        assert mem.read(buf, 3000) == blob
        assert bytes(mem.regions[1].mm[2 * PAGE_SIZE:2 * PAGE_SIZE + 2000]) == blob[1000:]
        assert mem.gpa_to_qva(2 * MiB + 5) == mem.regions[1].qva + 5
        with pytest.raises(MemoryError):
            mem.alloc_straddling(3000, before=1000)
        with pytest.raises(ValueError):
            mem.view(buf, 3000)
        with pytest.raises(ValueError):
            mem.read(3 * MiB, 1)
