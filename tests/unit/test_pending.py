"""Pending results (vhostd/core/pending.py)."""

from __future__ import annotations

import pytest

from vhostd.core.pending import Pending, after, all_of, settle


def test_callbacks_run_once_done_and_at_once_after() -> None:
    p: Pending[int] = Pending()
    seen: list[int] = []
    p.then(lambda q: seen.append(q.result()))
    assert seen == [] and not p.done
    p.resolve(3)
    p.then(lambda q: seen.append(q.result() * 10))
    assert seen == [3, 30]
    with pytest.raises(RuntimeError):
        p.resolve(4)


def test_map_chains_values_pendings_and_errors() -> None:
    p: Pending[int] = Pending()
    inner: Pending[str] = Pending()
    out = p.map(lambda v: inner).map(lambda s: s + "!")
    p.resolve(1)
    assert not out.done
    inner.resolve("ok")
    assert out.result() == "ok!"

    bad: Pending[int] = Pending()
    failed = bad.map(lambda v: 1 // v)
    bad.resolve(0)
    with pytest.raises(ZeroDivisionError):
        failed.result()


def test_after_runs_now_for_plain_values() -> None:
    assert after(2, lambda v: v + 1) == 3
    p: Pending[int] = Pending()
    later = after(p, lambda v: v + 1)
    assert isinstance(later, Pending)
    p.resolve(2)
    assert later.result() == 3


def test_all_of() -> None:
    assert all_of([None, Pending.resolved(1)]) is None
    a: Pending[int] = Pending()
    b: Pending[int] = Pending()
    both = all_of([a, None, b])
    assert both is not None
    a.resolve(1)
    assert not both.done
    b.resolve(2)
    assert both.done
    c: Pending[int] = Pending()
    either = all_of([c])
    assert either is not None
    c.fail(ValueError("x"))
    with pytest.raises(ValueError):
        either.result()


def test_a_failing_callback_does_not_stop_the_others() -> None:
    p: Pending[int] = Pending()
    seen: list[int] = []

    def broken(q: Pending[int]) -> None:
        raise RuntimeError("bug")

    p.then(broken)
    p.then(lambda q: seen.append(q.result()))
    p.resolve(5)
    assert seen == [5]


def test_settle_forwards() -> None:
    target: Pending[int] = Pending()
    source: Pending[int] = Pending()
    settle(target, source)
    source.resolve(9)
    assert target.result() == 9
