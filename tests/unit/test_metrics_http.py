"""The metrics endpoint: scrapes in both formats, bad requests, deadlines, and floods of
idle connections, served from a real registry (tests/unit/test_metrics.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from licd.observe.metrics import LicenceUsage, Metrics
from licd.shells.metrics_http import DEFAULT_LIMITS, EndpointLimits, serve_metrics
from tests.unit.test_metrics import NOW, View, feed

# --- the HTTP endpoint ----------------------------------------------------------------


@pytest.fixture
async def endpoint() -> AsyncIterator[tuple[Metrics, int]]:
    m = View().metrics()
    feed(m)
    server = await serve_metrics(
        m.exposition, "127.0.0.1", 0, limits=EndpointLimits(read_timeout=0.5)
    )
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
    server = await serve_metrics(m.exposition, "127.0.0.1", 0)
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
    server = await serve_metrics(View().metrics().exposition, "127.0.0.1", 0, limits=limits)
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
