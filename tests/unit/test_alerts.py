"""Alerts on fake clocks: expiry and usage thresholds, silent holders, denial windows, and
the hooks they start (the hook runner itself: test_hooks.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest

from licd.clock import Instant
from licd.config.settings import AlertsConfig
from licd.core.events import Event, Kind
from licd.engine import Licence
from licd.engine.licence import Addon
from licd.observe.alerts import Alert, AlertMonitor
from licd.observe.metrics import LicenceUsage, engine_usage
from licd_client.messages import Holder
from tests.support import new_engine

NOW = 1_790_000_000.0
DAY = 86400.0


class World:
    """Fake clocks and a mutable engine view; records what the monitor raised."""

    def __init__(self, config: AlertsConfig | None = None) -> None:
        self.wall = NOW
        self.mono = 1000.0
        self.usage: dict[str, LicenceUsage] = {}
        self.raised: list[Alert] = []
        self.hooked: list[Alert] = []
        self.monitor = AlertMonitor(
            config or AlertsConfig(),
            lambda now: list(self.usage.values()),
            wall=lambda: self.wall,
            monotonic=lambda: self.mono,
            on_alert=self.raised.append,
        )

    def licence(
        self, id: str = "cad", *, total: int = 4, in_use: int = 0, expires: float | None = None
    ) -> None:
        self.usage[id] = LicenceUsage(id, "CAD Pro", total, in_use, expires)

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds

    def kinds(self) -> list[tuple[str, str | None]]:
        return [(a.kind, a.licence) for a in self.monitor.check()]


def event(kind: Kind, licence: str | None = "cad", **kw: object) -> Event:
    return Event(kind, NOW, licence=licence, **kw)  # type: ignore[arg-type]


# --- expiry ---------------------------------------------------------------------------


def test_expiry_thresholds_fire_once_each() -> None:
    w = World()
    w.licence(expires=NOW + 20 * DAY)
    assert w.kinds() == []
    w.advance(5 * DAY - 1)  # 15 days and a second left
    assert w.kinds() == []
    w.advance(1)  # exactly 15 days left
    [alert] = w.monitor.check()
    assert alert.kind == "licence_expiring" and alert.licence == "cad"
    assert alert.detail["threshold_days"] == 15
    assert alert.message == "licence cad expires in 15.0 days"
    assert alert.time == w.wall
    w.advance(DAY)
    assert w.kinds() == []  # 14 days: nothing new
    w.advance(4 * DAY)
    [alert] = w.monitor.check()  # 10 days
    assert alert.detail["threshold_days"] == 10
    w.advance(20 * DAY)
    assert w.kinds() == []  # expired: every threshold has fired already
    assert [a.kind for a in w.raised] == ["licence_expiring", "licence_expiring"]


def test_several_thresholds_at_once_give_one_alert_naming_the_smallest() -> None:
    w = World()
    w.licence(expires=NOW + 3 * DAY)  # within 15 and 10 at the first check
    [alert] = w.monitor.check()
    assert alert.detail["threshold_days"] == 10
    assert w.kinds() == []


def test_an_expired_licence_says_so() -> None:
    w = World()
    w.licence(expires=NOW - 2 * DAY)
    [alert] = w.monitor.check()
    assert alert.message == "licence cad expired 2.0 days ago"
    assert alert.detail["days_left"] == -2.0


def test_a_renewal_re_arms_the_expiry_thresholds() -> None:
    w = World()
    w.licence(expires=NOW + 12 * DAY)
    assert w.kinds() == [("licence_expiring", "cad")]  # 15
    w.licence(expires=NOW + 47 * DAY)  # renewed for 35 more days
    assert w.kinds() == []
    w.advance(32 * DAY)  # 15 days left of the new expiry
    [alert] = w.monitor.check()
    assert alert.detail["threshold_days"] == 15
    assert alert.detail["expires"] == NOW + 47 * DAY


def test_licences_without_expiry_or_removed_are_forgotten() -> None:
    w = World()
    w.licence(expires=None)
    assert w.kinds() == []
    w.licence(expires=NOW + DAY)
    assert w.kinds() == [("licence_expiring", "cad")]
    del w.usage["cad"]
    assert w.kinds() == []
    w.licence(expires=NOW + DAY)  # added again: alerts again
    assert w.kinds() == [("licence_expiring", "cad")]


def test_custom_expiry_days() -> None:
    w = World(AlertsConfig(expiry_days=(30, 7, 1)))
    w.licence(expires=NOW + 31 * DAY)
    fired = []
    for _ in range(31):
        w.advance(DAY)
        fired += [a.detail["threshold_days"] for a in w.monitor.check()]
    assert fired == [30, 7, 1]


# --- usage ----------------------------------------------------------------------------


def usage_levels(w: World, *in_use: int, total: int = 20) -> list[int | None]:
    """Check at each usage in turn: the threshold fired at each step, None if none."""
    fired: list[int | None] = []
    for n in in_use:
        w.licence(total=total, in_use=n)
        alerts = w.monitor.check()
        assert len(alerts) <= 1
        fired.append(alerts[0].detail["threshold_percent"] if alerts else None)
    return fired


def test_usage_thresholds_fire_on_rising() -> None:
    w = World()
    # 20 seats: 14 = 70 %, 15 = 75 %, 17 = 85 %, 18 = 90 %, 20 = 100 %
    assert usage_levels(w, 0, 14, 15, 16, 17, 18, 19, 20, 20) == [
        None, None, 75, None, None, 90, None, 100, None,
    ]  # fmt: skip
    [alert] = [a for a in w.raised if a.detail["threshold_percent"] == 100]
    assert alert.kind == "usage" and alert.licence == "cad"
    assert alert.detail["in_use"] == 20 and alert.detail["total"] == 20
    assert "20 of 20 seats" in alert.message


def test_usage_rising_through_several_levels_at_once_names_the_highest() -> None:
    w = World()
    assert usage_levels(w, 19, 20) == [90, 100]


def test_usage_thresholds_re_arm_when_usage_falls_below() -> None:
    w = World()
    assert usage_levels(w, 20, 19, 20) == [100, None, 100]  # 100 re-armed at 95 %
    assert usage_levels(w, 16, 18) == [None, 90]  # 90 re-armed at 80 %
    assert usage_levels(w, 10, 15, 18, 20) == [None, 75, 90, 100]  # all re-armed at 50 %


def test_usage_of_each_licence_is_separate() -> None:
    w = World()
    w.licence("a", total=4, in_use=3)
    w.licence("b", total=2, in_use=2)
    assert sorted(w.kinds()) == [("usage", "a"), ("usage", "b")]
    assert w.kinds() == []


def test_usage_counts_the_addon_seats_in_force() -> None:
    """Usage is measured against the seats in force at the check's wall time: a licence of
    2 seats with a +2 add-on holding 2 is at 50 % while the add-on runs, 100 % after."""
    addon = Addon(seats=2, starts=NOW - DAY, ends=NOW + DAY)
    engine = new_engine([Licence(key="K-1", id="cad", product="CAD Pro", seats=2, addon=(addon,))])
    for n in (1, 2):
        holder = Holder(host=f"ws{n}", hostid=f"ws{n}-id", user="ann", pid=n, app="cad")
        engine.confirm(engine.checkout("K-1", holder, request=f"r{n}", at=Instant(NOW, 1.0)).lease)
    wall = [NOW]
    monitor = AlertMonitor(
        AlertsConfig(), partial(engine_usage, engine), wall=lambda: wall[0], monotonic=lambda: 0.0
    )
    assert monitor.check() == []  # 2 of 4: 50 %
    holder = Holder(host="ws3", hostid="ws3-id", user="ann", pid=3, app="cad")
    engine.confirm(engine.checkout("K-1", holder, request="r3", at=Instant(NOW, 1.0)).lease)
    [alert] = monitor.check()  # 3 of 4
    assert alert.message == "licence cad has 3 of 4 seats in use (75 %, threshold 75 %)"
    assert (alert.detail["in_use"], alert.detail["total"]) == (3, 4)
    wall[0] = NOW + DAY  # the add-on ends: 3 seats in use of 2
    [alert] = monitor.check()
    assert alert.message == "licence cad has 3 of 2 seats in use (150 %, threshold 100 %)"
    assert alert.detail["total"] == 2


# --- events: silent holders and denials -------------------------------------------------


def test_a_reclaim_raises_holder_silent() -> None:
    w = World()
    w.monitor.on_event(
        event(Kind.RECLAIM, handle="h-42", host="ws7", hostid="id7", user="bob", seats=1)
    )
    [alert] = w.raised
    assert alert.kind == "holder_silent" and alert.licence == "cad"
    assert alert.detail["handle"] == "h-42"
    assert alert.detail["host"] == "ws7" and alert.detail["user"] == "bob"
    assert "ws7" in alert.message and "bob" in alert.message


def test_a_holders_chosen_strings_reach_the_alert_message_escaped() -> None:
    # The hook may print or mail the message: a client's host must not carry a line
    # break or a terminal escape into it. The detail keeps the exact value (JSON).
    w = World()
    host = "ws7\nSubject: urgent\x1b[2J"
    w.monitor.on_event(event(Kind.RECLAIM, handle="h-1", host=host, user="bob", seats=1))
    [alert] = w.raised
    assert "\n" not in alert.message and "\x1b" not in alert.message
    assert "ws7\\nSubject: urgent\\x1b[2J" in alert.message
    assert alert.detail["host"] == host


def test_other_events_raise_nothing() -> None:
    w = World()
    for kind in (Kind.CHECKOUT, Kind.CHECKIN, Kind.REVOKE, Kind.RELOAD, Kind.LICENCE_ADDED):
        w.monitor.on_event(event(kind))
    assert w.raised == []


def deny(w: World, licence: str | None = "cad", reason: str = "no_seats") -> None:
    w.monitor.on_event(event(Kind.DENIED, licence, reason=reason))


def test_repeated_denials_raise_one_alert_per_window() -> None:
    w = World(AlertsConfig(denials=3, denial_window=60.0))
    deny(w)
    w.advance(10)
    deny(w, reason="licence_expired")
    assert w.raised == []
    w.advance(10)
    deny(w)  # third within 60 s
    [alert] = w.raised
    assert alert.kind == "denials" and alert.licence == "cad"
    assert alert.detail == {
        "denials": 3,
        "window": 60.0,
        "reasons": {"no_seats": 2, "licence_expired": 1},
    }
    for _ in range(50):  # a storm: muted for the window
        w.advance(0.5)
        deny(w)
    assert len(w.raised) == 1
    w.advance(35)  # the window since the alert has passed; the storm goes on
    deny(w)
    assert len(w.raised) == 2


def test_denials_spread_wider_than_the_window_raise_nothing() -> None:
    w = World(AlertsConfig(denials=3, denial_window=60.0))
    for _ in range(10):
        deny(w)
        w.advance(31)  # at most two within any 60 s
    assert w.raised == []


def test_denials_are_counted_per_licence() -> None:
    w = World(AlertsConfig(denials=2, denial_window=60.0))
    deny(w, "a")
    deny(w, "b")
    deny(w, None, "unknown_licence")
    assert w.raised == []
    deny(w, None, "unknown_licence")
    [alert] = w.raised
    assert alert.licence is None and "unknown licence keys" in alert.message
    deny(w, "a")
    assert [a.licence for a in w.raised] == [None, "a"]


def test_the_denial_clock_is_monotonic() -> None:
    w = World(AlertsConfig(denials=2, denial_window=60.0))
    deny(w)
    w.wall -= 3600  # the wall clock is set back an hour; monotonic time moved 1 s
    w.mono += 1
    deny(w)
    assert len(w.raised) == 1


def test_reconfigure_applies_new_thresholds_and_windows() -> None:
    w = World(AlertsConfig(denials=3, denial_window=60.0))
    w.licence(total=10, in_use=8)
    assert w.kinds() == [("usage", "cad")]  # 75 %
    deny(w)
    deny(w)
    w.monitor.reconfigure(AlertsConfig(usage_percent=(50, 80), denials=2, denial_window=60.0))
    assert [a.detail["threshold_percent"] for a in w.monitor.check()] == [80]
    deny(w)  # the window started afresh: one denial of two
    assert [a.kind for a in w.raised] == ["usage", "usage"]
    deny(w)
    assert [a.kind for a in w.raised] == ["usage", "usage", "denials"]


# --- raising: log, callback, hook -----------------------------------------------------


def test_each_alert_is_one_warning_line(caplog: pytest.LogCaptureFixture) -> None:
    w = World()
    w.licence(expires=NOW + DAY)
    with caplog.at_level(logging.WARNING, logger="licd.observe.alerts"):
        w.monitor.check()
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        "event=alert kind=licence_expiring licence=cad message='licence cad expires in 1.0 days'"
    )


def test_a_failing_callback_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def broken(alert: Alert) -> None:
        raise RuntimeError("metrics broke")

    monitor = AlertMonitor(
        AlertsConfig(),
        lambda now: [LicenceUsage("cad", "CAD", 1, 1, None)],
        wall=lambda: NOW,
        monotonic=lambda: 0.0,
        on_alert=broken,
    )
    assert [a.kind for a in monitor.check()] == ["usage"]
    assert "event=alert_callback_failed" in caplog.text


def test_to_json() -> None:
    alert = Alert("usage", "cad", "m", NOW, {"in_use": 3})
    data = alert.to_json()
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    assert json.loads(data) == {
        "kind": "usage",
        "licence": "cad",
        "message": "m",
        "time": NOW,
        "at": "2026-09-21T14:13:20+00:00",
        "detail": {"in_use": 3},
    }


async def test_run_checks_every_interval() -> None:
    w = World(AlertsConfig(check_interval=30.0))
    w.licence(total=1, in_use=1)
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        w.licence(total=1, in_use=1 - len(slept) % 2)  # falls, rises, falls ...
        if len(slept) == 4:
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await w.monitor.run(sleep)
    assert slept == [30.0] * 4
    assert [a.kind for a in w.raised] == ["usage", "usage"]  # at checks 1 and 3


async def test_hooks_run_in_the_background_and_drain() -> None:
    seen: list[Alert] = []
    release = asyncio.Event()

    async def hook(alert: Alert) -> None:
        await release.wait()
        seen.append(alert)

    monitor = AlertMonitor(
        AlertsConfig(),
        lambda now: [],
        wall=lambda: NOW,
        monotonic=lambda: 0.0,
        run_hook=hook,
    )
    monitor.on_event(event(Kind.RECLAIM, handle="h1"))
    monitor.on_event(event(Kind.RECLAIM, handle="h2"))
    assert monitor.hooks.pending == 2 and seen == []  # on_event did not wait
    release.set()
    await monitor.hooks.drain()
    assert monitor.hooks.pending == 0
    assert sorted(a.detail["handle"] for a in seen) == ["h1", "h2"]


async def test_the_configured_hook_gets_the_alert_on_stdin(tmp_path: Path) -> None:
    out = tmp_path / "alert.json"
    code = f"import sys; open({str(out)!r}, 'wb').write(sys.stdin.buffer.read())"
    config = replace(AlertsConfig(), hook=(sys.executable, "-c", code), hook_timeout=30.0)
    monitor = AlertMonitor(config, lambda now: [], wall=lambda: NOW, monotonic=lambda: 0.0)
    monitor.on_event(event(Kind.RECLAIM, handle="h9", host="ws9", user="eve"))
    await monitor.hooks.drain()
    document = json.loads(out.read_bytes())
    assert document["kind"] == "holder_silent"
    assert document["licence"] == "cad"
    assert document["detail"]["handle"] == "h9"
