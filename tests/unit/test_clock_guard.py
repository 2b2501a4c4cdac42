"""The daemon's clock (licd/core/clock_guard.py) over a real store and a ManualClock:
its wall time never goes back, the mark it keeps survives a new guard, a rollback and
its end are each recorded once, and the engine holds vendor grants only meanwhile."""

from __future__ import annotations

from pathlib import Path

import pytest

from licd.clock import ManualClock
from licd.core.clock_guard import CHECKPOINT_EVERY, ClockGuard
from licd.core.events import Kind
from licd.core.service import LicenceService
from licd.store.base import Store
from tests.support import DICOM, new_engine
from tests.unit.test_store import running


async def recorded(store: Store) -> list[Kind]:
    await store.barrier()
    return [e.event.kind for e in await store.audit(limit=100)]


async def test_its_wall_time_never_goes_back_and_the_mark_outlives_it(tmp_path: Path) -> None:
    clock = ManualClock(wall=10_000.0)
    async with running(tmp_path / "licd.db") as store:
        guard = ClockGuard(clock, store, skew=60.0)
        clock.advance(100)
        clock.set_wall(9_000.0)  # set back 1,100 s
        assert guard.now().wall == 10_100.0
        clock.advance(5)  # the mark moves on with monotonic time
        assert guard.now().wall == 10_105.0 and guard.lag() == 1_100.0
        clock.set_wall(20_000.0)  # set forward: taken as it is
        assert guard.now().wall == 20_000.0 and guard.lag() == 0.0
        await guard.checkpoint()
        clock.set_wall(15_000.0)
        again = ClockGuard(clock, store, skew=60.0)  # a restart
        assert again.now().wall == 15_000.0  # before load(): nothing known
        await again.load()
        assert again.now().wall == 20_000.0 and again.lag() == 5_000.0


async def test_a_rollback_and_its_end_are_recorded_once_each_and_hold_vendor_grants(
    tmp_path: Path,
) -> None:
    clock = ManualClock(wall=10_000.0)
    async with running(tmp_path / "licd.db") as store:
        guard = ClockGuard(clock, store, skew=60.0)
        service = LicenceService(new_engine([DICOM]), store, guard)
        guard.attach(service)
        clock.set_wall(9_941.0)  # 59 s back: within the skew
        await guard.check()
        assert service.engine.clock_held is None and guard.behind is None
        clock.set_wall(9_900.0)  # 100 s back
        await guard.check()
        await guard.check()
        held = service.engine.clock_held
        assert held is not None and "100 s behind" in held
        assert guard.behind == 100.0
        await guard.checkpoint()  # takes in the clock, and still knows it is behind
        assert guard.lag() == 100.0
        clock.set_wall(10_000.0)
        await guard.check()
        await guard.check()
        assert service.engine.clock_held is None and guard.behind is None
        assert await recorded(store) == [Kind.CLOCK_ROLLBACK, Kind.CLOCK_RESTORED]
        [rollback, _] = await store.audit(limit=100)
        assert rollback.event.detail["behind"] == 100.0
        assert rollback.event.time == 10_000.0  # the daemon's time, not the clock's


async def test_a_rollback_found_before_attach_holds_grants_once_attached(
    tmp_path: Path,
) -> None:
    clock = ManualClock(wall=10_000.0)
    async with running(tmp_path / "licd.db") as store:
        first = ClockGuard(clock, store, skew=60.0)
        await first.checkpoint()
        clock.set_wall(5_000.0)
        guard = ClockGuard(clock, store, skew=60.0)
        await guard.load()
        await guard.check()  # nothing to record into yet
        service = LicenceService(new_engine([DICOM]), store, guard)
        guard.attach(service)
        assert service.engine.clock_held is not None


async def test_run_checkpoints_the_mark_every_interval(tmp_path: Path) -> None:
    clock = ManualClock(wall=10_000.0)
    naps: list[float] = []

    async def sleep(seconds: float) -> None:
        if len(naps) == 3:
            raise StopAsyncIteration
        naps.append(seconds)
        clock.advance(seconds)

    async with running(tmp_path / "licd.db") as store:
        guard = ClockGuard(clock, store, skew=60.0)
        with pytest.raises(StopAsyncIteration):
            await guard.run(sleep)
        assert naps == [CHECKPOINT_EVERY] * 3
        await store.barrier()
        assert await store.load_wall_mark() == 10_000.0 + 3 * CHECKPOINT_EVERY


async def test_a_checkpoint_takes_in_a_clock_set_forward(tmp_path: Path) -> None:
    """A clock put forward (the right time after a wrong one) is the new mark: going
    back from there is a rollback, however far the first reading was."""
    clock = ManualClock(wall=10_000.0)
    async with running(tmp_path / "licd.db") as store:
        guard = ClockGuard(clock, store, skew=60.0)
        clock.set_wall(11_000.0)
        await guard.checkpoint()
        clock.set_wall(10_500.0)
        assert guard.lag() == 500.0
        await guard.check()
        assert guard.behind == 500.0
