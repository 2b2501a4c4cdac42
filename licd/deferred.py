"""`Deferred`: an outcome that comes later, whose callbacks run the moment it comes.

An asyncio future runs its done-callbacks on a later turn of the event loop, one
scheduled handle each. On the hot path (a commit lands, the engine confirms the lease,
the reply is written) that is a loop turn and a handle per step for nothing. A
`Deferred` calls its callbacks at once, in the order they were added; one that raises
is logged and does not stop the others or whoever settled it. It settles once, with a
value or an exception, is never cancelled, and can be awaited (only the awaiting task
is cancelled then, never the outcome: no `shield` needed).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Generator
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

_PENDING: Any = object()


class Deferred(Generic[T]):
    __slots__ = ("_value", "_error", "_callbacks")

    def __init__(self) -> None:
        self._value: Any = _PENDING
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[Deferred[T]], object]] | None = []

    @classmethod
    def of(cls, value: T) -> Deferred[T]:
        """One already settled with `value`."""
        done: Deferred[T] = cls()
        done._value = value
        done._callbacks = None
        return done

    def done(self) -> bool:
        return self._callbacks is None

    def exception(self) -> BaseException | None:
        if self._callbacks is not None:
            raise asyncio.InvalidStateError("not settled yet")
        return self._error

    def result(self) -> T:
        if self._callbacks is not None:
            raise asyncio.InvalidStateError("not settled yet")
        if self._error is not None:
            raise self._error
        value: T = self._value
        return value

    def add_done_callback(self, fn: Callable[[Deferred[T]], object]) -> None:
        """Call `fn(self)` once settled: at once if it already is."""
        if self._callbacks is None:
            _call(fn, self)
        else:
            self._callbacks.append(fn)

    def settle(self, value: T) -> None:
        self._finish(value, None)

    def fail(self, error: BaseException) -> None:
        self._finish(None, error)

    def _finish(self, value: Any, error: BaseException | None) -> None:
        callbacks = self._callbacks
        if callbacks is None:
            return  # settled already: the first outcome stands
        self._value, self._error, self._callbacks = value, error, None
        for fn in callbacks:
            _call(fn, self)

    def __await__(self) -> Generator[Any, None, T]:
        if self._callbacks is not None:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            def wake(_: Deferred[T]) -> None:
                if not waiter.done():
                    waiter.set_result(None)

            self.add_done_callback(wake)
            yield from waiter
        return self.result()


def _call(fn: Callable[[Deferred[T]], object], done: Deferred[T]) -> None:
    try:
        fn(done)
    except Exception:
        log.exception("event=callback_failed callback=%r", fn)
