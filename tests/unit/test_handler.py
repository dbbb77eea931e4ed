"""The vhost-user handler (vhostd/vhost_user/handler.py) with requests that complete
later, and ring placement (placement.py) with a worker that answers when the test says.

Messages go through the real protocol core; guest RAM is memfd-backed (unit_support); the
device is a Recorder whose requests stay outstanding until the test completes them.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from unit_support import (
    DRIVER_BUF,
    DRIVER_QS,
    F_WRITE,
    Conn,
    FakeDevice,
    FakeLoop,
    GuestRam,
    Recorder,
    config_payload,
    frame,
    inflight_payload,
    negotiate,
    state,
    vring_fd,
)

from vhostd.core.member import MemberMode
from vhostd.core.pending import Pending
from vhostd.core.protocol import RULES, ProtocolError, RingScope
from vhostd.engine.inflight import InflightRegion
from vhostd.engine.virtqueue import PENDING
from vhostd.vhost_user.handler import VhostUserHandler
from vhostd.vhost_user.member import Member
from vhostd.vhost_user.parts import PartsError
from vhostd_proto.device_parts import Part
from vhostd_proto.vhost_user import Request as R

QS = DRIVER_QS
NEED_REPLY = 0x9


@pytest.fixture
def rec() -> Recorder:
    return Recorder(result=PENDING)


@pytest.fixture
def conn(rec: Recorder, ram: GuestRam, eventfd: Callable[[], int]) -> Iterator[Conn]:
    def dup_eventfd() -> int:
        return os.dup(eventfd())

    h = VhostUserHandler(FakeDevice(rec, 2, QS), FakeLoop())
    yield Conn(h, ram, dup_eventfd)


def _reply_num(reply: Any) -> int:
    data, fds = reply
    assert fds == []
    return struct.unpack_from("<II", data, 12)[1]  # VringState: index, num


# ---- waiting for outstanding requests ------------------------------------------------


def test_get_vring_base_waits_for_outstanding_requests(conn: Conn) -> None:
    conn.requests(0, [0, 1, 2])
    q = conn.h.queues[0]
    assert q.outstanding == 3
    reply = conn.send(frame(R.GET_VRING_BASE, state(0)))
    assert isinstance(reply, Pending) and not reply.done
    # No new chain is taken while the ring drains.
    conn.rings[0].desc(3, DRIVER_BUF + 0x30, 1, F_WRITE)
    conn.rings[0].publish(3)
    q.process()
    assert q.outstanding == 3
    q.complete(2, 1)
    q.complete(0, 1)
    assert not reply.done and conn.rings[0].used_elems() == [(2, 1), (0, 1)]
    q.complete(1, 1)
    assert reply.done
    assert _reply_num(reply.result()) == 3  # the chain not taken is the next one
    assert conn.rings[0].used_idx == 3 and not q.started


def test_get_vring_base_without_outstanding_requests_answers_at_once(
        conn: Conn, rec: Recorder) -> None:
    rec.result = 1
    conn.requests(1, [0, 1])
    assert _reply_num(conn.send(frame(R.GET_VRING_BASE, state(1)))) == 2


def test_other_rings_keep_running_while_one_drains(conn: Conn, rec: Recorder) -> None:
    conn.requests(0, [0])
    reply = conn.send(frame(R.GET_VRING_BASE, state(0)))
    assert isinstance(reply, Pending)
    rec.result = 1
    conn.requests(1, [4, 5])
    assert conn.rings[1].used_elems() == [(4, 1), (5, 1)]
    conn.h.queues[0].complete(0, 1)
    assert reply.done


def test_reset_device_waits_then_resets(conn: Conn) -> None:
    conn.requests(0, [0])
    conn.requests(1, [0])
    device = conn.h.device
    reply = conn.send(frame(R.RESET_DEVICE, flags=NEED_REPLY))
    assert isinstance(reply, Pending) and not reply.done
    assert device.resets == 0  # type: ignore[attr-defined]
    conn.h.queues[1].complete(0, 1)
    conn.h.queues[0].complete(0, 1)
    assert reply.done and device.resets == 1  # type: ignore[attr-defined]
    data, _ = reply.result()
    assert struct.unpack_from("<Q", data, 12)[0] == 0  # REPLY_ACK: success
    assert [r.used_idx for r in conn.rings] == [1, 1]  # both completions published


def test_disconnect_waits_and_keeps_memory_until_then(conn: Conn) -> None:
    conn.requests(0, [0, 1])
    done = conn.h.disconnect()
    assert isinstance(done, Pending) and not done.done
    assert conn.h.memory.regions, "memory must stay mapped while requests use it"
    conn.h.queues[0].complete(1, 1)
    conn.h.queues[0].complete(0, 1)
    assert done.done and not conn.h.memory.regions
    # The completions reached the used ring before the rings stopped.
    assert conn.rings[0].used_elems() == [(1, 1), (0, 1)]


def test_a_late_completion_after_a_forced_stop_is_dropped(conn: Conn) -> None:
    conn.requests(0, [0])
    q = conn.h.queues[0]
    q.stop()  # e.g. the daemon stops without waiting: the request stays in flight
    q.complete(0, 1)
    assert q.outstanding == 0 and conn.rings[0].used_idx == 0


# ---- ring placement: a worker that answers when told -------------------------------


class SlowWorker:
    """A queue worker whose answers the test delivers."""

    name = "slow"

    def __init__(self) -> None:
        self.serving: dict[str, Any] = {}
        self.calls: list[tuple[str, list[str]]] = []
        self.waiting: list[Callable[[], None]] = []

    def run(self, key: str, spec: Any, fds: list[int], done: Callable[[str | None], None]
            ) -> None:
        self.calls.append(("run", [key]))
        self.serving[key] = spec
        done(None)

    def recall(self, keys: list[str], done: Callable[[Any, str | None], None]) -> None:
        self.calls.append(("recall", keys))

        def answer() -> None:
            done({k: {"ring": self.serving.pop(k)["ring"], "log_marked": 0, "tracker": None}
                  for k in keys}, None)

        self.waiting.append(answer)

    def stats(self, keys: list[str], done: Callable[[Any, str | None], None]) -> None:
        self.calls.append(("stats", keys))
        done({k: {"requests": 42, "kicks": 1, "outstanding": 0, "line": f"{k} live"}
              for k in keys}, None)

    def answer(self) -> None:
        waiting, self.waiting = self.waiting, []
        for a in waiting:
            a()


@pytest.fixture
def placed(rec: Recorder, ram: GuestRam, eventfd: Callable[[], int]) -> tuple[Conn, SlowWorker]:
    """Ring 1 served by a slow worker, ring 0 here."""
    rec.result = 1
    worker = SlowWorker()
    h = VhostUserHandler(FakeDevice(rec, 2, QS), FakeLoop())
    h.placement.assign([None, worker])

    def dup_eventfd() -> int:
        return os.dup(eventfd())

    conn = Conn(h, ram, dup_eventfd)
    assert h.placement.where(1) == "slow" and h.placement.where(0) is None
    return conn, worker


def test_messages_that_touch_no_ring_never_call_rings_back(
        placed: tuple[Conn, SlowWorker]) -> None:
    conn, worker = placed
    worker.calls.clear()
    reply = conn.send(frame(R.GET_CONFIG, config_payload(0, 8)))
    assert not isinstance(reply, Pending)
    reply = conn.send(frame(R.SET_VRING_CALL, vring_fd(0)), [os.eventfd(0)])  # ring 0
    assert not isinstance(reply, Pending)
    assert worker.calls == []


def test_a_ring_message_waits_for_its_ring_only(placed: tuple[Conn, SlowWorker],
                                                rec: Recorder) -> None:
    conn, worker = placed
    worker.calls.clear()
    reply = conn.send(frame(R.SET_VRING_CALL, vring_fd(1, nofd=True), flags=NEED_REPLY))
    assert isinstance(reply, Pending) and not reply.done
    assert worker.calls == [("recall", ["fake/1"])]
    # Meanwhile ring 0 serves its guest.
    conn.requests(0, [0])
    assert conn.rings[0].used_elems() == [(0, 1)]
    worker.answer()
    assert reply.done
    # The ring leaves again once the message is done.
    assert worker.calls[-1] == ("run", ["fake/1"])
    assert conn.h.placement.where(1) == "slow"


def test_statistics_are_read_where_rings_run(placed: tuple[Conn, SlowWorker]) -> None:
    conn, worker = placed
    conn.requests(0, [0, 1])
    stats = conn.h.placement.stats()
    s0, s1 = stats.result() if isinstance(stats, Pending) else stats
    assert s0["requests"] == 2 and s0["where"] is None
    assert s1["requests"] == 42 and s1["where"] == "slow"
    assert ("recall", ["fake/1"]) not in worker.calls


def test_the_rings_column_of_the_core_rules() -> None:
    """Only messages that read or change ring state call rings back."""
    none = {r for r, rule in RULES.items() if rule.rings is RingScope.NONE}
    assert none == {R.GET_FEATURES, R.SET_OWNER, R.GET_PROTOCOL_FEATURES,
                    R.SET_PROTOCOL_FEATURES, R.GET_QUEUE_NUM, R.GET_MAX_MEM_SLOTS,
                    R.SET_BACKEND_REQ_FD, R.GET_CONFIG, R.GET_INFLIGHT_FD}
    one = {r for r, rule in RULES.items() if rule.rings is RingScope.ONE}
    assert all(RULES[r].ring is not None for r in one)
    assert R.GET_VRING_BASE in one and R.SET_VRING_KICK in one


# ---- holds end on every path; replies are never lost -----------------------------------


def _placed_handler(worker: Any) -> VhostUserHandler:
    h = VhostUserHandler(FakeDevice(Recorder(result=1), 2, QS), FakeLoop())
    h.placement.assign([None, worker])
    return h


@pytest.mark.parametrize("bad", [state(1, 3), state(1, 7)], ids=["num-3", "enable-7"])
def test_a_failing_ring_message_does_not_keep_its_ring_home(
        ram: GuestRam, eventfd: Callable[[], int], bad: bytes) -> None:
    worker = SlowWorker()
    h = _placed_handler(worker)
    proto = h.connect()
    negotiate(proto)
    request = R.SET_VRING_NUM if bad == state(1, 3) else R.SET_VRING_ENABLE
    [msg] = proto.receive(frame(request, bad), [])
    with pytest.raises(ProtocolError):
        h.handle(msg)
    assert not h.placement.held(1)
    assert h.disconnect() is None
    Conn(h, ram, lambda: os.dup(eventfd()))
    assert h.placement.where(1) == "slow", "ring 1 never goes to its worker"


def test_a_refused_parts_set_does_not_keep_the_rings_home(
        ram: GuestRam, eventfd: Callable[[], int]) -> None:
    worker = SlowWorker()
    h = _placed_handler(worker)
    Conn(h, ram, lambda: os.dup(eventfd()))
    member = Member(h)
    stop = member.set_mode(MemberMode.STOPPED)
    assert isinstance(stop, Pending)
    worker.answer()
    assert stop.done
    with pytest.raises(PartsError):
        member.stage_parts([Part(0x7777, 0, bytes(8), b"\0")])
    assert member.set_mode(MemberMode.RUNNING) is None
    assert not h.placement.held(1) and h.placement.where(1) == "slow"


class FailingRunWorker(SlowWorker):
    fail = False

    def run(self, key: str, spec: Any, fds: list[int], done: Callable[[str | None], None]
            ) -> None:
        if self.fail:
            raise OSError(24, "Too many open files")
        super().run(key, spec, fds, done)


def test_the_reply_is_sent_even_if_the_ring_cannot_leave_again(
        ram: GuestRam, eventfd: Callable[[], int]) -> None:
    worker = FailingRunWorker()
    h = _placed_handler(worker)
    conn = Conn(h, ram, lambda: os.dup(eventfd()))
    reply = conn.send(frame(R.SET_VRING_CALL, vring_fd(1, nofd=True), flags=NEED_REPLY))
    assert isinstance(reply, Pending)
    worker.fail = True
    worker.answer()
    assert reply.done and reply.result() is not None
    # The ring could not go back: this process serves it, and watches its kicks.
    assert h.placement.where(1) is None and h.placement.served_here(1)
    assert h.queues[1].kick_fd in h.loop.readers  # type: ignore[attr-defined]


def test_restarting_a_ring_waits_for_its_outstanding_requests(
        conn: Conn, rec: Recorder, eventfd: Callable[[], int]) -> None:
    fd, size = InflightRegion.create(2, QS)
    conn.send(frame(R.SET_INFLIGHT_FD, inflight_payload(size, 0, 2, QS)), [fd])
    conn.send(frame(R.SET_VRING_KICK, vring_fd(0)), [os.dup(eventfd())])
    conn.requests(0, [0, 1])
    q = conn.h.queues[0]
    assert q.outstanding == 2 and rec.heads == [0, 1]
    again = conn.send(frame(R.SET_VRING_KICK, vring_fd(0), flags=NEED_REPLY),
                      [os.dup(eventfd())])
    assert isinstance(again, Pending) and not again.done
    q.complete(0, 1)
    q.complete(1, 1)
    assert again.done
    assert rec.heads == [0, 1], "requests still at the device were handed to it again"
    assert conn.rings[0].used_elems() == [(0, 1), (1, 1)]
