"""Deferred: callbacks at once and in order, one outcome, awaitable, never cancelled."""

from __future__ import annotations

import asyncio
import logging

import pytest

from licd.deferred import Deferred


def test_callbacks_run_at_once_in_order_when_settled() -> None:
    d: Deferred[int] = Deferred()
    seen: list[str] = []
    d.add_done_callback(lambda x: seen.append(f"a{x.result()}"))
    d.add_done_callback(lambda x: seen.append(f"b{x.result()}"))
    assert not d.done() and seen == []
    d.settle(7)
    assert seen == ["a7", "b7"]  # no event loop turn needed
    d.add_done_callback(lambda x: seen.append("late"))  # already settled: at once
    assert seen == ["a7", "b7", "late"]


def test_the_first_outcome_stands() -> None:
    d: Deferred[int] = Deferred()
    d.fail(RuntimeError("disk"))
    d.settle(1)
    assert isinstance(d.exception(), RuntimeError)
    with pytest.raises(RuntimeError, match="disk"):
        d.result()
    assert Deferred.of(3).result() == 3


def test_unsettled_has_no_result() -> None:
    d: Deferred[int] = Deferred()
    with pytest.raises(asyncio.InvalidStateError):
        d.result()
    with pytest.raises(asyncio.InvalidStateError):
        d.exception()


def test_a_raising_callback_is_logged_and_the_others_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    d: Deferred[None] = Deferred()
    seen: list[int] = []

    def broken(_: Deferred[None]) -> None:
        raise ValueError("boom")

    d.add_done_callback(broken)
    d.add_done_callback(lambda _: seen.append(1))
    with caplog.at_level(logging.ERROR, logger="licd.deferred"):
        d.settle(None)  # does not raise to whoever settles it
    assert seen == [1]
    assert "callback_failed" in caplog.text


async def test_awaiting_and_cancelling_a_waiter_leaves_the_outcome_alone() -> None:
    d: Deferred[str] = Deferred()
    waiter = asyncio.ensure_future(_wait(d))
    impatient = asyncio.ensure_future(_wait(d))
    await asyncio.sleep(0)
    impatient.cancel()
    with pytest.raises(asyncio.CancelledError):
        await impatient
    d.settle("committed")
    assert await waiter == "committed"
    assert d.result() == "committed"
    failed: Deferred[str] = Deferred()
    failed.fail(OSError("gone"))
    with pytest.raises(OSError):
        await failed


async def _wait(d: Deferred[str]) -> str:
    return await d
