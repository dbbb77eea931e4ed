"""Fuzz target: the sans-I/O protocol core (BackendProtocol.receive), in process.

Byte streams of well-formed, slightly wrong and random vhost-user messages, cut at
random places, with (fake) fds riding on random pieces. Properties: receive either
returns validated messages or raises ProtocolError; every fd handed in comes back
exactly once (in a message, in the error, or as pending); replies build.
"""

from __future__ import annotations

from fuzz_support import count
from hypothesis import given
from hypothesis import strategies as st

from vhostd.core.protocol import RULES, BackendProtocol, DeviceInfo, ProtocolError, ReplyKind
from vhostd.vhost_user.handler import ENGINE_FEATURES, PROTOCOL_FEATURES
from vhostd_proto import vhost_user as vu

R = vu.Request
KNOWN = [int(r) for r in R]


def frame(request: int, payload: bytes, flags: int = 1, size: int | None = None) -> bytes:
    n = len(payload) if size is None else size
    return (request.to_bytes(4, "little") + flags.to_bytes(4, "little")
            + n.to_bytes(4, "little") + payload)


@st.composite
def message(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind == 0:  # raw garbage
        return draw(st.binary(max_size=64))
    request = draw(st.sampled_from(KNOWN) if kind < 8 else st.integers(0, 0xFFFFFFFF))
    rule = RULES.get(R(request)) if request in KNOWN else None
    flags = draw(st.sampled_from([1, 1, 1, 9, 5, 0, 2]) | st.integers(0, 0xFFFFFFFF))
    if rule is not None and kind < 6:
        # A payload of a size the rule may accept: pick among typical sizes.
        size = draw(st.sampled_from([0, 8, 12, 16, 24, 40, 8 + 32, 8 + 64, 12 + 4]))
        if request in (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR):
            payload = (draw(st.integers(0, 3)) | draw(st.sampled_from([0, 0x100, 0x200]))
                       ).to_bytes(8, "little")
        elif request in (R.SET_MEM_TABLE,):
            n = draw(st.integers(0, 9))
            payload = n.to_bytes(4, "little") + bytes(4) + draw(st.binary(min_size=32 * n,
                                                                         max_size=32 * n))
        else:
            payload = draw(st.integers(0, 3)).to_bytes(4, "little") + draw(
                st.binary(min_size=max(0, size - 4), max_size=max(0, size - 4)))
            payload = payload[:size] if size else b""
        return frame(request, payload, flags)
    payload = draw(st.binary(max_size=300))
    size = draw(st.none() | st.integers(0, 0x2000))
    return frame(request, payload, flags, size)


NEGOTIATE = (frame(R.SET_OWNER, b"")
             + frame(R.SET_FEATURES, ENGINE_FEATURES.to_bytes(8, "little"))
             + frame(R.SET_PROTOCOL_FEATURES, PROTOCOL_FEATURES.to_bytes(8, "little")))


@given(messages=st.lists(message(), max_size=16), negotiated=st.booleans(),
       cuts=st.lists(st.integers(1, 64), max_size=40),
       fd_at=st.lists(st.tuples(st.integers(0, 40), st.integers(1, 9)), max_size=6))
def test_protocol_core_accounts_for_every_byte_and_fd(messages: list[bytes], negotiated: bool,
                                                      cuts: list[int],
                                                      fd_at: list[tuple[int, int]]) -> None:
    stream = (NEGOTIATE if negotiated else b"") + b"".join(messages)
    # The same stream read three ways: as drawn, in one piece, in 7-byte pieces (the
    # core must not care where the socket reads end).
    plans = (cuts, [len(stream) or 1], [7] * (len(stream) // 7 + 1))
    count("protocol core", len(plans) * len(messages))  # each read of a message: an input
    for plan in plans:
        _feed(stream, plan, fd_at)


def _feed(stream: bytes, cuts: list[int], fd_at: list[tuple[int, int]]) -> None:
    proto = BackendProtocol(DeviceInfo(features=ENGINE_FEATURES,
                                       protocol_features=PROTOCOL_FEATURES, num_queues=2))
    pieces = []
    pos = 0
    for n in cuts:
        if pos >= len(stream):
            break
        pieces.append(stream[pos:pos + n])
        pos += n
    if pos < len(stream):
        pieces.append(stream[pos:])
    next_fd = 1000
    given_fds: list[int] = []
    back: list[int] = []
    fds_for = {i: n for i, n in fd_at}
    error = False
    for i, piece in enumerate(pieces):
        fds = list(range(next_fd, next_fd + fds_for.get(i, 0)))
        next_fd += len(fds)
        given_fds += fds
        try:
            msgs = proto.receive(piece, fds)
        except ProtocolError as e:
            back += e.fds
            error = True
            break
        for m in msgs:
            back += m.fds
            rule = RULES[m.request]
            if proto.answer_local(m) is None and rule.reply is not ReplyKind.BODY:
                proto.ack(m, True)
            BackendProtocol.reply(m, b"x" * 8)
            m.describe()
    if not error:
        back += proto.pending_fds()
    assert sorted(back) == sorted(given_fds), "an fd was lost or duplicated"
