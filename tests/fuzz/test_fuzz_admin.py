"""Fuzz target: admin commands (AdminCommands.execute) and DEV_PARTS_SET payloads.

Sequences of commands against two blk members, one of them with a front end that
negotiated features: the spec's commands with plausible and random fields, resource
objects created and destroyed, members stopped, frozen and resumed, device parts
read back and written with random part lists (types, selectors, lengths, values),
the vendor dirty-tracking commands, any result room. Properties: every command ends
in a status the spec defines, never an internal error (a logged traceback); an OK
DEV_PARTS_GET result is a well-formed part list; a failed DEV_PARTS_SET changes
nothing (the next resume succeeds).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator

import pytest
from fuzz_support import CATCHER, blk_backend, count
from hypothesis import given
from hypothesis import strategies as st

from vhostd.core.member import MemberMode
from vhostd.core.pending import Pending
from vhostd.devices.owner import AdminCommands
from vhostd.vhost_user.handler import ENGINE_FEATURES, VhostUserHandler
from vhostd.vhost_user.member import Member
from vhostd_proto import vhost_user as vu
from vhostd_proto.device_parts import Part, decode_parts, encode_parts, vq_selector

OPCODES = [0x0, 0x1, 0x7, 0x8, 0x9, 0xA, 0xB, 0xC, 0xD, 0xE, 0xF, 0x10, 0x11, 0x30, 0x31,
           0x32]
STATUSES = {0, 6, 12, 16, 17, 22}
PART_TYPES = [0x100, 0x101, 0x102, 0x103, 0x104, 0x105, 0x5F0, 0x5F1]

u8 = st.integers(0, 0xFF)
obj_id = st.integers(0, 3) | st.integers(0, 0xFFFFFFFF)
member = st.sampled_from([0, 1, 2, 3]) | st.integers(0, (1 << 64) - 1)


def hdr(oid: int, rtype: int = 0) -> bytes:
    return struct.pack("<H2xI", rtype & 0xFFFF, oid & 0xFFFFFFFF)


@st.composite
def part(draw: st.DrawFn) -> Part:
    ptype = draw(st.sampled_from(PART_TYPES) | st.integers(0, 0xFFFF))
    selector = draw(st.sampled_from([bytes(8), vq_selector(0), vq_selector(1),
                                     vq_selector(0xFFFF)]) | st.binary(min_size=8, max_size=8))
    value = draw(st.binary(max_size=48) | st.sampled_from(
        [bytes(8), (ENGINE_FEATURES).to_bytes(8, "little"), bytes(1), b"\x01", bytes(2)]))
    return Part(ptype, draw(st.integers(0, 3)), selector, value)


@st.composite
def command(draw: st.DrawFn) -> tuple[bytes, int]:
    op = draw(st.sampled_from(OPCODES) | st.integers(0, 0xFFFF))
    group = draw(st.sampled_from([1, 1, 0]) | st.integers(0, 0xFFFF))
    m = draw(member)
    oid = draw(obj_id)
    if op == 0xA:  # create: kind GET or SET
        data = hdr(oid) + struct.pack("<QB7x", draw(st.integers(0, 2)),
                                      draw(st.integers(0, 2)))
    elif op == 0xE:
        data = hdr(oid) + struct.pack("<B7x", draw(st.integers(0, 3)))
    elif op == 0xF:
        data = hdr(oid) + struct.pack("<B7x", draw(st.integers(0, 2))) + b"".join(
            p.header() for p in draw(st.lists(part(), max_size=4)))
    elif op == 0x10:
        parts = draw(st.lists(part(), max_size=8))
        raw = encode_parts(parts)
        if draw(st.booleans()):  # cut or extended: a part running past the end
            raw = raw[:draw(st.integers(0, len(raw)))] + draw(st.binary(max_size=12))
        data = hdr(oid) + raw
    elif op == 0x11:
        data = bytes([draw(st.sampled_from([0, 1, 2, 3]) | u8)])
    elif op == 0x30:
        n = draw(st.integers(0, 3))
        data = struct.pack("<II", draw(st.sampled_from([4096, 1 << 21, 3, 0])), n) + b"".join(
            struct.pack("<QQ", draw(st.integers(0, 1 << 40)), draw(st.integers(0, 1 << 34)))
            for _ in range(n))
    else:
        data = draw(st.binary(max_size=40))
    capacity = draw(st.sampled_from([0, 4, 8, 16, 64, 4096, 1 << 16]) | st.integers(0, 1 << 12))
    return struct.pack("<HH12xQ", op & 0xFFFF, group & 0xFFFF, m & (1 << 64) - 1) + data, capacity


@pytest.fixture(scope="module")
def members() -> Iterator[list[Member]]:
    loop = asyncio.new_event_loop()
    out = [Member(blk_backend(loop, name=f"member{i}", num_queues=i)) for i in (1, 2)]
    yield out
    for m in out:
        if m.handler.protocol is not None:
            m.handler.disconnect()
        m.handler.device.close()
    loop.close()


def _front_end(b: VhostUserHandler) -> None:
    """Member 2 has a front end that negotiated features (and nothing else)."""
    proto = b.connect()
    for req, payload in ((vu.Request.SET_OWNER, b""),
                         (vu.Request.SET_FEATURES, ENGINE_FEATURES.to_bytes(8, "little"))):
        frame = (int(req).to_bytes(4, "little") + (1).to_bytes(4, "little")
                 + len(payload).to_bytes(4, "little") + payload)
        for msg in proto.receive(frame):
            b.handle(msg)


@given(commands=st.lists(command(), max_size=24), activate=st.booleans())
def test_admin_commands_end_in_a_defined_status(members: list[Member],
                                                commands: list[tuple[bytes, int]],
                                                activate: bool) -> None:
    count("admin commands", len(commands))
    if members[1].handler.protocol is None:
        _front_end(members[1].handler)
    admin = AdminCommands(members)
    if activate:  # Linux's activation: LIST_USE of what it drives
        admin.execute(struct.pack("<HH12xQ", 1, 1, 0) + (0x3E780 | 7 << 0x30).to_bytes(
            8, "little"), 8)
    try:
        for cmd, capacity in commands:
            outcome = admin.execute(cmd, capacity)
            # Nothing is outstanding and no ring is in a worker: every command ends now.
            assert not isinstance(outcome, Pending)
            status, _qual, result = outcome
            assert status in STATUSES, status
            op = int.from_bytes(cmd[:2], "little")
            if status == 0 and op == 0xF:
                decode_parts(result)
        CATCHER.check()
    finally:
        for b in members:  # the next example starts from running members
            b.staged = None
            b.stop_tracking()
            b.set_mode(MemberMode.RUNNING)
        admin.reset()
