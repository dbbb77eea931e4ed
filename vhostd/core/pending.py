"""A result that arrives later, for control paths that wait without blocking the loop.

A vhost-user message handler or an admin command that must wait (for a ring to drain,
for a worker process to give a ring back) returns a :class:`Pending`; whoever answers
the front end (the shell, the owner's admin queue) sends the reply when it resolves.
Callbacks run synchronously in the caller of :meth:`Pending.resolve` or
:meth:`Pending.fail`, so this works on any loop, or none (unit tests).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

T = TypeVar("T")
U = TypeVar("U")

log = logging.getLogger(__name__)


class Pending(Generic[T]):
    __slots__ = ("_callbacks", "_done", "_error", "_value")

    def __init__(self) -> None:
        self._done = False
        self._value: T | None = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[Pending[T]], None]] = []

    @classmethod
    def resolved(cls, value: T) -> Pending[T]:
        p: Pending[T] = cls()
        p.resolve(value)
        return p

    @property
    def done(self) -> bool:
        return self._done

    def resolve(self, value: T) -> None:
        self._finish(value, None)

    def fail(self, error: BaseException) -> None:
        self._finish(None, error)

    def _finish(self, value: T | None, error: BaseException | None) -> None:
        if self._done:
            raise RuntimeError("a Pending resolves once")
        self._done, self._value, self._error = True, value, error
        callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            _call(cb, self)

    def result(self) -> T:
        """The value, or the error raised; only once done."""
        if not self._done:
            raise RuntimeError("not done yet")
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]

    def then(self, callback: Callable[[Pending[T]], None]) -> None:
        """Call ``callback(self)`` once done (now, if it is)."""
        if self._done:
            _call(callback, self)
        else:
            self._callbacks.append(callback)

    def map(self, fn: Callable[[T], U | Pending[U]]) -> Pending[U]:
        """A Pending of ``fn(value)``; an error (here or raised by ``fn``) passes on."""
        out: Pending[U] = Pending()

        def step(p: Pending[T]) -> None:
            try:
                value = fn(p.result())
            except Exception as e:
                out.fail(e)
                return
            settle(out, value)

        self.then(step)
        return out


def settle(target: Pending[T], value: T | Pending[T]) -> None:
    """Resolve ``target`` with ``value``, or with ``value``'s result once it has one."""
    if isinstance(value, Pending):
        value.then(lambda p: _forward(p, target))
    else:
        target.resolve(value)


def _forward(source: Pending[T], target: Pending[T]) -> None:
    try:
        value = source.result()
    except Exception as e:
        target.fail(e)
        return
    target.resolve(value)


def after(value: T | Pending[T], fn: Callable[[T], U | Pending[U]]) -> U | Pending[U]:
    """``fn(value)`` now if ``value`` is here, else a Pending of it: code that usually
    need not wait pays nothing for the case where it must."""
    if isinstance(value, Pending):
        return value.map(fn)
    return fn(value)


def all_of(items: Iterable[Pending[Any] | None]) -> Pending[None] | None:
    """A Pending done when every item is (None when none has to be waited for); the
    first error wins."""
    items = list(items)
    waiting = [p for p in items if p is not None and not p.done]
    errors = [p for p in items if p is not None and p.done and p._error is not None]
    if errors:
        return Pending.resolved(None).map(lambda _: errors[0].result())
    if not waiting:
        return None
    out: Pending[None] = Pending()
    left = [len(waiting)]

    def one(p: Pending[Any]) -> None:
        if out.done:
            return
        if p._error is not None:
            out.fail(p._error)
            return
        left[0] -= 1
        if not left[0]:
            out.resolve(None)

    for p in waiting:
        p.then(one)
    return out


def _call(cb: Callable[[Pending[Any]], None], p: Pending[Any]) -> None:
    try:
        cb(p)
    except Exception:
        # A callback's bug must not stop the others (nor the code that resolved).
        log.exception("internal error in a completion callback")
