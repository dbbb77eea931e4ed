"""A member device as its owner sees it: mode, device parts, staging, write tracking.

The owner device (``vhostd/devices/owner.py``) manages its members through this class
alone. What each command may do in each mode is data (``vhostd/core/member.py``
``MODE_RULES``); this module carries out the steps on the member's
:class:`~vhostd.vhost_user.handler.VhostUserHandler`. Every command may have to wait
(rings coming home from a queue worker, a stop waiting for requests still at the
storage): it then returns a :class:`~vhostd.core.pending.Pending`, and the owner
completes its admin command when it resolves, while its admin queue, the other members
and this member's own front end keep being served.
"""

from __future__ import annotations

import logging
from typing import Any

from vhostd_proto.device_parts import Part

from ..core import events
from ..core.member import MemberCommand, MemberMode, Outcome, Refusal, Step, decide
from ..core.pending import Pending, after
from ..engine.dirtytrack import WriteTracker
from ..engine.packed import PackedVirtqueue
from .handler import VhostUserHandler
from .parts import VHOST_ONLY_FEATURES, PartsError, StagedParts
from .parts import check as check_parts
from .parts import collect as collect_parts

log = logging.getLogger(__name__)


class TrackerBusy(Exception):
    """Write tracking is already on for this member."""


class Member:
    """One member device of an owner."""

    def __init__(self, handler: VhostUserHandler) -> None:
        self.handler = handler
        self.name = handler.name
        self.log = handler.log
        self.mode = MemberMode.RUNNING
        self.staged: StagedParts | None = None
        self.frozen_parts: list[Part] | None = None
        handler.reset_listeners.append(self._front_end_reset)

    @property
    def tracker(self) -> WriteTracker | None:
        return self.handler.tracker

    # ---- the mode table --------------------------------------------------------
    def _decide(self, command: MemberCommand) -> Outcome:
        outcome = decide(self.mode, command)
        if isinstance(outcome, Refusal):
            raise PartsError(f"{self.name}: {outcome.why}", outcome.status, outcome.qualifier)
        return outcome

    def _everything(self) -> range:
        return range(len(self.handler.queues))

    def _with_rings_home(self, work: Any) -> Any:
        """``work()`` with every ring of the member in this process (now, or later as a
        Pending); the rings may leave again after it."""
        rings = self._everything()
        placement = self.handler.placement
        try:
            result = after(placement.hold(rings), lambda _: work())
        except BaseException:
            self.handler._release(rings)
            raise
        if isinstance(result, Pending):
            result.then(lambda _: self.handler._release(rings))
        else:
            self.handler._release(rings)
        return result

    def set_mode(self, mode: MemberMode) -> Pending[None] | None:
        """DEV_MODE_SET: run, stop or freeze. A stop completes once every request the
        member took has completed; meanwhile it takes none."""
        command = {MemberMode.RUNNING: MemberCommand.RUN, MemberMode.STOPPED: MemberCommand.STOP,
                   MemberMode.FROZEN: MemberCommand.FREEZE}[mode]
        outcome = self._decide(command)
        if not outcome.steps:
            return None
        return self._with_rings_home(lambda: self._run_steps(outcome))  # type: ignore[no-any-return]

    def _run_steps(self, outcome: Outcome) -> Pending[None] | None:
        steps = list(outcome.steps)
        before = self.mode

        def run_from(i: int) -> Pending[None] | None:
            while i < len(steps):
                step = steps[i]
                i += 1
                waiting = self._step(step)
                if waiting is not None:
                    if step is Step.QUIESCE:
                        # The member's front end may reset the device while the stop
                        # waits (a reset unpauses it): stop it again then.
                        return waiting.map(lambda _, i=i: run_from(
                            i if self.handler.paused else i - 1))
                    return waiting.map(lambda _, i=i: run_from(i))
            self.mode = outcome.mode
            if before is not outcome.mode:
                self.log.info("%s by the owner", {MemberMode.RUNNING: "resumed",
                                                  MemberMode.STOPPED: "stopped",
                                                  MemberMode.FROZEN: "frozen"}[outcome.mode])
                events.emit(events.MEMBER_MODE_CHANGE, device=self.name,
                            mode=outcome.mode.value, previous=before.value)
            return None

        return run_from(0)

    def _step(self, step: Step) -> Pending[None] | None:
        h = self.handler
        if step is Step.QUIESCE:
            return h.pause()
        if step is Step.SNAPSHOT:
            self.frozen_parts = collect_parts(h)
        elif step is Step.DROP_SNAPSHOT:
            self.frozen_parts = None
        elif step is Step.APPLY_STAGED:
            if self.staged is not None:
                try:
                    self._apply_staged(self.staged)
                except ValueError as e:
                    # The member stays stopped with its parts still staged; the owner's
                    # command fails and may be retried.
                    raise PartsError(f"cannot apply the parts: {e}") from e
                self.log.info("new parts applied")
                self.staged = None
        elif step is Step.DROP_STAGED:
            self.staged = None
        elif step is Step.RESUME:
            h.unpause()
        else:
            raise ValueError(f"{step} is not a mode step")
        return None

    def _front_end_reset(self) -> None:
        """The member's front end reset the device: every part is back to its default
        and the member runs (the handler has unpaused it)."""
        for step in self._decide(MemberCommand.RESET).steps:
            self._step(step)
        if self.mode is not MemberMode.RUNNING:
            events.emit(events.MEMBER_MODE_CHANGE, device=self.name,
                        mode=MemberMode.RUNNING.value, previous=self.mode.value)
        self.mode = MemberMode.RUNNING

    # ---- device parts ----------------------------------------------------------------
    def parts(self) -> list[Part] | Pending[list[Part]]:
        """DEV_PARTS_GET: the member's parts now (a frozen member's snapshot)."""
        outcome = self._decide(MemberCommand.PARTS_GET)
        if Step.READ_SNAPSHOT in outcome.steps:
            assert self.frozen_parts is not None
            return list(self.frozen_parts)
        return self._with_rings_home(lambda: collect_parts(self.handler))  # type: ignore[no-any-return]

    def stage_parts(self, parts: list[Part]) -> Pending[None] | None:
        """DEV_PARTS_SET: check everything, change nothing until resume."""
        self._decide(MemberCommand.PARTS_SET)

        def stage() -> None:
            staged = check_parts(self.handler, parts)
            if self.staged is None:
                self.staged = staged
            else:
                self.staged.merge(staged)

        return self._with_rings_home(stage)  # type: ignore[no-any-return]

    def _apply_staged(self, staged: StagedParts) -> None:
        h = self.handler
        if staged.drv_features is not None:
            keep = h.features & VHOST_ONLY_FEATURES
            h.apply_features(staged.drv_features | keep)
        if staged.status is not None:
            h.status = staged.status
        for index, cfg in staged.vq_cfg.items():
            q = h.queues[index]
            if q.started:
                q.stop()
            if cfg.queue_size:
                q.size = cfg.queue_size
                q.set_gpa(cfg.queue_desc, cfg.queue_driver, cfg.queue_device)
            else:
                q.unconfigure()
            q.vector = cfg.vector
            q.enabled = bool(cfg.enabled)
        for ptype, value in staged.device.items():
            h.device.apply_part(ptype, value)
        for q in h.queues:
            state = staged.vq_state.get(q.index)
            reconfigured = q.index in staged.vq_cfg
            if (reconfigured or state is not None) and q.kick_fd is not None and q.configured:
                q.start(h.memory)
            if state is not None:
                if isinstance(q, PackedVirtqueue):
                    q.set_base(state.last_avail_idx | state.avail_wrap_counter << 15
                               | (state.used_idx | state.used_wrap_counter << 15) << 16)
                else:
                    q.last_avail_idx = state.last_avail_idx
                    if q.used is None:
                        q.used_idx = state.used_idx

    # ---- device-side write tracking (owner vendor commands) ------------------------
    def start_tracking(self, page_size: int, ranges: list[tuple[int, int]]
                       ) -> Pending[None] | None:
        if self.handler.tracker is not None:
            raise TrackerBusy("this member already tracks writes")
        tracker = WriteTracker(page_size, ranges)

        def start() -> None:
            self.handler.tracker = tracker
            for q in self.handler.queues:
                q.tracker = tracker
            self.log.info("tracking writes to %d range(s) at %d-byte pages", len(ranges),
                          page_size)

        return self._with_rings_home(start)  # type: ignore[no-any-return]

    def stop_tracking(self) -> Pending[None] | None:
        if self.handler.tracker is None:
            return None

        def stop() -> None:
            tracker = self.handler.tracker
            if tracker is None:
                return
            self.log.info("write tracking stopped (%d page marks)", tracker.marked)
            self.handler.tracker = None
            for q in self.handler.queues:
                q.tracker = None

        return self._with_rings_home(stop)  # type: ignore[no-any-return]

    def tracking_report(self, clear: bool) -> bytes | Pending[bytes]:
        """The tracker's report, with the marks workers made so far (their rings come
        home for it)."""

        def report() -> bytes:
            tracker = self.handler.tracker
            if tracker is None:
                raise PartsError(f"{self.name} stopped tracking writes")
            return tracker.report(clear)

        return self._with_rings_home(report)  # type: ignore[no-any-return]
