"""Prometheus/OpenMetrics metrics: counters fed by domain events, gauges read at scrape.

Counts live in this daemon's own `CollectorRegistry` (never the global one); seat and
connection gauges are computed by a collector from the engine at each scrape. `serve()` is
a minimal HTTP/1.1 endpoint on the event loop, so reading engine state needs no lock. It
must not decide anything or raise into its callers: it only counts and reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http import HTTPStatus

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest as text_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS_TYPE
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest

from licd.core.events import Event, Kind
from licd.engine import Engine

log = logging.getLogger(__name__)

#: The classic text format; what a scraper gets unless it asks for OpenMetrics.
TEXT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
METRICS_PATH = "/metrics"
#: Request latencies of a daemon whose floor is tens of microseconds, up to slow commits.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
)  # fmt: skip
#: A request head larger than this, or in more lines, is answered 400.
MAX_REQUEST_HEAD = 8192
MAX_HEADER_LINES = 64
#: After a response, what the peer still sends is read (and dropped) this many times at most.
LINGER_CHUNKS = 16


@dataclass(frozen=True, slots=True)
class EndpointLimits:
    """The HTTP endpoint's bounds. A request head not whole within `read_timeout` is
    answered 408 and closed. Past `max_per_address` connections from one peer address, or
    `max_clients` in all, a new connection is still served: room is made by closing the
    oldest connection of its own address if that is full, else of the address holding the
    most, one still waiting for its request head before one being answered. So idle
    connections cost only their own address, and a scraper that sends its request at once
    is served even from an address that floods."""

    max_clients: int = 64
    max_per_address: int = 8
    read_timeout: float = 5.0  # seconds for a whole request head
    write_timeout: float = 10.0  # seconds for the response to drain
    linger: float = 1.0  # seconds to read what the peer still sends after the response

    def __post_init__(self) -> None:
        if not 1 <= self.max_per_address <= self.max_clients:
            raise ValueError("need 1 <= max_per_address <= max_clients")


DEFAULT_LIMITS = EndpointLimits()


@dataclass(frozen=True, slots=True)
class LicenceUsage:
    """What the gauges (and alerts) need to know of one licence, read at one instant."""

    id: str
    product: str
    total: int  # seats in force at that instant: the licence's plus its active add-ons'
    in_use: int
    expires: float | None  # wall clock seconds; None: never
    reserved: int = 0  # free seats kept for groups' members (Availability.reserved)

    @property
    def available(self) -> int:
        """Free seats anyone may take, as the `available` op counts them."""
        return max(0, self.total - self.in_use - self.reserved)


def engine_usage(engine: Engine, now: float) -> list[LicenceUsage]:
    """The usage of every licence the engine serves at wall time `now` (an `engine_view`).
    The engine counts the seats (`Engine.usage`: add-ons included, reservations held
    back), as `licd status`, `available` and checkouts do."""
    out = []
    for lic in engine.licences:
        seats = engine.usage(lic, now)
        out.append(
            LicenceUsage(
                lic.id, lic.product, seats.total, seats.in_use, lic.expires, seats.reserved
            )
        )
    return out


class _StateCollector:
    """Gauges computed at scrape time from the engine view and the connection count."""

    def __init__(
        self,
        engine_view: Callable[[float], Iterable[LicenceUsage]],
        connections: Callable[[], int],
        clock_wall: Callable[[], float],
    ) -> None:
        self._engine_view = engine_view
        self._connections = connections
        self._wall = clock_wall

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, ...]:
        seat_labels = ("licence", "product")
        return (
            GaugeMetricFamily(
                "licd_seats_licensed",
                "Seats in force: the licence's plus its active add-ons'.",
                labels=seat_labels,
            ),
            GaugeMetricFamily(
                "licd_seats_in_use", "Seats held by live leases.", labels=seat_labels
            ),
            GaugeMetricFamily(
                "licd_seats_available",
                "Seats free for anyone to check out now.",
                labels=seat_labels,
            ),
            GaugeMetricFamily(
                "licd_seats_reserved",
                "Free seats kept for the groups a reservation names.",
                labels=seat_labels,
            ),
            GaugeMetricFamily(
                "licd_licence_time_to_expiry_seconds",
                "Time left until the licence expires, negative once it has; only licences"
                " with an expiry.",
                labels=("licence",),
                unit="seconds",
            ),
            GaugeMetricFamily("licd_connections", "Open client connections."),
        )

    def describe(self) -> Iterator[Metric]:
        """The names this collector exposes, so the registry can detect clashes."""
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        licensed, in_use, available, reserved, expiry, connections = self._families()
        now = self._wall()
        for usage in self._engine_view(now):
            labels = (usage.id, usage.product)
            licensed.add_metric(labels, usage.total)
            in_use.add_metric(labels, usage.in_use)
            available.add_metric(labels, usage.available)
            reserved.add_metric(labels, usage.reserved)
            if usage.expires is not None:
                expiry.add_metric((usage.id,), usage.expires - now)
        connections.add_metric((), self._connections())
        yield from (licensed, in_use, available, reserved, expiry, connections)


class Metrics:
    """The daemon's metrics: an EventBus subscriber, call-in counters and the endpoint."""

    def __init__(
        self,
        engine_view: Callable[[float], Iterable[LicenceUsage]],
        connections: Callable[[], int],
        clock_wall: Callable[[], float],
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        lic = ("licence",)
        self._checkouts = Counter("licd_checkouts", "Seats checked out.", lic, registry=r)
        self._denials = Counter(
            "licd_denials", "Checkouts refused, by error code.", (*lic, "reason"), registry=r
        )
        self._checkins = Counter("licd_checkins", "Leases checked in.", lic, registry=r)
        self._reclaims = Counter(
            "licd_reclaims", "Leases reclaimed after their holder went silent.", lic, registry=r
        )
        self._revokes = Counter("licd_revokes", "Leases revoked by an admin.", lic, registry=r)
        self._overdraft = Counter(
            "licd_overdraft_grants",
            "Seats granted beyond the licence, in its overdraft.",
            lic,
            registry=r,
        )
        self._heartbeats = Counter("licd_heartbeats", "Lease heartbeats answered.", registry=r)
        self._requests = Histogram(
            "licd_request",
            "Time to answer a client request, by operation.",
            ("op",),
            unit="seconds",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._errors = Counter(
            "licd_errors", "Requests answered with an error, by code.", ("op", "code"), registry=r
        )
        self._alerts = Counter("licd_alerts", "Alerts raised, by kind.", ("kind",), registry=r)
        self._request_children: dict[str, Histogram] = {}
        self._children: dict[tuple[int, tuple[str, ...]], Counter] = {}
        r.register(_StateCollector(engine_view, connections, clock_wall))
        self._clients = 0

    # ------------------------------------------------------------------ counting

    def on_event(self, event: Event) -> None:
        """EventBus subscriber: count the changes and denials that matter to operators."""
        licence = event.licence or ""  # a denial of an unknown key names no licence
        kind = event.kind
        if kind is Kind.CHECKOUT:
            self._child(self._checkouts, licence).inc()
            if event.detail.get("overdraft"):
                self._child(self._overdraft, licence).inc()
        elif kind is Kind.DENIED:
            self._child(self._denials, licence, event.reason or "unknown").inc()
        elif kind is Kind.CHECKIN:
            self._child(self._checkins, licence).inc()
        elif kind is Kind.RECLAIM:
            self._child(self._reclaims, licence).inc()
        elif kind is Kind.REVOKE:
            self._child(self._revokes, licence).inc()

    def _child(self, counter: Counter, *labels: str) -> Counter:
        """`counter.labels(*labels)`, looked up once: labels() takes a lock each call."""
        key = (id(counter), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = counter.labels(*labels)
        return child

    def heartbeat(self) -> None:
        self._heartbeats.inc()

    def observe_request(self, op: str, seconds: float, error: str | None) -> None:
        """One answered request: its latency, and its error code if it failed."""
        child = self._request_children.get(op)
        if child is None:  # labels() costs a lock and a lookup: once per op
            child = self._request_children[op] = self._requests.labels(op)
        child.observe(seconds)
        if error is not None:
            self._errors.labels(op, error).inc()

    def alert(self, kind: str) -> None:
        self._alerts.labels(kind).inc()

    # ---------------------------------------------------------------- exposition

    def exposition(self, openmetrics: bool) -> tuple[bytes, str]:
        """The registry in OpenMetrics or the classic text format: (body, content type)."""
        if openmetrics:
            # prometheus_client leaves its OpenMetrics writer unannotated.
            body: bytes = openmetrics_latest(self.registry)  # type: ignore[no-untyped-call]
            return body, OPENMETRICS_TYPE
        return text_latest(self.registry), TEXT_TYPE

    async def serve(
        self, host: str, port: int, *, limits: EndpointLimits = DEFAULT_LIMITS
    ) -> asyncio.Server:
        """Listen for scrapes at `host:port`; the caller closes the returned server."""
        clients = _Clients(limits)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # Nobody awaits this task: cancelled at shutdown, it simply ends (Python 3.11's
            # start_server would otherwise log the CancelledError as an error).
            with contextlib.suppress(asyncio.CancelledError):
                await self._handle(reader, writer, clients, limits)

        return await asyncio.start_server(handle, host, port, limit=MAX_REQUEST_HEAD)

    async def _handle(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        clients: _Clients,
        limits: EndpointLimits,
    ) -> None:
        peername = writer.get_extra_info("peername")
        client = _Client(str(peername[0]) if peername else "?", writer)
        clients.admit(client)
        try:
            try:
                async with asyncio.timeout(limits.read_timeout):
                    head = await _read_head(reader)
            except TimeoutError:
                response = _response(HTTPStatus.REQUEST_TIMEOUT)
            except (ValueError, asyncio.IncompleteReadError) as exc:
                log.debug("event=metrics_bad_request error=%r", str(exc) or type(exc).__name__)
                response = _response(HTTPStatus.BAD_REQUEST)
            else:
                response = self._respond(head)
            if writer.is_closing():  # closed to make room for another
                return
            client.answering = True
            writer.write(response)
            async with asyncio.timeout(limits.write_timeout):
                await writer.drain()
            await _linger(reader, writer, limits.linger)
        except (OSError, TimeoutError) as exc:
            log.debug("event=metrics_write_failed error=%r", str(exc) or type(exc).__name__)
        finally:
            clients.forget(client)
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()

    def _respond(self, head: _Head) -> bytes:
        if head.path != METRICS_PATH:
            return _response(HTTPStatus.NOT_FOUND)
        if head.method not in ("GET", "HEAD"):
            return _response(HTTPStatus.METHOD_NOT_ALLOWED, extra=(("Allow", "GET, HEAD"),))
        try:
            body, content_type = self.exposition("application/openmetrics-text" in head.accept)
        except Exception:  # a broken view must cost a scrape, never the daemon
            log.exception("event=metrics_exposition_failed")
            return _response(HTTPStatus.INTERNAL_SERVER_ERROR)
        return _response(HTTPStatus.OK, body, content_type, head_only=head.method == "HEAD")


# --- the HTTP/1.1 endpoint's connections and request reader ---------------------------


class _Client:
    """One connection to the endpoint, from `peer` (its address)."""

    __slots__ = ("peer", "writer", "answering")

    def __init__(self, peer: str, writer: asyncio.StreamWriter) -> None:
        self.peer = peer
        self.writer = writer
        self.answering = False  # its request head is read: it is being answered


class _Clients:
    """The endpoint's open connections by peer address, oldest first, within the caps of
    `EndpointLimits` (whose docstring says which connection makes room for a new one)."""

    def __init__(self, limits: EndpointLimits) -> None:
        self._limits = limits
        self._by_peer: dict[str, dict[_Client, None]] = {}
        self._count = 0

    def admit(self, client: _Client) -> None:
        own = self._by_peer.setdefault(client.peer, {})
        if len(own) >= self._limits.max_per_address:
            self._close_one(own)
        elif self._count >= self._limits.max_clients:
            self._close_one(max(self._by_peer.values(), key=len))
        own[client] = None
        self._count += 1

    def forget(self, client: _Client) -> None:
        own = self._by_peer.get(client.peer)
        if own is None or client not in own:
            return  # closed earlier to make room
        del own[client]
        self._count -= 1
        if not own:
            del self._by_peer[client.peer]

    def _close_one(self, clients: dict[_Client, None]) -> None:
        victim = next((c for c in clients if not c.answering), None) or next(iter(clients))
        self.forget(victim)
        log.debug("event=metrics_connection_dropped peer=%s", victim.peer)
        victim.writer.transport.abort()


@dataclass(frozen=True, slots=True)
class _Head:
    method: str
    path: str
    accept: str


async def _read_head(reader: asyncio.StreamReader) -> _Head:
    """The request line and the Accept header; ValueError for anything malformed.

    At most MAX_REQUEST_HEAD bytes in MAX_HEADER_LINES lines are read. A request body,
    if any, is never read: the connection closes after one response.
    """
    budget = MAX_REQUEST_HEAD

    async def line() -> str:
        nonlocal budget
        try:
            data = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            raise ValueError("request head too large") from None
        budget -= len(data)
        if budget < 0:
            raise ValueError("request head too large")
        return data.decode("latin-1")

    parts = (await line()).split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ValueError("not an HTTP/1.x request line")
    method, target, _ = parts
    accept: list[str] = []
    for _ in range(MAX_HEADER_LINES):
        text = (await line()).strip()
        if not text:
            return _Head(method, target.split("?", 1)[0], ",".join(accept))
        name, sep, value = text.partition(":")
        if not sep:
            raise ValueError("malformed header line")
        if name.strip().lower() == "accept":
            accept.append(value.strip())
    raise ValueError("too many header lines")


async def _linger(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seconds: float
) -> None:
    """Half-close, then read what the peer still sends (a body, the rest of a refused
    request) until it closes too, briefly and bounded: closing with unread input would
    reset the connection and the peer could lose the response."""
    if writer.can_write_eof():
        writer.write_eof()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            for _ in range(LINGER_CHUNKS):
                if not await reader.read(MAX_REQUEST_HEAD):
                    break


def _response(
    status: HTTPStatus,
    body: bytes | None = None,
    content_type: str = "text/plain; charset=utf-8",
    *,
    head_only: bool = False,
    extra: tuple[tuple[str, str], ...] = (),
) -> bytes:
    if body is None:
        body = f"{status.value} {status.phrase}\n".encode()
    headers = [
        f"HTTP/1.1 {status.value} {status.phrase}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in extra),
    ]
    head = ("\r\n".join(headers) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body
