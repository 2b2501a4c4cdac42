"""Metrics: counters from events, gauges at scrape time, both formats (the HTTP endpoint
that serves them: test_metrics_http.py)."""

from __future__ import annotations

import shutil
import subprocess
from functools import partial

import pytest
from prometheus_client.parser import text_string_to_metric_families

from licd.clock import Instant
from licd.core.events import Event, Kind
from licd.engine import Licence
from licd.engine.licence import Addon
from licd.observe.metrics import LicenceUsage, Metrics, engine_usage
from licd_client.messages import Holder
from tests.support import new_engine

NOW = 1_790_000_000.0
DAY = 86400.0


class View:
    """A mutable engine view and connection count, read by the collector at scrape time."""

    def __init__(self) -> None:
        self.usage = [
            LicenceUsage("cad", "CAD Pro", 4, 3, NOW + 12.5 * DAY),
            LicenceUsage("viewer", "Viewer", 10, 0, None),
        ]
        self.connections = 7
        self.wall = NOW

    def metrics(self) -> Metrics:
        return Metrics(lambda now: self.usage, lambda: self.connections, lambda: self.wall)


def value(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def feed(m: Metrics) -> None:
    for kind, licence, reason in [
        (Kind.CHECKOUT, "cad", None),
        (Kind.CHECKOUT, "cad", None),
        (Kind.CHECKIN, "cad", None),
        (Kind.RECLAIM, "cad", None),
        (Kind.REVOKE, "viewer", "admin"),
        (Kind.DENIED, "cad", "no_seats"),
        (Kind.DENIED, "cad", "no_seats"),
        (Kind.DENIED, None, "unknown_licence"),
        (Kind.LICENCE_ADDED, "viewer", None),  # not counted
    ]:
        m.on_event(Event(kind, NOW, licence=licence, reason=reason))
    m.heartbeat()
    m.heartbeat()
    m.observe_request("checkout", 0.0003, None)
    m.observe_request("checkout", 0.02, "no_seats")
    m.observe_request("heartbeat", 0.0001, None)
    m.alert("usage")


def test_counters_follow_events_and_calls() -> None:
    m = View().metrics()
    feed(m)
    assert value(m, "licd_checkouts_total", licence="cad") == 2
    assert value(m, "licd_checkins_total", licence="cad") == 1
    assert value(m, "licd_reclaims_total", licence="cad") == 1
    assert value(m, "licd_revokes_total", licence="viewer") == 1
    assert value(m, "licd_denials_total", licence="cad", reason="no_seats") == 2
    assert value(m, "licd_denials_total", licence="", reason="unknown_licence") == 1
    assert value(m, "licd_heartbeats_total") == 2
    assert value(m, "licd_request_seconds_count", op="checkout") == 2
    assert value(m, "licd_request_seconds_sum", op="checkout") == pytest.approx(0.0203)
    assert value(m, "licd_request_seconds_bucket", op="checkout", le="0.0005") == 1
    assert value(m, "licd_request_seconds_count", op="heartbeat") == 1
    assert value(m, "licd_errors_total", op="checkout", code="no_seats") == 1
    assert value(m, "licd_errors_total", op="heartbeat", code="no_seats") is None
    assert value(m, "licd_alerts_total", kind="usage") == 1


def test_gauges_are_read_at_scrape_time() -> None:
    view = View()
    m = view.metrics()
    cad = {"licence": "cad", "product": "CAD Pro"}
    assert value(m, "licd_seats_licensed", **cad) == 4
    assert value(m, "licd_seats_in_use", **cad) == 3
    assert value(m, "licd_seats_available", **cad) == 1
    assert value(m, "licd_seats_available", licence="viewer", product="Viewer") == 10
    assert value(m, "licd_licence_time_to_expiry_seconds", licence="cad") == 12.5 * DAY
    assert value(m, "licd_licence_time_to_expiry_seconds", licence="viewer") is None
    assert value(m, "licd_connections") == 7

    view.usage = [LicenceUsage("cad", "CAD Pro", 4, 5, NOW - DAY)]  # over-committed, expired
    view.connections = 0
    view.wall = NOW + DAY
    assert value(m, "licd_seats_in_use", **cad) == 5
    assert value(m, "licd_seats_available", **cad) == 0
    assert value(m, "licd_licence_time_to_expiry_seconds", licence="cad") == -2 * DAY
    assert value(m, "licd_seats_licensed", licence="viewer", product="Viewer") is None
    assert value(m, "licd_connections") == 0


def test_engine_usage_reads_the_engine() -> None:
    engine = new_engine(
        [
            Licence(key="K-1", id="cad", product="CAD Pro", seats=2, expires=NOW + DAY),
            Licence(key="K-2", id="viewer", product="Viewer", seats=5),
        ]
    )
    ws1 = Holder(host="ws1", hostid="ws1-id", user="ann", pid=1, app="cad")
    engine.confirm(engine.checkout("K-1", ws1, request="r1", at=Instant(NOW, 100.0)).lease)
    assert engine_usage(engine, NOW) == [
        LicenceUsage("cad", "CAD Pro", 2, 1, NOW + DAY),
        LicenceUsage("viewer", "Viewer", 5, 0, None),
    ]


def test_seat_gauges_count_the_addon_seats_in_force() -> None:
    """An add-on's seats count in licd_seats_licensed/available while it is active, and
    only then, at the scrape's wall time (as `licd status` and checkouts count them)."""
    addon = Addon(seats=5, starts=NOW + DAY, ends=NOW + 2 * DAY)
    engine = new_engine([Licence(key="K-1", id="cad", product="CAD Pro", seats=10, addon=(addon,))])
    ws1 = Holder(host="ws1", hostid="ws1-id", user="ann", pid=1, app="cad")
    engine.confirm(engine.checkout("K-1", ws1, request="r1", at=Instant(NOW, 100.0)).lease)
    wall = [NOW]
    m = Metrics(partial(engine_usage, engine), lambda: 0, lambda: wall[0])
    cad = {"licence": "cad", "product": "CAD Pro"}

    def seats() -> tuple[float | None, ...]:
        return tuple(
            value(m, name, **cad)
            for name in ("licd_seats_licensed", "licd_seats_in_use", "licd_seats_available")
        )

    assert seats() == (10, 1, 9)  # before the add-on starts
    wall[0] = NOW + DAY  # it starts
    assert seats() == (15, 1, 14)
    wall[0] = NOW + 2 * DAY - 1
    assert seats() == (15, 1, 14)
    wall[0] = NOW + 2 * DAY  # it ends
    assert seats() == (10, 1, 9)


def test_seat_gauges_hold_back_the_seats_reserved_for_groups() -> None:
    """Seats a reservation keeps for a group are not `available` to anyone (as the
    `available` op and `licd status` count them) until the group's members use them."""
    licence = Licence(key="K-1", id="cad", product="CAD Pro", seats=4, reserve={"team": 2})
    engine = new_engine([licence], groups={"team": ("user:ann",)})
    m = Metrics(partial(engine_usage, engine), lambda: 0, lambda: NOW)
    cad = {"licence": "cad", "product": "CAD Pro"}

    def seats() -> tuple[float | None, ...]:
        return tuple(
            value(m, name, **cad)
            for name in ("licd_seats_in_use", "licd_seats_reserved", "licd_seats_available")
        )

    assert seats() == (0, 2, 2)
    bob = Holder(host="ws2", hostid="ws2-id", user="bob", pid=2)
    engine.confirm(engine.checkout("K-1", bob, request="r" * 22, at=Instant(NOW, 1.0)).lease)
    assert seats() == (1, 2, 1)
    ann = Holder(host="ws1", hostid="ws1-id", user="ann", pid=1)
    engine.confirm(engine.checkout("K-1", ann, request="s" * 22, at=Instant(NOW, 1.0)).lease)
    assert seats() == (2, 1, 1)  # ann is of the team: one of its seats is used


@pytest.mark.parametrize("openmetrics", [False, True])
def test_exposition_parses_in_both_formats(openmetrics: bool) -> None:
    m = View().metrics()
    feed(m)
    body, content_type = m.exposition(openmetrics)
    text = body.decode()
    if openmetrics:
        assert content_type.startswith("application/openmetrics-text; version=1.0.0")
        assert text.endswith("# EOF\n")
        assert "# UNIT licd_request_seconds seconds" in text
        from prometheus_client.openmetrics.parser import (
            text_string_to_metric_families as parse,
        )
    else:
        assert content_type == "text/plain; version=0.0.4; charset=utf-8"
        parse = text_string_to_metric_families
    families = {f.name: f for f in parse(text)}  # type: ignore[no-untyped-call]
    for name in ("licd_checkouts", "licd_denials", "licd_heartbeats", "licd_alerts"):
        assert families[name].type == "counter"
        assert families[name].documentation
    assert families["licd_request_seconds"].type == "histogram"
    assert families["licd_seats_in_use"].type == "gauge"
    assert all(name.startswith("licd_") for name in families)
    denials = {
        (s.labels["licence"], s.labels["reason"]): s.value
        for s in families["licd_denials"].samples
        if s.name == "licd_denials_total"
    }
    assert denials == {("cad", "no_seats"): 2, ("", "unknown_licence"): 1}
    assert "K-1" not in text  # no licence keys anywhere


def test_a_registry_of_its_own() -> None:
    from prometheus_client import REGISTRY

    a, b = View().metrics(), View().metrics()  # two instances do not clash
    a.heartbeat()
    assert value(b, "licd_heartbeats_total") == 0
    assert REGISTRY.get_sample_value("licd_heartbeats_total") is None


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not on PATH (Debian: apt-get install prometheus)",
)
def test_promtool_accepts_the_exposition() -> None:
    m = View().metrics()
    feed(m)
    body, _ = m.exposition(openmetrics=False)  # promtool lints the classic text format
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=body, capture_output=True, timeout=60, check=False
    )
    assert result.returncode == 0, (result.stdout + result.stderr).decode()
