"""A wall clock set back (licd/core/clock_guard.py), on a real daemon with a vendor's
entitlement: across a restart a day behind, the entitlement lasts no longer, the
`clock_rollback` alert fires, new vendor seats are held while leases held go on and the
site's own licences serve; the clock put right ends it. Normal restarts, NTP steps and
slews within the skew raise nothing.

The daemon runs on a ManualClock (a restart keeps the clock object, so `set_wall` is the
admin setting the clock while the daemon is down); vendor files are made with the same
helpers as tests/integration/test_entitlements.py.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from licd.clock import ManualClock
from licd.config.settings import Config
from licd.daemon import Daemon
from licd_client import AsyncClient
from licd_client.errors import LicenceExpired, Unavailable
from tests.integration.vendors import (
    CAD_KEY,
    SITE,
    Vendor,
    iso,
    ok,
    site_config,
    sock,
    vendor_fixture,  # noqa: F401 - the `vendor` fixture
)
from tests.support import DICOM, address, make_config, running

DAY = 86400.0


async def kinds(daemon: Daemon) -> list[str]:
    return [e.event.kind.value for e in await daemon.store.audit(limit=5000)]


def behind(daemon: Daemon) -> float | None:
    return daemon.metrics.registry.get_sample_value("licd_clock_behind_seconds")


def alerts(daemon: Daemon, kind: str) -> float:
    value = daemon.metrics.registry.get_sample_value("licd_alerts_total", {"kind": kind})
    return value or 0.0


async def imported(config: Config, clock: ManualClock, vendor: Vendor, days: float) -> float:
    """Run the site once to import an entitlement valid `days` from now; its expiry."""
    expires = float(int(clock.now().wall + days * DAY))
    async with running(config, clock, components=SITE) as daemon:
        path = await vendor.issue(daemon.public_key.hex(), "e.toml", expires=iso(expires))
        await ok("entitlement", "import", str(path), *sock(daemon))
    return expires


async def test_a_restart_with_the_clock_a_day_behind_extends_nothing_and_alerts(
    tmp_path: Path, vendor: Vendor, caplog: pytest.LogCaptureFixture
) -> None:
    config = site_config(tmp_path, vendor)
    clock = ManualClock(wall=time.time())
    expires = await imported(config, clock, vendor, days=3)
    async with running(config, clock, components=SITE) as daemon:
        client = AsyncClient([address(daemon)], vendor.public, retry_for=0)
        held = await client.checkout(CAD_KEY)
        clock.advance(DAY)  # a day passes; the lease keeps renewing
        await held.renew_once()
        await client.aclose()
    # While the daemon is down, the clock is set back a day.
    clock.set_wall(clock.now().wall - DAY)
    caplog.set_level(logging.WARNING)
    async with running(config, clock, components=SITE) as daemon:
        assert "clock_rollback" in await kinds(daemon)
        assert behind(daemon) == pytest.approx(DAY, abs=1)
        assert alerts(daemon, "clock_rollback") == 1
        assert any("kind=clock_rollback" in r.getMessage() for r in caplog.records)
        # The daemon's time is the latest it has seen, not the clock's: two days left.
        assert daemon.service.now().wall == pytest.approx(clock.now().wall + DAY, abs=1)
        [item] = daemon.entitlements.listing()
        assert item["days_left"] == pytest.approx(2, abs=0.01)
        # No new vendor seat while the clock is behind; the site's own licence serves.
        client = AsyncClient([address(daemon)], vendor.public, retry_for=0)
        with pytest.raises(Unavailable, match="clock is 86400 s behind"):
            await client.checkout(CAD_KEY)
        local = AsyncClient([address(daemon)], daemon.public_key.hex(), retry_for=0)
        await (await local.checkout(DICOM.key)).release()
        # The clock put right: recorded, and vendor seats are granted again.
        clock.set_wall(clock.now().wall + DAY)
        await daemon.clock_guard.check()
        assert (await kinds(daemon))[-1] == "clock_restored"
        assert behind(daemon) == 0
        await (await client.checkout(CAD_KEY)).release()
        # The entitlement ends when its two days are gone, not a day after.
        clock.advance(2 * DAY - 60)
        await (await client.checkout(CAD_KEY)).release()
        clock.advance(61)
        with pytest.raises(LicenceExpired):
            await client.checkout(CAD_KEY)
        assert daemon.service.now().wall >= expires
        await client.aclose()
        await local.aclose()


async def test_leases_held_go_on_while_the_clock_is_behind(tmp_path: Path, vendor: Vendor) -> None:
    """Set back while running: held leases renew, new vendor seats wait."""
    config = site_config(tmp_path, vendor)
    clock = ManualClock(wall=time.time())
    await imported(config, clock, vendor, days=3)
    async with running(config, clock, components=SITE) as daemon:
        await daemon.clock_guard.checkpoint()
        client = AsyncClient([address(daemon)], vendor.public, retry_for=0)
        held = await client.checkout(CAD_KEY)
        clock.set_wall(clock.now().wall - 3600)  # an admin sets it back an hour
        await daemon.clock_guard.check()
        assert (await kinds(daemon))[-1] == "clock_rollback"
        with pytest.raises(Unavailable):
            await client.checkout(CAD_KEY)
        for _ in range(3):
            clock.advance(30)
            await held.renew_once()
        await held.release()
        await client.aclose()


async def test_normal_restarts_ntp_steps_and_slews_raise_nothing(
    tmp_path: Path, vendor: Vendor
) -> None:
    config = site_config(tmp_path, vendor)
    clock = ManualClock(wall=time.time())
    await imported(config, clock, vendor, days=30)
    for _ in range(3):  # restarts, some time apart
        clock.advance(3600)
        async with running(config, clock, components=SITE) as daemon:
            guard = daemon.clock_guard
            # NTP slews the clock 0.5 s an hour slower than monotonic time for ten
            # hours, then steps it back 30 s: well within the skew.
            for _ in range(10):
                clock.mono += 3600
                clock.wall += 3600 - 0.5
                await guard.check()
                await guard.checkpoint()
            clock.set_wall(clock.now().wall - 30)
            await guard.check()
            client = AsyncClient([address(daemon)], vendor.public, retry_for=0)
            await (await client.checkout(CAD_KEY)).release()
            await client.aclose()
            assert "clock_rollback" not in await kinds(daemon)
            assert behind(daemon) in (None, 0)
            assert alerts(daemon, "clock_rollback") == 0


async def test_a_daemon_without_vendor_licences_keeps_serving_when_set_back(
    tmp_path: Path,
) -> None:
    """The mark checkpointed is what the next start trusts; only vendor licences wait."""
    clock = ManualClock()
    config = make_config(tmp_path / "state", DICOM)
    async with running(config, clock) as daemon:
        clock.advance(5 * DAY)
        await daemon.clock_guard.checkpoint()
        mark = clock.now().wall
    clock.set_wall(mark - 2 * DAY)
    async with running(config, clock) as daemon:
        assert daemon.service.now().wall == pytest.approx(mark)
        assert daemon.engine.clock_held is not None
        # The site's own licence is not held.
        local = AsyncClient([address(daemon)], daemon.public_key.hex(), retry_for=0)
        await (await local.checkout(DICOM.key)).release()
        await local.aclose()
