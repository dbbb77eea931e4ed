"""The sans-I/O protocol core: QEMU 7.2's message order, replies, framing, and every
way a front end can break the protocol (reference sections 1, 2, 3 and 6.1)."""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import pytest
from unit_support import (
    FEATURES,
    FLAGS,
    NEED_REPLY,
    NUM_QUEUES,
    config_payload,
    feed,
    feed_one,
    frame,
    inflight_payload,
    log_base,
    make_info,
    mem_table,
    negotiate,
    plain,
    reply_fields,
    single_region,
    state,
    u64,
    vring_addr,
    vring_fd,
)

from vhostd.core.protocol import (
    RING_TRANSITIONS,
    RULES,
    BackendProtocol,
    DeviceInfo,
    Message,
    ProtocolError,
    RingPhase,
)
from vhostd.vhost_user.handler import PROTOCOL_FEATURES
from vhostd_proto.vhost_user import VHOST_USER_MAX_PAYLOAD
from vhostd_proto.vhost_user import ProtocolFeature as PF
from vhostd_proto.vhost_user import Request as R

REGION0 = (0, 0x8000_0000, 0x7F12_0000_0000, 0)
REGION1 = (0x1_0000_0000, 0x4000_0000, 0x7F12_8000_0000, 0x8000_0000)


def offered_bits() -> set[PF]:
    return {f for f in PF if PROTOCOL_FEATURES >> f & 1}


def test_backend_offer_is_what_the_walkthrough_expects() -> None:
    # The features the core is tested with (see vhostd/vhost_user/handler.py).
    assert offered_bits() == {PF.MQ, PF.LOG_SHMFD, PF.REPLY_ACK, PF.BACKEND_REQ, PF.CONFIG,
                              PF.INFLIGHT_SHMFD, PF.RESET_DEVICE, PF.CONFIGURE_MEM_SLOTS}


# ---- QEMU 7.2's sequence (reference 6.1) -----------------------------------------


def test_qemu_72_start_sequence(proto: BackendProtocol) -> None:
    fd = iter(range(100, 200))
    # Realize.
    m = feed_one(proto, frame(R.GET_FEATURES))
    assert (m.request, m.payload, m.body, m.ring, m.fds) == (R.GET_FEATURES, b"", None, None, [])
    feed_one(proto, frame(R.GET_PROTOCOL_FEATURES))
    m = feed_one(proto, frame(R.SET_PROTOCOL_FEATURES, u64(PROTOCOL_FEATURES & 0x1FFFF)))
    assert m.body.u64 == PROTOCOL_FEATURES
    assert proto.protocol_features == PROTOCOL_FEATURES
    assert proto.has(PF.REPLY_ACK) and proto.has(PF.LOG_SHMFD)
    feed_one(proto, frame(R.GET_QUEUE_NUM))
    feed_one(proto, frame(R.GET_MAX_MEM_SLOTS))
    backend_fd = next(fd)
    m = feed_one(proto, frame(R.SET_BACKEND_REQ_FD, flags=NEED_REPLY), [backend_fd])
    assert m.fds == [backend_fd] and m.fd == backend_fd and m.need_reply
    assert not proto.owner
    feed_one(proto, frame(R.SET_OWNER))
    assert proto.owner
    feed_one(proto, frame(R.GET_FEATURES))
    for i in range(NUM_QUEUES):
        call, err = next(fd), next(fd)
        m = feed_one(proto, frame(R.SET_VRING_CALL, vring_fd(i)), [call])
        assert (m.request, m.ring, m.fds, m.body.u64) == (R.SET_VRING_CALL, i, [call], i)
        m = feed_one(proto, frame(R.SET_VRING_ERR, vring_fd(i)), [err])
        assert (m.request, m.ring, m.fds) == (R.SET_VRING_ERR, i, [err])
    m = feed_one(proto, frame(R.GET_CONFIG, config_payload(0, 57)))
    assert len(m.payload) == 69
    assert (m.body.offset, m.body.size, m.body.flags, m.body.region) == (0, 57, 0, bytes(57))

    # Driver OK: vhost_user_blk_start.
    m = feed_one(proto, frame(R.SET_FEATURES, u64(FEATURES)))
    assert m.body.u64 == FEATURES and proto.acked_features == FEATURES
    m = feed_one(proto, frame(R.GET_INFLIGHT_FD, inflight_payload(0, 0, NUM_QUEUES, 128)))
    assert (m.body.num_queues, m.body.queue_size, m.body.mmap_size) == (NUM_QUEUES, 128, 0)
    shm = next(fd)
    m = feed_one(proto, frame(R.SET_INFLIGHT_FD,
                              inflight_payload(4224, 0, NUM_QUEUES, 128)), [shm])
    assert (m.fds, m.body.mmap_size, m.body.mmap_offset) == ([shm], 4224, 0)
    for i in range(NUM_QUEUES):
        feed_one(proto, frame(R.SET_VRING_CALL, vring_fd(i)), [next(fd)])
    feed_one(proto, frame(R.SET_FEATURES, u64(FEATURES)))
    for region in (REGION0, REGION1):
        reg_fd = next(fd)
        m = feed_one(proto, frame(R.ADD_MEM_REG, single_region(*region), NEED_REPLY), [reg_fd])
        r = m.body.region
        assert (r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset) == region
        assert m.fds == [reg_fd] and m.need_reply
    for i in range(NUM_QUEUES):
        m = feed_one(proto, frame(R.SET_VRING_NUM, state(i, 128)))
        assert (m.ring, m.body.index, m.body.num) == (i, i, 128)
        m = feed_one(proto, frame(R.SET_VRING_BASE, state(i, 7)))
        assert (m.ring, m.body.num) == (i, 7)
        m = feed_one(proto, frame(R.SET_VRING_ADDR, vring_addr(i, 0, 0x1000, 0x3000, 0x2000)))
        assert m.ring == i
        assert (m.body.desc_user_addr, m.body.used_user_addr, m.body.avail_user_addr,
                m.body.log_guest_addr, m.body.flags) == (0x1000, 0x3000, 0x2000, 0, 0)
        kick = next(fd)
        m = feed_one(proto, frame(R.SET_VRING_KICK, vring_fd(i)), [kick])
        assert (m.ring, m.fd) == (i, kick)
        assert proto.rings[i] is RingPhase.STARTED
    for i in range(NUM_QUEUES):
        m = feed_one(proto, frame(R.SET_VRING_ENABLE, state(i, 1)))
        assert (m.ring, m.body.num) == (i, 1)

    # Guest toggles its write cache.
    m = feed_one(proto, frame(R.SET_CONFIG, config_payload(32, 1, 0, b"\x00"), NEED_REPLY))
    assert (m.body.offset, m.body.size, m.body.region) == (32, 1, b"\x00")

    # Stop.
    for i in range(NUM_QUEUES):
        feed_one(proto, frame(R.SET_VRING_ENABLE, state(i, 0)))
    for i in range(NUM_QUEUES):
        m = feed_one(proto, frame(R.GET_VRING_BASE, state(i)))
        assert m.ring == i
        assert proto.rings[i] is RingPhase.STOPPED
    # Restart: the ring can be configured again.
    feed_one(proto, frame(R.SET_VRING_NUM, state(0, 128)))
    feed_one(proto, frame(R.SET_VRING_BASE, state(0, 9)))
    feed_one(proto, frame(R.SET_VRING_KICK, vring_fd(0, nofd=True)))
    assert proto.rings[0] is RingPhase.STARTED


def test_set_mem_table_and_rem_mem_reg(ready: BackendProtocol) -> None:
    m = feed_one(ready, frame(R.SET_MEM_TABLE, mem_table(REGION0, REGION1), NEED_REPLY),
                 [100, 101])
    assert m.fds == [100, 101] and m.body.nregions == 2
    assert [(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
            for r in m.body.regions] == [REGION0, REGION1]
    m = feed_one(ready, frame(R.SET_MEM_TABLE, mem_table()))
    assert m.body.nregions == 0 and m.fds == []
    # QEMU sends REM_MEM_REG without an fd.
    m = feed_one(ready, frame(R.REM_MEM_REG, single_region(*REGION1)))
    assert m.body.region.guest_phys_addr == REGION1[0] and m.fds == []


def test_set_log_base_when_log_shmfd_is_offered(log_ready: BackendProtocol) -> None:
    m = feed_one(log_ready, frame(R.SET_LOG_BASE, log_base(0x2000)), [100])
    assert (m.body.mmap_size, m.body.mmap_offset, m.fds) == (0x2000, 0, [100])


def test_reset_device_stops_every_ring(ready: BackendProtocol) -> None:
    feed_one(ready, frame(R.SET_FEATURES, u64(FEATURES)))
    feed_one(ready, frame(R.SET_VRING_KICK, vring_fd(1, nofd=True)))
    assert ready.rings[1] is RingPhase.STARTED
    feed_one(ready, frame(R.RESET_DEVICE))
    assert ready.rings == [RingPhase.STOPPED] * NUM_QUEUES
    assert ready.acked_features == 0
    feed_one(ready, frame(R.SET_VRING_NUM, state(1, 64)))


def test_unoffered_features_are_dropped(proto: BackendProtocol) -> None:
    negotiate(proto, acked=PROTOCOL_FEATURES | 1 << PF.LOG_SHMFD | 1 << PF.STATUS)
    assert proto.protocol_features == PROTOCOL_FEATURES
    feed_one(proto, frame(R.SET_FEATURES, u64(FEATURES | 1 << 26)))
    assert proto.acked_features == FEATURES


# ---- replies -------------------------------------------------------------------


def test_reply_flags_id_and_size(ready: BackendProtocol) -> None:
    m = feed_one(ready, frame(R.GET_VRING_BASE, state(1), NEED_REPLY))
    out = ready.reply(m, state(1, 42))
    assert reply_fields(out) == (R.GET_VRING_BASE, 0x5, 8, state(1, 42))
    assert len(out) == 12 + 8
    m = feed_one(ready, frame(R.GET_CONFIG, config_payload(0, 57)))
    out = ready.reply(m, config_payload(0, 57))
    assert reply_fields(out)[:3] == (R.GET_CONFIG, 0x5, 69)


@pytest.mark.parametrize(("flags", "ok", "expected"),
                         [(NEED_REPLY, True, 0), (NEED_REPLY, False, 1), (FLAGS, True, None),
                          (FLAGS, False, None)])
def test_ack_with_reply_ack(ready: BackendProtocol, flags: int, ok: bool,
                            expected: int | None) -> None:
    m = feed_one(ready, frame(R.SET_VRING_ADDR, vring_addr(0), flags))
    out = ready.ack(m, ok)
    if expected is None:
        assert out is None
    else:
        assert out == struct.pack("<IIIQ", R.SET_VRING_ADDR, 0x5, 8, expected)


def test_no_ack_without_reply_ack(proto: BackendProtocol) -> None:
    negotiate(proto, acked=PROTOCOL_FEATURES & ~(1 << PF.REPLY_ACK))
    m = feed_one(proto, frame(R.SET_FEATURES, u64(FEATURES), NEED_REPLY))
    assert m.need_reply
    assert proto.ack(m, True) is None
    assert proto.ack(m, False) is None


def test_set_log_base_is_always_answered(log_ready: BackendProtocol) -> None:
    m = feed_one(log_ready, frame(R.SET_LOG_BASE, log_base(0x1000)), [100])
    assert not m.need_reply
    assert log_ready.ack(m, True) == struct.pack("<IIIQ", R.SET_LOG_BASE, 0x5, 8, 0)


def test_ack_refuses_requests_answered_with_a_body(ready: BackendProtocol) -> None:
    m = feed_one(ready, frame(R.GET_VRING_BASE, state(0)))
    with pytest.raises(ValueError, match="body"):
        ready.ack(m, True)


def test_answer_local(ready: BackendProtocol, info: DeviceInfo) -> None:
    expected = {R.GET_FEATURES: info.features,
                R.GET_PROTOCOL_FEATURES: PROTOCOL_FEATURES,
                R.GET_QUEUE_NUM: NUM_QUEUES,
                R.GET_MAX_MEM_SLOTS: 509}
    for req, value in expected.items():
        m = feed_one(ready, frame(req, flags=NEED_REPLY))
        assert reply_fields(ready.answer_local(m)) == (req, 0x5, 8, u64(value))  # type: ignore
    m = feed_one(ready, frame(R.SET_FEATURES, u64(FEATURES)))
    assert ready.answer_local(m) is None


def test_answer_local_uses_device_info() -> None:
    proto = BackendProtocol(DeviceInfo(features=0x1234, protocol_features=PROTOCOL_FEATURES,
                                       num_queues=5, max_mem_slots=32))
    negotiate(proto)
    for req, value in ((R.GET_FEATURES, 0x1234), (R.GET_QUEUE_NUM, 5),
                       (R.GET_MAX_MEM_SLOTS, 32)):
        m = feed_one(proto, frame(req))
        assert reply_fields(proto.answer_local(m))[3] == u64(value)  # type: ignore[arg-type]


# ---- framing --------------------------------------------------------------------

# A realistic stream: (bytes, fds sent with that message).
STREAM: list[tuple[bytes, list[int]]] = [
    (frame(R.GET_FEATURES), []),
    (frame(R.GET_PROTOCOL_FEATURES), []),
    (frame(R.SET_PROTOCOL_FEATURES, u64(PROTOCOL_FEATURES)), []),
    (frame(R.SET_BACKEND_REQ_FD, flags=NEED_REPLY), [100]),
    (frame(R.SET_OWNER), []),
    (frame(R.SET_VRING_CALL, vring_fd(0)), [101]),
    (frame(R.SET_MEM_TABLE, mem_table(REGION0, REGION1), NEED_REPLY), [102, 103]),
    (frame(R.SET_VRING_NUM, state(0, 256)), []),
    (frame(R.SET_VRING_BASE, state(0, 3)), []),
    (frame(R.SET_VRING_ADDR, vring_addr(0, 0, 1, 2, 3)), []),
    (frame(R.SET_VRING_KICK, vring_fd(0)), [104]),
    (frame(R.GET_CONFIG, config_payload(0, 57)), []),
]


def summary(msgs: list[Message]) -> list[tuple[R, int, bytes, list[int], int | None, Any]]:
    return [(m.request, m.flags, m.payload, m.fds, m.ring, plain(m.body)) for m in msgs]


def whole(info: DeviceInfo) -> list[Message]:
    proto = BackendProtocol(info)
    out: list[Message] = []
    for data, fds in STREAM:
        out += feed(proto, data, fds)
    return out


def test_stream_gives_one_message_each(info: DeviceInfo) -> None:
    msgs = whole(info)
    assert [m.request for m in msgs] == [R(struct.unpack_from("<I", d)[0]) for d, _ in STREAM]
    assert [m.fds for m in msgs] == [fds for _, fds in STREAM]


def test_byte_at_a_time(info: DeviceInfo) -> None:
    proto = BackendProtocol(info)
    out: list[Message] = []
    for data, fds in STREAM:
        for k in range(len(data)):
            # fds arrive with the first byte of their message, like SCM_RIGHTS.
            got = feed(proto, data[k:k + 1], fds if k == 0 else [])
            assert got == [] or k == len(data) - 1
            out += got
        assert proto.bytes_needed() == 12
    assert summary(out) == summary(whole(info))


def test_fds_with_a_later_byte_attach_to_the_message_being_assembled(
        ready: BackendProtocol) -> None:
    data = frame(R.SET_VRING_KICK, vring_fd(1))
    assert feed(ready, data[:5]) == []
    assert ready.bytes_needed() == 7
    assert feed(ready, data[5:14], [100]) == []
    assert ready.pending_fds() == [100]
    assert ready.bytes_needed() == 6
    m = feed_one(ready, data[14:])
    assert m.fds == [100] and m.ring == 1
    assert ready.pending_fds() == []


def test_many_messages_in_one_chunk(info: DeviceInfo) -> None:
    # Each chunk starts with a message that carries fds and goes on with every
    # following message that has none; the fds belong to the first one.
    groups: list[tuple[bytes, list[int]]] = []
    for data, fds in STREAM:
        if fds or not groups:
            groups.append((data, list(fds)))
        else:
            groups[-1] = (groups[-1][0] + data, groups[-1][1])
    assert len(groups) == 5
    proto = BackendProtocol(info)
    out: list[Message] = []
    for data, fds in groups:
        out += feed(proto, data, fds)
    assert summary(out) == summary(whole(info))


def test_whole_sequence_in_one_chunk(info: DeviceInfo) -> None:
    msgs = [
        frame(R.GET_FEATURES), frame(R.GET_PROTOCOL_FEATURES),
        frame(R.SET_PROTOCOL_FEATURES, u64(PROTOCOL_FEATURES)), frame(R.SET_OWNER),
        frame(R.SET_VRING_NUM, state(1, 64)), frame(R.SET_VRING_BASE, state(1, 2)),
        frame(R.SET_VRING_ADDR, vring_addr(1, 0, 1, 2, 3)),
        frame(R.SET_VRING_KICK, vring_fd(1, nofd=True)),
        frame(R.GET_CONFIG, config_payload(0, 57)),
    ]
    one = BackendProtocol(info)
    separately = [feed_one(one, m) for m in msgs]
    chunked = feed(BackendProtocol(info), b"".join(msgs))
    assert summary(chunked) == summary(separately)
    assert [m.ring for m in chunked] == [None] * 4 + [1] * 4 + [None]


def test_chunk_ending_mid_header_keeps_the_rest(ready: BackendProtocol) -> None:
    a = frame(R.SET_VRING_NUM, state(0, 64))
    b = frame(R.SET_VRING_BASE, state(0, 5))
    msgs = feed(ready, a + b[:7])
    assert [m.request for m in msgs] == [R.SET_VRING_NUM]
    assert ready.bytes_needed() == 5
    m = feed_one(ready, b[7:])
    assert (m.request, m.body.num) == (R.SET_VRING_BASE, 5)


# ---- illegal order -----------------------------------------------------------------

NEEDS_OWNER: list[tuple[R, bytes, list[int]]] = [
    (R.SET_MEM_TABLE, mem_table(REGION0), [100]),
    (R.ADD_MEM_REG, single_region(*REGION0), [100]),
    (R.REM_MEM_REG, single_region(*REGION0), []),
    (R.SET_VRING_NUM, state(0, 128), []),
    (R.SET_VRING_BASE, state(0, 0), []),
    (R.SET_VRING_ADDR, vring_addr(0), []),
    (R.GET_VRING_BASE, state(0), []),
    (R.SET_VRING_KICK, vring_fd(0), [100]),
    (R.SET_VRING_CALL, vring_fd(0), [100]),
    (R.SET_VRING_ERR, vring_fd(0), [100]),
    (R.GET_INFLIGHT_FD, inflight_payload(), []),
    (R.SET_INFLIGHT_FD, inflight_payload(4224), [100]),
]


@pytest.mark.parametrize(("req", "payload", "fds"), NEEDS_OWNER,
                         ids=[r.name for r, *_ in NEEDS_OWNER])
def test_before_set_owner(proto: BackendProtocol, req: R, payload: bytes,
                          fds: list[int]) -> None:
    negotiate(proto, owner=False)
    with pytest.raises(ProtocolError, match=f"^{req.name} before SET_OWNER$") as e:
        feed(proto, frame(req, payload), fds)
    assert e.value.fds == fds


def test_set_log_base_before_set_owner() -> None:
    proto = BackendProtocol(make_info(PROTOCOL_FEATURES | 1 << PF.LOG_SHMFD))
    negotiate(proto, owner=False)
    with pytest.raises(ProtocolError, match="SET_LOG_BASE before SET_OWNER") as e:
        feed(proto, frame(R.SET_LOG_BASE, log_base(0x1000)), [100])
    assert e.value.fds == [100]


GATED: list[tuple[R, PF, bytes, list[int]]] = [
    (R.GET_QUEUE_NUM, PF.MQ, b"", []),
    (R.GET_MAX_MEM_SLOTS, PF.CONFIGURE_MEM_SLOTS, b"", []),
    (R.GET_CONFIG, PF.CONFIG, config_payload(0, 57), []),
    (R.SET_CONFIG, PF.CONFIG, config_payload(32, 1, 0, b"\x01"), []),
    (R.ADD_MEM_REG, PF.CONFIGURE_MEM_SLOTS, single_region(*REGION0), [100]),
    (R.REM_MEM_REG, PF.CONFIGURE_MEM_SLOTS, single_region(*REGION0), []),
    (R.GET_INFLIGHT_FD, PF.INFLIGHT_SHMFD, inflight_payload(), []),
    (R.SET_INFLIGHT_FD, PF.INFLIGHT_SHMFD, inflight_payload(4224), [100]),
    (R.SET_BACKEND_REQ_FD, PF.BACKEND_REQ, b"", [100]),
    (R.RESET_DEVICE, PF.RESET_DEVICE, b"", []),
    (R.SET_LOG_BASE, PF.LOG_SHMFD, log_base(0x1000), [100]),
]
GATED_IDS = [r.name for r, *_ in GATED]


@pytest.mark.parametrize(("req", "gate", "payload", "fds"), GATED, ids=GATED_IDS)
def test_gated_before_set_protocol_features(req: R, gate: PF, payload: bytes,
                                            fds: list[int]) -> None:
    proto = BackendProtocol(make_info(PROTOCOL_FEATURES | 1 << PF.LOG_SHMFD))
    feed_one(proto, frame(R.SET_OWNER))
    with pytest.raises(ProtocolError, match=f"^{req.name} needs protocol feature "
                                            f"{gate.name}, which was not negotiated$") as e:
        feed(proto, frame(req, payload), fds)
    assert e.value.fds == fds


@pytest.mark.parametrize(("req", "gate", "payload", "fds"), GATED, ids=GATED_IDS)
def test_gated_when_the_front_end_left_the_bit_out(req: R, gate: PF, payload: bytes,
                                                   fds: list[int]) -> None:
    offer = PROTOCOL_FEATURES | 1 << PF.LOG_SHMFD
    proto = BackendProtocol(make_info(offer))
    negotiate(proto, acked=offer & ~(1 << gate))
    with pytest.raises(ProtocolError, match=f"needs protocol feature {gate.name}") as e:
        feed(proto, frame(req, payload), fds)
    assert e.value.fds == fds
    # The same request passes once the bit is negotiated.
    proto = BackendProtocol(make_info(offer))
    negotiate(proto)
    feed_one(proto, frame(req, payload), fds)


def test_log_base_refused_when_not_offered_even_if_acked(info: DeviceInfo) -> None:
    proto = BackendProtocol(dataclasses.replace(
        info, protocol_features=info.protocol_features & ~(1 << PF.LOG_SHMFD)))
    negotiate(proto, acked=PROTOCOL_FEATURES | 1 << PF.LOG_SHMFD)
    with pytest.raises(ProtocolError, match="LOG_SHMFD"):
        feed(proto, frame(R.SET_LOG_BASE, log_base(0x1000)), [100])


def test_set_vring_enable_before_set_protocol_features(proto: BackendProtocol) -> None:
    feed_one(proto, frame(R.SET_OWNER))
    with pytest.raises(ProtocolError,
                       match="SET_VRING_ENABLE before protocol features were negotiated"):
        feed(proto, frame(R.SET_VRING_ENABLE, state(0, 1)))


@pytest.mark.parametrize("req", [R.SET_VRING_NUM, R.SET_VRING_BASE])
def test_num_and_base_refused_on_a_started_ring(ready: BackendProtocol, req: R) -> None:
    feed_one(ready, frame(R.SET_VRING_KICK, vring_fd(1)), [100])
    # Ring 0 is still stopped and can be configured.
    feed_one(ready, frame(req, state(0, 64)))
    with pytest.raises(ProtocolError, match=f"^{req.name} on ring 1 while it is started$"):
        feed(ready, frame(req, state(1, 64)))


def test_started_ring_accepts_addr_call_err_enable_and_kick(ready: BackendProtocol) -> None:
    feed_one(ready, frame(R.SET_VRING_KICK, vring_fd(0)), [100])
    feed_one(ready, frame(R.SET_VRING_ADDR, vring_addr(0, 1, 1, 2, 3, 4), NEED_REPLY))
    feed_one(ready, frame(R.SET_VRING_CALL, vring_fd(0, nofd=True)))
    feed_one(ready, frame(R.SET_VRING_ERR, vring_fd(0)), [101])
    feed_one(ready, frame(R.SET_VRING_ENABLE, state(0, 0)))
    feed_one(ready, frame(R.SET_VRING_KICK, vring_fd(0)), [102])
    assert ready.rings[0] is RingPhase.STARTED


def test_get_vring_base_allows_num_and_base_again(ready: BackendProtocol) -> None:
    feed_one(ready, frame(R.SET_VRING_KICK, vring_fd(0)), [100])
    feed_one(ready, frame(R.GET_VRING_BASE, state(0)))
    assert ready.rings[0] is RingPhase.STOPPED
    feed_one(ready, frame(R.SET_VRING_NUM, state(0, 64)))
    feed_one(ready, frame(R.SET_VRING_BASE, state(0, 11)))
    # A second GET_VRING_BASE on a stopped ring is legal too.
    feed_one(ready, frame(R.GET_VRING_BASE, state(0)))


def test_ring_transitions_table() -> None:
    stopped, started = RingPhase.STOPPED, RingPhase.STARTED
    assert RING_TRANSITIONS == {
        (R.SET_VRING_NUM, stopped): stopped,
        (R.SET_VRING_BASE, stopped): stopped,
        (R.SET_VRING_ADDR, stopped): stopped,
        (R.SET_VRING_ADDR, started): started,
        (R.SET_VRING_KICK, stopped): started,
        (R.SET_VRING_KICK, started): started,
        (R.GET_VRING_BASE, started): stopped,
        (R.GET_VRING_BASE, stopped): stopped,
    }


RING_REQUESTS: list[tuple[R, bytes, list[int]]] = [
    (R.SET_VRING_NUM, state(2, 64), []),
    (R.SET_VRING_BASE, state(2, 0), []),
    (R.SET_VRING_ADDR, vring_addr(2), []),
    (R.GET_VRING_BASE, state(0xFFFF_FFFF), []),
    (R.SET_VRING_ENABLE, state(2, 1), []),
    (R.SET_VRING_KICK, vring_fd(2), [100]),
    (R.SET_VRING_CALL, vring_fd(0xFF), [100]),
    (R.SET_VRING_ERR, vring_fd(2, nofd=True), []),
]


@pytest.mark.parametrize(("req", "payload", "fds"), RING_REQUESTS,
                         ids=[r.name for r, *_ in RING_REQUESTS])
def test_ring_index_out_of_range(ready: BackendProtocol, req: R, payload: bytes,
                                 fds: list[int]) -> None:
    with pytest.raises(ProtocolError, match=r"ring \d+ does not exist \(device has 2\)") as e:
        feed(ready, frame(req, payload), fds)
    assert e.value.fds == fds
    # Index 1 is the last one that exists.
    ok = struct.pack("<I", 1) + payload[4:]
    if req in (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR):
        ok = vring_fd(1, nofd=not fds)
    feed_one(ready, frame(req, ok), fds)


# ---- malformed ---------------------------------------------------------------------

FIXED_SIZES = {req: int(rule.size_text) for req, rule in RULES.items()
               if rule.size_text.isdigit()}


def test_fixed_sizes_match_the_reference() -> None:
    assert FIXED_SIZES == {
        R.GET_FEATURES: 0, R.SET_FEATURES: 8, R.SET_OWNER: 0, R.RESET_OWNER: 0,
        R.GET_PROTOCOL_FEATURES: 0, R.SET_PROTOCOL_FEATURES: 8, R.GET_QUEUE_NUM: 0,
        R.GET_MAX_MEM_SLOTS: 0, R.ADD_MEM_REG: 40, R.REM_MEM_REG: 40,
        R.SET_BACKEND_REQ_FD: 0, R.SET_VRING_NUM: 8, R.SET_VRING_BASE: 8,
        R.SET_VRING_ADDR: 40, R.GET_VRING_BASE: 8, R.SET_VRING_KICK: 8, R.SET_VRING_CALL: 8,
        R.SET_VRING_ERR: 8, R.SET_VRING_ENABLE: 8, R.GET_INFLIGHT_FD: 24,
        R.SET_INFLIGHT_FD: 24, R.RESET_DEVICE: 0, R.SET_LOG_BASE: 16,
    }


WRONG_SIZES = [(req, n) for req, size in FIXED_SIZES.items()
               for n in sorted({max(size - 1, 0), size + 1, size + 8} - {size})]


@pytest.mark.parametrize(("req", "n"), WRONG_SIZES,
                         ids=[f"{r.name}-{n}" for r, n in WRONG_SIZES])
def test_wrong_payload_size(log_ready: BackendProtocol, req: R, n: int) -> None:
    size = FIXED_SIZES[req]
    with pytest.raises(ProtocolError,
                       match=f"^{req.name}: payload is {n} bytes, expected {size}$") as e:
        feed(log_ready, frame(req, bytes(n)), [100])
    assert e.value.fds == [100]


@pytest.mark.parametrize(("payload", "why"), [
    (mem_table(*[REGION0] * 8, nregions=9), "nregions 9 with 8 regions"),
    (mem_table(REGION0, nregions=2), "2 declared, 1 present"),
    (mem_table(REGION0, REGION1, nregions=1), "1 declared, 2 present"),
    (mem_table(REGION0) + bytes(4), "trailing bytes"),
    (bytes(4), "shorter than the table header"),
])
def test_set_mem_table_size_mismatch(ready: BackendProtocol, payload: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=r"SET_MEM_TABLE: payload is \d+ bytes, expected "
                                            r"8 \+ 32 \* nregions") as e:
        feed(ready, frame(R.SET_MEM_TABLE, payload), [100])
    assert e.value.fds == [100]


def test_set_mem_table_nine_regions(ready: BackendProtocol) -> None:
    fds = list(range(100, 109))
    with pytest.raises(ProtocolError) as e:
        feed(ready, frame(R.SET_MEM_TABLE, mem_table(*[REGION0] * 9)), fds)
    assert e.value.fds == fds
    assert "SET_MEM_TABLE" in str(e.value)


@pytest.mark.parametrize(("req", "offset", "size", "extra"), [
    (R.GET_CONFIG, 0, 257, 0),
    (R.SET_CONFIG, 0, 300, 0),
    (R.GET_CONFIG, 250, 10, 0),
    (R.SET_CONFIG, 256, 1, 0),
    (R.GET_CONFIG, 0xFFFF_FFFF, 1, 0),
    (R.GET_CONFIG, 0, 257, -257),  # size field too big, no region
    (R.GET_CONFIG, 0, 57, 1),  # region longer than the size field
    (R.SET_CONFIG, 32, 1, -1),  # region shorter than the size field
])
def test_bad_config(ready: BackendProtocol, req: R, offset: int, size: int,
                    extra: int) -> None:
    payload = config_payload(offset, size, 0, bytes(max(size + extra, 0)))
    with pytest.raises(ProtocolError, match=req.name):
        feed(ready, frame(req, payload))


def test_config_up_to_the_end_of_the_space(ready: BackendProtocol) -> None:
    m = feed_one(ready, frame(R.SET_CONFIG, config_payload(200, 56)))
    assert (m.body.offset, m.body.size) == (200, 56)


def test_full_256_byte_config_is_accepted(ready: BackendProtocol) -> None:
    m = feed_one(ready, frame(R.GET_CONFIG, config_payload(0, 256)))
    assert m.body.size == 256


def test_unknown_request_id(ready: BackendProtocol) -> None:
    with pytest.raises(ProtocolError, match=r"^unknown request id 99$") as e:
        feed(ready, frame(99, u64(0)), [100])
    assert e.value.fds == [100]


@pytest.mark.parametrize("req", [R.SEND_RARP, R.IOTLB_MSG, R.SET_STATUS, R.POSTCOPY_ADVISE,
                                 R.SET_LOG_FD, R.VRING_KICK])
def test_known_but_unsupported(ready: BackendProtocol, req: R) -> None:
    with pytest.raises(ProtocolError, match=f"^{req.name} is not supported by this back end$"):
        feed(ready, frame(req, u64(0)))


def test_send_rarp_by_number(ready: BackendProtocol) -> None:
    with pytest.raises(ProtocolError, match="SEND_RARP is not supported") as e:
        feed(ready, frame(19, u64(0)), [100])
    assert e.value.fds == [100]


@pytest.mark.parametrize("flags", [0x5, 0xD, 0x4 | 0x1])
def test_reply_flag_in_a_request(ready: BackendProtocol, flags: int) -> None:
    with pytest.raises(ProtocolError, match="GET_FEATURES: front end sent a message with the "
                                            "REPLY flag"):
        feed(ready, frame(R.GET_FEATURES, flags=flags))


@pytest.mark.parametrize("flags", [0x0, 0x2, 0x3, 0x8, 0xA])
def test_wrong_version(ready: BackendProtocol, flags: int) -> None:
    with pytest.raises(ProtocolError,
                       match=f"SET_OWNER: unsupported version in flags {flags:#x}") as e:
        feed(ready, frame(R.SET_OWNER, flags=flags), [100])
    assert e.value.fds == [100]


@pytest.mark.parametrize("req", [R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR])
def test_missing_fd_without_nofd(ready: BackendProtocol, req: R) -> None:
    with pytest.raises(ProtocolError, match=f"^{req.name}: carries 0 fds, expected 1$"):
        feed(ready, frame(req, vring_fd(0)))


@pytest.mark.parametrize("req", [R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR])
def test_fd_with_nofd(ready: BackendProtocol, req: R) -> None:
    with pytest.raises(ProtocolError, match=f"^{req.name}: carries 1 fds, expected 0$") as e:
        feed(ready, frame(req, vring_fd(0, nofd=True)), [100])
    assert e.value.fds == [100]
    m = feed_one(ready, frame(req, vring_fd(0, nofd=True)))
    assert m.fd is None and m.ring == 0


@pytest.mark.parametrize(("req", "payload"), [
    (R.SET_VRING_KICK, vring_fd(0)),
    (R.SET_VRING_CALL, vring_fd(1)),
    (R.ADD_MEM_REG, single_region(*REGION0)),
    (R.SET_BACKEND_REQ_FD, b""),
    (R.SET_INFLIGHT_FD, inflight_payload(4224)),
    (R.REM_MEM_REG, single_region(*REGION0)),
])
def test_two_fds_where_one_is_allowed(ready: BackendProtocol, req: R, payload: bytes) -> None:
    with pytest.raises(ProtocolError,
                       match=rf"^{req.name}: carries 2 fds, expected (0\.\.)?1$") as e:
        feed(ready, frame(req, payload), [100, 101])
    assert e.value.fds == [100, 101]


@pytest.mark.parametrize(("req", "payload"), [
    (R.ADD_MEM_REG, single_region(*REGION0)),
    (R.SET_BACKEND_REQ_FD, b""),
    (R.SET_INFLIGHT_FD, inflight_payload(4224)),
])
def test_missing_required_fd(ready: BackendProtocol, req: R, payload: bytes) -> None:
    with pytest.raises(ProtocolError, match=f"^{req.name}: carries 0 fds, expected 1$"):
        feed(ready, frame(req, payload))


@pytest.mark.parametrize("fds", [[100], [100, 101, 102]])
def test_mem_table_fd_count_must_match_regions(ready: BackendProtocol, fds: list[int]) -> None:
    with pytest.raises(ProtocolError, match=f"SET_MEM_TABLE: carries {len(fds)} fds, "
                                            f"expected 2") as e:
        feed(ready, frame(R.SET_MEM_TABLE, mem_table(REGION0, REGION1)), fds)
    assert e.value.fds == fds


@pytest.mark.parametrize(("req", "payload"), [(R.GET_FEATURES, b""), (R.SET_VRING_NUM,
                                                                       state(0, 64))])
def test_fd_on_a_request_that_takes_none(ready: BackendProtocol, req: R, payload: bytes) -> None:
    with pytest.raises(ProtocolError, match="carries 1 fds, expected 0") as e:
        feed(ready, frame(req, payload), [100])
    assert e.value.fds == [100]


@pytest.mark.parametrize("extra", [1 << 9, 1 << 15, 1 << 31])
def test_reserved_bits_in_vring_fd(ready: BackendProtocol, extra: int) -> None:
    with pytest.raises(ProtocolError, match="SET_VRING_CALL: reserved bits set") as e:
        feed(ready, frame(R.SET_VRING_CALL, vring_fd(0, extra=extra)), [100])
    assert e.value.fds == [100]


@pytest.mark.parametrize("extra", [1 << 32, 1 << 63])
def test_reserved_high_bits_in_vring_fd(ready: BackendProtocol, extra: int) -> None:
    with pytest.raises(ProtocolError, match="reserved bits set"):
        feed(ready, frame(R.SET_VRING_KICK, vring_fd(0, extra=extra)), [100])


@pytest.mark.parametrize("size", [VHOST_USER_MAX_PAYLOAD + 1, 0x1000, 0xFFFF_FFFF])
def test_declared_size_larger_than_any_payload(ready: BackendProtocol, size: int) -> None:
    # Refused as soon as the header is complete: no payload has to arrive.
    with pytest.raises(ProtocolError, match=f"^SET_MEM_TABLE declares {size} payload bytes, "
                                            f"more than any request carries$") as e:
        feed(ready, frame(R.SET_MEM_TABLE, size=size), [100, 101])
    assert e.value.fds == [100, 101]


def test_largest_mem_table_fits(ready: BackendProtocol) -> None:
    fds = list(range(100, 108))
    m = feed_one(ready, frame(R.SET_MEM_TABLE, mem_table(*[REGION0] * 8)), fds)
    assert len(m.payload) == 8 + 32 * 8 and m.fds == fds


def test_error_carries_fds_received_in_pieces(ready: BackendProtocol) -> None:
    data = frame(R.SET_VRING_KICK, vring_fd(0, nofd=True))
    feed(ready, data[:3], [100])
    with pytest.raises(ProtocolError) as e:
        feed(ready, data[3:], [101])
    assert e.value.fds == [100, 101]


def test_error_mid_chunk_hands_back_earlier_fds(ready: BackendProtocol) -> None:
    chunk = frame(R.SET_VRING_CALL, vring_fd(0)) + frame(99)
    with pytest.raises(ProtocolError) as e:
        feed(ready, chunk, [100])
    assert 100 in e.value.fds
