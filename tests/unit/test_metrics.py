"""Metrics: counters from events, gauges at scrape time, both formats, the HTTP endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from collections.abc import AsyncIterator
from functools import partial

import pytest
from prometheus_client.parser import text_string_to_metric_families

from licd.clock import Instant
from licd.core.events import Event, Kind
from licd.engine import Engine, Licence
from licd.engine.licence import Addon
from licd.observe.metrics import DEFAULT_LIMITS, EndpointLimits, LicenceUsage, Metrics, engine_usage
from licd_client.messages import Holder

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
    engine = Engine(
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
    engine = Engine([Licence(key="K-1", id="cad", product="CAD Pro", seats=10, addon=(addon,))])
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
    engine = Engine([licence], groups={"team": ("user:ann",)})
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


# --- the HTTP endpoint ----------------------------------------------------------------


@pytest.fixture
async def endpoint() -> AsyncIterator[tuple[Metrics, int]]:
    m = View().metrics()
    feed(m)
    server = await m.serve("127.0.0.1", 0, limits=EndpointLimits(read_timeout=0.5))
    port = server.sockets[0].getsockname()[1]
    yield m, port
    server.close()
    await server.wait_closed()


async def exchange(port: int, request: bytes) -> tuple[str, dict[str, str], bytes]:
    """Send `request`, read until the server closes: (status line, headers, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(5):
            response = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    assert int(headers["content-length"]) == len(body) or request.startswith(b"HEAD")
    return status, headers, body


def get(path: str, *extra: str, method: str = "GET") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost", *extra, "", ""]
    return "\r\n".join(lines).encode()


async def test_get_metrics_text_format(endpoint: tuple[Metrics, int]) -> None:
    _, port = endpoint
    status, headers, body = await exchange(port, get("/metrics", "Accept: text/plain"))
    assert status == "HTTP/1.1 200 OK"
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert headers["connection"] == "close"
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    assert {"licd_seats_in_use", "licd_connections", "licd_checkouts"} <= names


async def test_get_metrics_openmetrics_when_asked(endpoint: tuple[Metrics, int]) -> None:
    _, port = endpoint
    accept = "Accept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
    status, headers, body = await exchange(port, get("/metrics?x=1", accept))
    assert status == "HTTP/1.1 200 OK"
    assert headers["content-type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


async def test_head_has_no_body(endpoint: tuple[Metrics, int]) -> None:
    _, port = endpoint
    status, headers, body = await exchange(port, get("/metrics", method="HEAD"))
    assert status == "HTTP/1.1 200 OK"
    assert int(headers["content-length"]) > 0
    assert body == b""


@pytest.mark.parametrize(
    ("request_bytes", "expected"),
    [
        (get("/"), "HTTP/1.1 404 Not Found"),
        (get("/metrics/extra"), "HTTP/1.1 404 Not Found"),
        (get("/metrics", "Content-Length: 0", method="POST"), "HTTP/1.1 405 Method Not Allowed"),
        (get("/metrics", method="DELETE"), "HTTP/1.1 405 Method Not Allowed"),
        (
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",
            "HTTP/1.1 400 Bad Request",
        ),
        (b"GET /metrics\r\n\r\n", "HTTP/1.1 400 Bad Request"),  # HTTP/0.9
        (b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        (get("/metrics", "X-Big: " + "a" * 10000), "HTTP/1.1 400 Bad Request"),
        (get("/metrics", *[f"X-{i}: {i}" for i in range(100)]), "HTTP/1.1 400 Bad Request"),
        (b"GET /metrics HTTP/1.1\r\n", "HTTP/1.1 400 Bad Request"),  # ends mid-head
    ],
)
async def test_bad_requests_are_answered(
    endpoint: tuple[Metrics, int], request_bytes: bytes, expected: str
) -> None:
    _, port = endpoint
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request_bytes)
    if request_bytes.endswith(b"HTTP/1.1\r\n"):
        writer.write_eof()
    await writer.drain()
    async with asyncio.timeout(5):
        response = await reader.read()
    writer.close()
    await writer.wait_closed()
    assert response.split(b"\r\n", 1)[0].decode() == expected
    if "405" in expected:
        assert b"\r\nAllow: GET, HEAD\r\n" in response


async def test_a_client_that_never_finishes_its_head_gets_408(
    endpoint: tuple[Metrics, int],
) -> None:
    _, port = endpoint
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metr")  # and nothing more
    await writer.drain()
    async with asyncio.timeout(5):  # the endpoint's read timeout is 0.5 s
        response = await reader.read()
    writer.close()
    await writer.wait_closed()
    assert response.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    _, port = endpoint
    status, _, _ = await exchange(port, get("/metrics"))  # and the endpoint still serves
    assert status == "HTTP/1.1 200 OK"


async def test_a_failing_view_costs_one_scrape(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(now: float) -> list[LicenceUsage]:
        raise RuntimeError("boom")

    m = Metrics(broken, lambda: 0, lambda: NOW)
    server = await m.serve("127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        status, _, _ = await exchange(port, get("/metrics"))
        assert status == "HTTP/1.1 500 Internal Server Error"
    finally:
        server.close()
        await server.wait_closed()


# --- the endpoint under a flood of idle connections -------------------------------------


class Flooded:
    """An endpoint on 127.0.0.1 and the idle connections a test opens to it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._writers: list[asyncio.StreamWriter] = []

    async def idle(self, source: str, n: int) -> list[asyncio.StreamReader]:
        """`n` connections from `source` that never send a byte: their readers, oldest
        first."""
        readers = []
        for _ in range(n):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", self.port, local_addr=(source, 0)
            )
            readers.append(reader)
            self._writers.append(writer)
        return readers

    async def scrape(self, source: str) -> str:
        """GET /metrics from `source`: the status line."""
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", self.port, local_addr=(source, 0)
        )
        writer.write(get("/metrics"))
        async with asyncio.timeout(5):
            response = await reader.read()
        writer.close()
        await writer.wait_closed()
        return response.split(b"\r\n", 1)[0].decode()

    async def answered_but_open(self, source: str) -> None:
        """A scrape that reads its whole response but leaves its end open, so the endpoint
        lingers on it (within `EndpointLimits.linger`)."""
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", self.port, local_addr=(source, 0)
        )
        self._writers.append(writer)
        writer.write(get("/metrics"))
        async with asyncio.timeout(5):
            assert (await reader.read()).startswith(b"HTTP/1.1 200 OK\r\n")

    async def close(self) -> None:
        for writer in self._writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def dropped(reader: asyncio.StreamReader) -> bool:
    """Wait for the endpoint to close this connection: True if it sent nothing first."""
    async with asyncio.timeout(5):
        try:
            data = await reader.read()
        except ConnectionResetError:
            data = b""
    return data == b""


@contextlib.asynccontextmanager
async def flooded(limits: EndpointLimits = DEFAULT_LIMITS) -> AsyncIterator[Flooded]:
    server = await View().metrics().serve("127.0.0.1", 0, limits=limits)
    endpoint = Flooded(server.sockets[0].getsockname()[1])
    try:
        yield endpoint
    finally:
        await endpoint.close()
        server.close()
        await server.wait_closed()


@pytest.fixture
async def small() -> AsyncIterator[Flooded]:
    """Four connections per address, eight in all; the read timeout never fires here."""
    limits = EndpointLimits(max_clients=8, max_per_address=4, read_timeout=300.0)
    async with flooded(limits) as endpoint:
        yield endpoint


async def test_idle_connections_do_not_starve_scrapers_with_the_default_limits() -> None:
    async with flooded() as endpoint:
        flood = await endpoint.idle("127.0.0.1", 20)
        assert await endpoint.scrape("127.0.0.2") == "HTTP/1.1 200 OK"
        assert await endpoint.scrape("127.0.0.1") == "HTTP/1.1 200 OK"
        assert await dropped(flood[0])


async def test_a_flooding_address_loses_its_own_oldest_idle_connections(
    small: Flooded,
) -> None:
    flood = await small.idle("127.0.0.1", 16)
    assert await small.scrape("127.0.0.1") == "HTTP/1.1 200 OK"
    # Each connection past the fourth closed the oldest: twelve by the flood, one by the
    # scrape, whose connection was then the newest and got its answer.
    for reader in flood[:13]:
        assert await dropped(reader)
    # The three newest were still open: with one more, the next scrape closes the oldest.
    await small.idle("127.0.0.1", 1)
    assert await small.scrape("127.0.0.1") == "HTTP/1.1 200 OK"
    assert await dropped(flood[13])


async def test_a_flooding_address_costs_another_address_nothing(small: Flooded) -> None:
    flood = await small.idle("127.0.0.1", 16)
    mine = await small.idle("127.0.0.2", 3)
    assert await small.scrape("127.0.0.2") == "HTTP/1.1 200 OK"  # its own fourth
    for reader in flood[:12]:
        assert await dropped(reader)
    await small.idle("127.0.0.3", 1)  # 4 + 3 + 1: the overall cap of 8
    assert await small.scrape("127.0.0.4") == "HTTP/1.1 200 OK"  # the ninth: the flood pays
    assert await dropped(flood[12])
    assert not any(reader.at_eof() for reader in mine)


async def test_the_overall_cap_closes_the_oldest_of_the_busiest_address(
    small: Flooded,
) -> None:
    busiest = await small.idle("127.0.0.9", 3)
    others = [await small.idle(f"127.0.0.{i}", 1) for i in range(2, 7)]  # 3 + 5: the cap
    # The ninth, from an address that holds one: the busiest address pays, not its own.
    assert await small.scrape("127.0.0.2") == "HTTP/1.1 200 OK"
    assert await dropped(busiest[0])
    assert not any(reader.at_eof() for (reader,) in others)


async def test_an_idle_connection_makes_room_before_one_being_answered() -> None:
    limits = EndpointLimits(max_clients=8, max_per_address=2, read_timeout=300.0, linger=300.0)
    async with flooded(limits) as endpoint:
        await endpoint.answered_but_open("127.0.0.1")
        first, _ = await endpoint.idle("127.0.0.1", 2)  # the third: one must go
        assert await dropped(first)  # not the older one, still being answered
