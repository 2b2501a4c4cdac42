"""The group-commit writer on its own, over a fake database whose transactions the test
sees, gates and fails: batching, failure isolation, lazy writes, closing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import pytest

from licd.deferred import Deferred
from licd.store.writer import MAX_BATCH, MAX_RENEWALS, GroupCommitWriter


class Refused(Exception):
    """What a caller whose mutations failed is told (the writer's `failure`)."""


class FakeDatabase:
    """Commits lists of strings; a mutation starting with "bad" fails its transaction.
    `hold()` keeps the next transactions waiting until `release()`."""

    def __init__(self) -> None:
        self.committed: list[list[str]] = []
        self.tried: list[list[str]] = []
        self._gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    def hold(self) -> None:
        self._gate = asyncio.Event()
        self.entered.clear()

    def release(self) -> None:
        assert self._gate is not None
        self._gate.set()
        self._gate = None

    async def transaction(self, mutations: list[str]) -> None:
        self.tried.append(list(mutations))
        self.entered.set()
        if self._gate is not None:
            await self._gate.wait()
        bad = [m for m in mutations if m.startswith("bad")]
        if bad:
            raise ValueError(f"cannot write {bad[0]}")
        self.committed.append(list(mutations))


class Ticks:
    """The writer's monotonic clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


Writer = GroupCommitWriter[str]


def make(db: FakeDatabase, clock: Ticks | None = None, lazy_interval: float = 3600.0) -> Writer:
    return GroupCommitWriter(
        db.transaction,
        failure=lambda exc: Refused(str(exc)),
        lazy_interval=lazy_interval,
        clock=clock or Ticks(),
    )


@contextlib.asynccontextmanager
async def running(writer: Writer) -> AsyncIterator[Writer]:
    task = asyncio.create_task(writer.run())
    try:
        yield writer
    finally:
        await writer.close()
        await task


async def settled(*done: Deferred[None]) -> list[BaseException | None]:
    """Each outcome: None once committed, else the error (bounded wait)."""
    out: list[BaseException | None] = []
    async with asyncio.timeout(5.0):
        for d in done:
            try:
                await d
                out.append(None)
            except Exception as exc:
                out.append(exc)
    return out


async def test_what_is_queued_meanwhile_commits_in_one_transaction_in_order() -> None:
    db = FakeDatabase()
    writer = make(db)
    done = [writer.submit([f"a{n}", f"b{n}"]) for n in range(3)]  # before the writer runs
    async with running(writer):
        assert await settled(*done) == [None, None, None]
    assert db.committed == [["a0", "b0", "a1", "b1", "a2", "b2"]]
    assert writer.transactions == 1


async def test_a_caller_is_settled_only_once_its_transaction_has_committed() -> None:
    db = FakeDatabase()
    async with running(make(db)) as writer:
        db.hold()
        first = writer.submit(["x"])
        async with asyncio.timeout(5.0):
            await db.entered.wait()
        second = writer.submit(["y"])  # queued while the first commits: the next batch
        assert not first.done() and not second.done()
        db.release()
        assert await settled(first, second) == [None, None]
    assert db.committed == [["x"], ["y"]]


async def test_at_most_max_batch_callers_per_transaction() -> None:
    db = FakeDatabase()
    writer = make(db)
    done = [writer.submit([f"m{n}"]) for n in range(MAX_BATCH + 5)]
    async with running(writer):
        await settled(*done)
    assert [len(batch) for batch in db.committed] == [MAX_BATCH, 5]


async def test_one_failing_caller_fails_alone_and_the_others_commit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    db = FakeDatabase()
    writer = make(db)
    done = [writer.submit(["a"]), writer.submit(["bad-b", "c"]), writer.submit(["d"])]
    with caplog.at_level(logging.WARNING, logger="licd.store.writer"):
        async with running(writer):
            outcomes = await settled(*done)
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], Refused) and "cannot write bad-b" in str(outcomes[1])
    # The batch, then each caller alone: "c" went down with its caller's "bad-b".
    assert db.tried[0] == ["a", "bad-b", "c", "d"]
    assert db.committed == [["a"], ["d"]]
    assert "event=batch_failed size=3" in caplog.text


async def test_later_writes_go_first_with_the_next_batch() -> None:
    db = FakeDatabase()
    writer = make(db)
    writer.later("denial-1")
    writer.later("denial-2")
    done = writer.submit(["checkout"])
    async with running(writer):
        await settled(done)
        assert db.committed == [["denial-1", "denial-2", "checkout"]]


async def test_renewals_wait_for_their_interval_and_a_newer_one_replaces_the_older() -> None:
    db, clock = FakeDatabase(), Ticks()
    async with running(make(db, clock, lazy_interval=60.0)) as writer:
        writer.renew("lease-a", "a@1")
        clock.now += 30
        writer.renew("lease-b", "b@1")
        writer.renew("lease-a", "a@2")  # replaces a@1, keeps its place (the oldest)
        await settled(writer.submit(["x"]))  # not due yet: the batch goes alone
        clock.now += 30  # the interval of the oldest is up: both ride along
        await settled(writer.submit(["y"]))
        assert db.committed == [["x"], ["a@2", "b@1", "y"]]


async def test_due_renewals_go_in_chunks_and_closing_writes_the_rest() -> None:
    db, clock = FakeDatabase(), Ticks()
    writer = make(db, clock, lazy_interval=60.0)
    async with running(writer):
        for n in range(MAX_RENEWALS + 7):
            writer.renew(f"lease-{n}", f"r{n}")
        clock.now += 60
        await settled(writer.submit(["x"]))  # the oldest MAX_RENEWALS go with it
        writer.renew("lease-late", "late")  # not due, but closing writes it
    assert db.committed[0] == [f"r{n}" for n in range(MAX_RENEWALS)] + ["x"]
    assert [m for batch in db.committed[1:] for m in batch] == [
        *(f"r{n}" for n in range(MAX_RENEWALS, MAX_RENEWALS + 7)),
        "late",
    ]


async def test_lazy_writes_of_a_failed_batch_are_tried_alone_and_dropped_if_they_fail(
    caplog: pytest.LogCaptureFixture,
) -> None:
    db = FakeDatabase()
    writer = make(db)
    writer.later("denial")
    writer.later("bad-entry")
    done = [writer.submit(["a"]), writer.submit(["b"])]
    with caplog.at_level(logging.ERROR, logger="licd.store.writer"):
        async with running(writer):
            assert await settled(*done) == [None, None]
    assert db.tried[:2] == [["denial", "bad-entry", "a", "b"], ["denial", "bad-entry"]]
    assert db.committed == [["a", "b"]]  # the callers never pay for a lazy write
    assert "event=lazy_writes_dropped" in caplog.text


async def test_an_idle_writer_writes_a_later_one_within_the_interval() -> None:
    db = FakeDatabase()
    async with running(make(db, lazy_interval=0.05)) as writer:
        await settled(writer.submit(["x"]))  # the writer is idle after this
        writer.later("denial")  # nothing else comes to carry it: its timer does
        async with asyncio.timeout(5.0):
            await db.entered.wait()
            while db.committed[-1:] != [["denial"]]:  # noqa: ASYNC110
                await asyncio.sleep(0.01)


async def test_close_commits_what_is_queued_then_refuses_more() -> None:
    db = FakeDatabase()
    writer = make(db)
    task = asyncio.create_task(writer.run())
    await asyncio.sleep(0)  # the writer runs, idle
    done = writer.submit(["last"])
    writer.later("denial")
    assert await writer.close() is True
    await task
    assert done.done() and db.committed == [["denial", "last"]]
    with pytest.raises(RuntimeError, match="closed"):
        writer.submit(["more"])


async def test_close_within_gives_up_on_a_stuck_transaction_and_fails_the_waiting() -> None:
    db = FakeDatabase()
    writer = make(db)
    task = asyncio.create_task(writer.run())
    db.hold()  # the disk never answers
    stuck = writer.submit(["stuck"])
    async with asyncio.timeout(5.0):
        await db.entered.wait()
    queued = writer.submit(["queued"])
    assert await writer.close(within=0.05) is False
    assert task.done()
    outcomes = await settled(stuck, queued)
    assert all(isinstance(x, Refused) for x in outcomes), outcomes
    assert "closed during this write: it may or may not be committed" in str(outcomes[0])
    assert "closed before this was written" in str(outcomes[1])
    assert db.committed == []
    assert await writer.close() is True  # again: nothing left to do
