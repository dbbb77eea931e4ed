"""Member modes as data: what each owner command does to a member in each mode.

A member (a device the owner manages) is running, stopped, or frozen (vhostd's
extension: stopped, with its device parts snapshotted and final). :data:`MODE_RULES`
says, for every (mode, command) pair, whether the command is legal, the mode that
follows, and the steps the member takes, in order; an illegal pair names the admin
status to return. ``vhostd/vhost_user/member.py`` carries the steps out and nothing
else decides legality, as :mod:`vhostd.core.protocol` does for vhost-user messages.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from vhostd_proto.virtio_admin import AdminQualifier as Q
from vhostd_proto.virtio_admin import AdminStatus as S


class MemberMode(enum.Enum):
    RUNNING = "running"
    STOPPED = "stopped"
    FROZEN = "frozen"  # stopped, and the parts are final


class MemberCommand(enum.Enum):
    RUN = "run"  # DEV_MODE_SET flags 0
    STOP = "stop"  # DEV_MODE_SET STOPPED
    FREEZE = "freeze"  # DEV_MODE_SET STOPPED | FROZEN
    PARTS_GET = "parts-get"  # DEV_PARTS_GET, DEV_PARTS_METADATA_GET
    PARTS_SET = "parts-set"  # DEV_PARTS_SET
    RESET = "reset"  # the member's own front end resets the device


class Step(enum.Enum):
    QUIESCE = "quiesce"  # stop taking requests; done when every taken one completed
    SNAPSHOT = "snapshot"  # freeze the current parts
    DROP_SNAPSHOT = "drop-snapshot"
    READ_LIVE = "read-live"  # collect the parts now
    READ_SNAPSHOT = "read-snapshot"
    STAGE = "stage"  # check the parts and keep them for resume
    APPLY_STAGED = "apply-staged"
    DROP_STAGED = "drop-staged"
    RESUME = "resume"  # serve the rings again (scheduled, not run inside the command)


@dataclass(frozen=True)
class Outcome:
    """A legal command: the mode after it and the steps, in order. If a step fails the
    command fails and the mode stays."""

    mode: MemberMode
    steps: tuple[Step, ...] = ()


@dataclass(frozen=True)
class Refusal:
    """An illegal command: the admin status and qualifier to answer with."""

    status: int
    qualifier: int
    why: str


M, C = MemberMode, MemberCommand
_BUSY = Refusal(S.VIRTIO_ADMIN_STATUS_EBUSY, Q.VIRTIO_ADMIN_STATUS_Q_INVALID_COMMAND,
                "the member is running; stop it first")

MODE_RULES: dict[tuple[MemberMode, MemberCommand], Outcome | Refusal] = {
    (M.RUNNING, C.RUN): Outcome(M.RUNNING),
    (M.RUNNING, C.STOP): Outcome(M.STOPPED, (Step.QUIESCE,)),
    (M.RUNNING, C.FREEZE): Outcome(M.FROZEN, (Step.QUIESCE, Step.SNAPSHOT)),
    (M.RUNNING, C.PARTS_GET): Outcome(M.RUNNING, (Step.READ_LIVE,)),
    (M.RUNNING, C.PARTS_SET): _BUSY,
    (M.STOPPED, C.RUN): Outcome(M.RUNNING, (Step.APPLY_STAGED, Step.RESUME)),
    (M.STOPPED, C.STOP): Outcome(M.STOPPED),
    (M.STOPPED, C.FREEZE): Outcome(M.FROZEN, (Step.SNAPSHOT,)),
    (M.STOPPED, C.PARTS_GET): Outcome(M.STOPPED, (Step.READ_LIVE,)),
    (M.STOPPED, C.PARTS_SET): Outcome(M.STOPPED, (Step.STAGE,)),
    # A resume whose staged parts cannot be applied fails and changes nothing: the mode
    # (and a freeze's snapshot) stay.
    (M.FROZEN, C.RUN): Outcome(M.RUNNING, (Step.APPLY_STAGED, Step.DROP_SNAPSHOT, Step.RESUME)),
    (M.FROZEN, C.STOP): Outcome(M.STOPPED, (Step.DROP_SNAPSHOT,)),
    (M.FROZEN, C.FREEZE): Outcome(M.FROZEN),
    (M.FROZEN, C.PARTS_GET): Outcome(M.FROZEN, (Step.READ_SNAPSHOT,)),
    (M.FROZEN, C.PARTS_SET): Outcome(M.FROZEN, (Step.STAGE,)),
    # A device reset returns every part to its default and leaves the member running.
    **{(mode, C.RESET): Outcome(M.RUNNING, (Step.DROP_SNAPSHOT, Step.DROP_STAGED))
       for mode in MemberMode},
}


def decide(mode: MemberMode, command: MemberCommand) -> Outcome | Refusal:
    return MODE_RULES[mode, command]
