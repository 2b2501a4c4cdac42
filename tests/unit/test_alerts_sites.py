"""The alerts about sites and their routers (licd/observe/alerts.py): `site_silent` on a
vendor's licd, from the block leases of a real engine (leases taken with `delegate`, as
a site router takes its block), and `renewal_failed` from a router's event."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from licd.clock import Instant, ManualClock
from licd.config.settings import AlertsConfig
from licd.core.events import Event, Kind
from licd.engine import Engine
from licd.observe.alerts import Alert, AlertMonitor
from licd_client.messages import Holder
from tests.support import DICOM, checkout_committed, holder, make_config, new_engine, running

NOW = 1_790_000_000.0
HOUR = 3600.0
VENDOR = replace(DICOM, delegable=True, max_ttl=35 * 86400.0, seats=10)


def router(site: str) -> Holder:
    """The holder a site router takes its block as."""
    return Holder(
        host=f"router.{site}",
        hostid=f"id-{site}",
        user="licd",
        pid=1,
        app="licd-router",
        instance=site,
    )


class Vendor:
    """A vendor's engine with site routers' blocks, on a fake clock, and a monitor."""

    def __init__(self, site_silent: float = 24 * HOUR) -> None:
        self.wall = NOW
        self.mono = 1000.0
        self.engine: Engine = new_engine([VENDOR])
        self.raised: list[Alert] = []
        self.monitor = AlertMonitor(
            AlertsConfig(site_silent=site_silent),
            lambda now: [],
            wall=lambda: self.wall,
            monotonic=lambda: self.mono,
            on_alert=self.raised.append,
            leases=lambda: self.engine.leases,
        )

    def at(self) -> Instant:
        return Instant(self.wall, self.mono)

    def block(self, site: str) -> str:
        """A site router's block (its lease secret)."""
        grant = self.engine.checkout(
            VENDOR.key, router(site), request=site, at=self.at(), seats=3, ttl=30 * 86400.0,
            delegate=os.urandom(32),
        )  # fmt: skip
        self.engine.confirm(grant.lease)
        return grant.lease.secret

    def lease(self, host: str) -> str:
        """An ordinary lease (no delegate)."""
        grant = self.engine.checkout(VENDOR.key, holder(host), request=host, at=self.at())
        self.engine.confirm(grant.lease)
        return grant.lease.secret

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds

    def silent(self) -> list[tuple[str, str | None]]:
        return [(a.detail["site"], a.licence) for a in self.monitor.check()]


def test_a_silent_site_is_reported_once_after_site_silent_and_again_after_it_spoke() -> None:
    v = Vendor()
    plant = v.block("plant-3")
    v.block("lab-1")
    v.lease("ws-1")  # no delegate: not a site; its holder_silent comes from its reclaim
    v.advance(12 * HOUR)
    v.engine.heartbeat(plant, v.at())  # plant-3 renews; lab-1 stays silent
    v.advance(12 * HOUR)  # lab-1: exactly 24 h silent, not more
    assert v.silent() == []
    v.advance(1)
    assert v.silent() == [("lab-1", VENDOR.id)]
    [alert] = v.raised
    assert alert.kind == "site_silent"
    assert "site lab-1 (host router.lab-1) has not renewed its block" in alert.message
    assert alert.detail["last_heartbeat"] == NOW and alert.detail["seats"] == 3
    v.advance(HOUR)
    assert v.silent() == []  # once per silence
    v.advance(11 * HOUR)  # plant-3 silent for 24 h + 1 s since its renewal
    v.advance(1)
    assert v.silent() == [("plant-3", VENDOR.id)]
    lab = next(x for x in v.engine.leases if x.holder.instance == "lab-1")
    v.engine.heartbeat(lab.secret, v.at())  # lab-1 speaks: re-armed
    assert v.silent() == []
    v.advance(24 * HOUR + 1)
    assert v.silent() == [("lab-1", VENDOR.id)]  # plant-3 was told, and is still silent
    # plant-3 renews once and falls silent again, with no check in between: a new silence.
    v.engine.heartbeat(plant, v.at())
    v.advance(24 * HOUR + 1)
    assert v.silent() == [("plant-3", VENDOR.id)]


def test_a_block_given_back_is_forgotten_and_zero_turns_it_off() -> None:
    v = Vendor()
    secret = v.block("plant-3")
    v.advance(25 * HOUR)
    assert v.silent() == [("plant-3", VENDOR.id)]
    lease = v.engine.begin_release(secret)
    assert lease is not None
    v.engine.released(lease)
    assert v.silent() == []
    assert v.monitor._silent_fired == {}  # nothing kept for a lease that is gone
    off = Vendor(site_silent=0)
    off.block("plant-3")
    off.advance(365 * 86400.0)
    assert off.silent() == []


def test_renewal_failed_is_one_alert_per_event() -> None:
    v = Vendor()
    detail = {"last_renewal": NOW - 3 * 86400.0, "renew_every": 86400.0, "missed": 3}
    failed = Event(
        Kind.RENEWAL_FAILED, NOW, licence="site-dicom", reason="cannot be reached", detail=detail
    )
    v.monitor.on_event(failed)
    [alert] = v.raised
    assert (alert.kind, alert.licence, alert.time) == ("renewal_failed", "site-dicom", NOW)
    assert alert.message == (
        "the block of licence site-dicom from upstream has not been renewed since "
        "2026-09-18 14:13:20Z: cannot be reached"
    )
    assert alert.detail == {**detail, "error": "cannot be reached"}
    never = Event(Kind.RENEWAL_FAILED, NOW, licence="site-dicom", detail={"last_renewal": None})
    v.monitor.on_event(never)
    assert "renewed since the router started: no answer" in v.raised[-1].message
    assert len(v.raised) == 2


async def test_the_daemon_watches_its_engine_leases(tmp_path: Path) -> None:
    """The daemon hands its monitor the engine's leases: a real block, taken through the
    service, goes silent on the daemon's clock."""
    clock = ManualClock(NOW)
    async with running(make_config(tmp_path, VENDOR), clock) as daemon:
        await checkout_committed(
            daemon.service, VENDOR.key, router("plant-3"), request="plant-3",
            at=clock.now(), seats=3, ttl=30 * 86400.0, delegate=os.urandom(32),
        )  # fmt: skip
        assert daemon.alerts.check() == []
        clock.advance(AlertsConfig().site_silent + 1)  # the default: 3 days
        [alert] = daemon.alerts.check()
        assert (alert.kind, alert.licence) == ("site_silent", VENDOR.id)
        assert alert.detail["site"] == "plant-3" and alert.detail["host"] == "router.plant-3"
        assert alert.message == (
            f"site plant-3 (host router.plant-3) has not renewed its block of licence "
            f"{VENDOR.id} for 72.0 h"
        )


def test_the_site_silent_alert_names_the_block_and_escapes_what_the_router_sent() -> None:
    v = Vendor()
    grant = v.engine.checkout(
        VENDOR.key, router("plant\n3"), request="p", at=v.at(), seats=2, delegate=bytes(32)
    )
    v.engine.confirm(grant.lease)
    v.advance(30 * HOUR)
    [alert] = v.monitor.check()
    assert alert.message == (
        f"site plant\\n3 (host router.plant\\n3) has not renewed its block of licence "
        f"{VENDOR.id} for 30.0 h"
    )
    assert alert.detail == {
        "handle": grant.lease.handle,
        "site": "plant\n3",
        "host": "router.plant\n3",
        "hostid": "id-plant\n3",
        "seats": 2,
        "last_heartbeat": NOW,
    }
    assert alert.time == v.wall and alert.licence == VENDOR.id


def test_only_live_blocks_are_reported_and_a_release_undone_is_not_told_again() -> None:
    v = Vendor()
    pending = v.engine.checkout(
        VENDOR.key, router("plant-3"), request="plant-3", at=v.at(), delegate=bytes(32)
    ).lease  # its commit not yet confirmed
    v.advance(25 * HOUR)
    assert v.silent() == []
    v.engine.confirm(pending)
    assert v.silent() == [("plant-3", VENDOR.id)]
    releasing = v.engine.begin_release(pending.secret)  # a checkin under way
    assert releasing is pending
    assert v.silent() == []
    v.engine.cancel_release(pending)  # its commit failed: live again, still silent
    assert v.silent() == []
    v.engine.heartbeat(pending.secret, v.at())
    v.advance(24 * HOUR + 1)
    assert v.silent() == [("plant-3", VENDOR.id)]


def test_reconfigure_turns_site_silent_on_and_off_and_moves_its_threshold() -> None:
    v = Vendor(site_silent=0)
    v.block("plant-3")
    v.advance(10 * HOUR)
    assert v.silent() == []
    v.monitor.reconfigure(AlertsConfig(site_silent=9 * HOUR))
    assert v.silent() == [("plant-3", VENDOR.id)]
    assert v.silent() == []
    v.monitor.reconfigure(AlertsConfig(site_silent=0))
    assert v.silent() == []
    assert v.monitor._silent_fired == {}
    v.monitor.reconfigure(AlertsConfig(site_silent=12 * HOUR))
    assert v.silent() == []  # 10 h: not silent for this threshold
    v.advance(2 * HOUR + 1)
    assert v.silent() == [("plant-3", VENDOR.id)]


def test_renewal_failed_escapes_the_error_and_needs_no_detail() -> None:
    v = Vendor()
    v.monitor.on_event(Event(Kind.RENEWAL_FAILED, NOW, licence="site-dicom", reason="bad\x1b[2J"))
    [alert] = v.raised
    assert alert.message == (
        "the block of licence site-dicom from upstream has not been renewed since the "
        "router started: bad\\x1b[2J"
    )
    assert alert.detail == {"error": "bad\x1b[2J"}
    v.monitor.on_event(Event(Kind.RENEWAL_FAILED, NOW, licence="site-dicom"))
    assert v.raised[-1].message.endswith("since the router started: no answer")
    assert v.raised[-1].detail == {"error": None}
    v.monitor.on_event(Event(Kind.SITE_USAGE, NOW, licence="site-dicom"))
    assert len(v.raised) == 2  # a site's usage report is no alert
