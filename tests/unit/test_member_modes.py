"""The member mode table (vhostd/core/member.py), tested as the protocol core's tables are:
every (mode, command) pair has exactly one answer, and the answers are the documented
ones (docs/admin-over-vhost-user.md section 4)."""

from __future__ import annotations

import itertools

import pytest

from vhostd.core.member import (
    MODE_RULES,
    MemberCommand,
    MemberMode,
    Outcome,
    Refusal,
    Step,
    decide,
)

M, C = MemberMode, MemberCommand
EBUSY, Q_INVALID_COMMAND = 16, 1


def test_every_pair_has_an_answer() -> None:
    assert set(MODE_RULES) == set(itertools.product(MemberMode, MemberCommand))


@pytest.mark.parametrize("mode", list(MemberMode))
def test_setting_the_current_mode_does_nothing(mode: MemberMode) -> None:
    command = {M.RUNNING: C.RUN, M.STOPPED: C.STOP, M.FROZEN: C.FREEZE}[mode]
    assert decide(mode, command) == Outcome(mode, ())


def test_stopping_waits_for_the_rings_first() -> None:
    assert decide(M.RUNNING, C.STOP) == Outcome(M.STOPPED, (Step.QUIESCE,))
    # Freezing a running member stops it before the snapshot, so the parts are final.
    assert decide(M.RUNNING, C.FREEZE).steps == (Step.QUIESCE, Step.SNAPSHOT)  # type: ignore[union-attr]
    assert decide(M.STOPPED, C.FREEZE).steps == (Step.SNAPSHOT,)  # type: ignore[union-attr]


def test_resume_applies_staged_parts_then_serves() -> None:
    for mode in (M.STOPPED, M.FROZEN):
        outcome = decide(mode, C.RUN)
        assert isinstance(outcome, Outcome) and outcome.mode is M.RUNNING
        assert outcome.steps[0] is Step.APPLY_STAGED and outcome.steps[-1] is Step.RESUME


def test_parts_set_on_a_running_member_is_refused_busy() -> None:
    refusal = decide(M.RUNNING, C.PARTS_SET)
    assert isinstance(refusal, Refusal)
    assert (refusal.status, refusal.qualifier) == (EBUSY, Q_INVALID_COMMAND)
    for mode in (M.STOPPED, M.FROZEN):
        assert decide(mode, C.PARTS_SET) == Outcome(mode, (Step.STAGE,))


def test_a_frozen_member_reads_its_snapshot() -> None:
    assert decide(M.FROZEN, C.PARTS_GET) == Outcome(M.FROZEN, (Step.READ_SNAPSHOT,))
    assert decide(M.STOPPED, C.PARTS_GET) == Outcome(M.STOPPED, (Step.READ_LIVE,))
    assert decide(M.FROZEN, C.STOP) == Outcome(M.STOPPED, (Step.DROP_SNAPSHOT,))


@pytest.mark.parametrize("mode", list(MemberMode))
def test_a_device_reset_leaves_the_member_running_with_nothing_staged(
        mode: MemberMode) -> None:
    outcome = decide(mode, C.RESET)
    assert isinstance(outcome, Outcome) and outcome.mode is M.RUNNING
    assert set(outcome.steps) == {Step.DROP_SNAPSHOT, Step.DROP_STAGED}


def test_only_parts_set_is_ever_refused() -> None:
    refused = {k for k, v in MODE_RULES.items() if isinstance(v, Refusal)}
    assert refused == {(M.RUNNING, C.PARTS_SET)}
