"""The owner's admin queue while a member's stop waits for requests still at its storage
(vhostd/devices/owner.py, vhostd/vhost_user/member.py): the command completes later, the
admin queue answers commands for other members meanwhile, and commands for the same
member wait their turn."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

from unit_support import Conn, FakeDevice, FakeLoop, GuestRam, Recorder

from vhostd.core.member import MemberMode
from vhostd.core.pending import Pending
from vhostd.devices.owner import AdminCommands
from vhostd.engine.virtqueue import PENDING
from vhostd.vhost_user.handler import VhostUserHandler
from vhostd.vhost_user.member import Member

SRIOV = 1
LIST_USE, MODE_SET = 0x1, 0x11
STOP, RESUME = 0x01, 0x00
OK = 0


def command(opcode: int, member: int, data: bytes = b"") -> bytes:
    return struct.pack("<HH12xQ", opcode, SRIOV, member) + data


def test_a_stop_waits_for_outstanding_requests_and_others_go_on(
        ram: GuestRam, eventfd: Callable[[], int]) -> None:
    slow_rec = Recorder(result=PENDING)
    slow = VhostUserHandler(FakeDevice(slow_rec, 2, 8), FakeLoop())
    fast = VhostUserHandler(FakeDevice(Recorder(result=1), 2, 8), FakeLoop())
    conn = Conn(slow, ram, lambda: os.dup(eventfd()))
    members = [Member(slow), Member(fast)]
    admin = AdminCommands(members)
    admin.execute(command(LIST_USE, 0, (1 << 0x11 | 3).to_bytes(8, "little")), 0)
    conn.requests(0, [0, 1])
    assert slow.queues[0].outstanding == 2

    stop1 = admin.execute(command(MODE_SET, 1, bytes([STOP])), 0)
    assert isinstance(stop1, Pending) and not stop1.done
    # The member takes nothing new meanwhile.
    conn.requests(1, [0])
    assert slow.queues[1].outstanding == 0
    # Member 2 is not held up.
    assert admin.execute(command(MODE_SET, 2, bytes([STOP])), 0) == (OK, 0, b"")
    assert members[1].mode is MemberMode.STOPPED
    # A second command for member 1 waits its turn.
    resume1 = admin.execute(command(MODE_SET, 1, bytes([RESUME])), 0)
    assert isinstance(resume1, Pending) and not resume1.done

    slow.queues[0].complete(1, 1)
    assert not stop1.done
    slow.queues[0].complete(0, 1)
    assert stop1.result() == (OK, 0, b"")
    assert conn.rings[0].used_elems() == [(1, 1), (0, 1)]  # published before "stopped"
    assert resume1.result() == (OK, 0, b"")
    assert members[0].mode is MemberMode.RUNNING
    slow.loop.run_soon()  # type: ignore[attr-defined]  # resume looks at the rings soon
    assert slow_rec.heads[-1] == 0 and slow.queues[1].outstanding == 1


def test_a_stop_waiting_through_the_members_own_reset_still_stops_it(
        ram: GuestRam, eventfd: Callable[[], int]) -> None:
    from unit_support import frame

    from vhostd_proto.vhost_user import Request as R

    h = VhostUserHandler(FakeDevice(Recorder(result=PENDING), 2, 8), FakeLoop())
    conn = Conn(h, ram, lambda: os.dup(eventfd()))
    member = Member(h)
    conn.requests(0, [0])
    reset = conn.send(frame(R.RESET_DEVICE, flags=0x9))
    assert isinstance(reset, Pending) and not reset.done
    stop = member.set_mode(MemberMode.STOPPED)
    assert isinstance(stop, Pending) and not stop.done
    h.queues[0].complete(0, 1)
    assert reset.done and stop.done
    # The reset came first and unpaused the device; the stop then stopped it again.
    assert member.mode is MemberMode.STOPPED and h.paused


def test_commands_for_one_member_complete_in_queue_order(
        ram: GuestRam, eventfd: Callable[[], int]) -> None:
    slow = VhostUserHandler(FakeDevice(Recorder(result=PENDING), 2, 8), FakeLoop())
    conn = Conn(slow, ram, lambda: os.dup(eventfd()))
    admin = AdminCommands([Member(slow)])
    admin.execute(command(LIST_USE, 0, (1 << 0x11 | 3).to_bytes(8, "little")), 0)
    conn.requests(0, [0])
    order: list[str] = []
    stop = admin.execute(command(MODE_SET, 1, bytes([STOP])), 0)
    again = admin.execute(command(MODE_SET, 1, bytes([STOP])), 0)  # done at once when run
    assert isinstance(stop, Pending) and isinstance(again, Pending)
    stop.then(lambda p: order.append("first"))
    again.then(lambda p: order.append("second"))
    slow.queues[0].complete(0, 1)
    assert order == ["first", "second"]
