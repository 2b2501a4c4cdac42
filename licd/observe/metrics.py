"""Prometheus/OpenMetrics metrics: counters fed by domain events, gauges read at scrape.

Counts live in this daemon's own `CollectorRegistry` (never the global one); seat and
connection gauges are computed by a collector from the engine at each scrape, and
`Metrics.exposition()` renders the registry in either format. Serving it is the shell's
job (`licd.shells.metrics_http`), wired by the composition root. This module must not
decide anything, do I/O or raise into its callers: it only counts and reports.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest as text_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS_TYPE
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest

from licd.core.events import Event, Kind
from licd.engine import Engine

#: The classic text format; what a scraper gets unless it asks for OpenMetrics.
TEXT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Request latencies of a daemon whose floor is tens of microseconds, up to slow commits.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class LicenceUsage:
    """What the gauges (and alerts) need to know of one licence, read at one instant."""

    id: str
    product: str
    total: int  # seats in force at that instant: the licence's plus its active add-ons'
    in_use: int
    expires: float | None  # wall clock seconds; None: never
    reserved: int = 0  # free seats kept for groups' members (Availability.reserved)
    waiting: int = 0  # checkouts in the licence's queue
    lingering: int = 0  # seats checked in and kept for their holders (`linger`)

    @property
    def available(self) -> int:
        """Free seats anyone may take, as the `available` op counts them."""
        return max(0, self.total - self.in_use - self.reserved)


def engine_usage(engine: Engine, now: float) -> list[LicenceUsage]:
    """The usage of every licence the engine serves at wall time `now` (an `engine_view`).
    The engine counts the seats (`Engine.usage`: add-ons included, reservations held
    back), as `licd status`, `available` and checkouts do."""
    out = []
    lingering: dict[str, int] = {}
    for lease in engine.lingering:
        lingering[lease.licence_id] = lingering.get(lease.licence_id, 0) + lease.seats
    for lic in engine.licences:
        seats = engine.usage(lic, now)
        out.append(
            LicenceUsage(
                lic.id,
                lic.product,
                seats.total,
                seats.in_use,
                lic.expires,
                seats.reserved,
                waiting=len(engine.queues.get(lic.id, ())),
                lingering=lingering.get(lic.id, 0),
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
            GaugeMetricFamily(
                "licd_queue_waiting",
                "Checkouts waiting in the licence's queue.",
                labels=seat_labels,
            ),
            GaugeMetricFamily(
                "licd_seats_lingering",
                "Seats checked in and kept for their holders a while (linger).",
                labels=seat_labels,
            ),
        )

    def describe(self) -> Iterator[Metric]:
        """The names this collector exposes, so the registry can detect clashes."""
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        families = self._families()
        licensed, in_use, available, reserved, expiry, connections, waiting, lingering = families
        now = self._wall()
        for usage in self._engine_view(now):
            labels = (usage.id, usage.product)
            licensed.add_metric(labels, usage.total)
            in_use.add_metric(labels, usage.in_use)
            available.add_metric(labels, usage.available)
            reserved.add_metric(labels, usage.reserved)
            waiting.add_metric(labels, usage.waiting)
            lingering.add_metric(labels, usage.lingering)
            if usage.expires is not None:
                expiry.add_metric((usage.id,), usage.expires - now)
        connections.add_metric((), self._connections())
        yield from families


class Metrics:
    """The daemon's metrics: an EventBus subscriber, call-in counters and the exposition."""

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
        self._idle_reclaims = Counter(
            "licd_idle_reclaims",
            "Leases reclaimed because their app was idle past idle_timeout.",
            lic,
            registry=r,
        )
        self._queued = Counter("licd_queued", "Checkouts that joined a queue.", lic, registry=r)
        self._queue_left = Counter(
            "licd_queue_left",
            "Queued checkouts that left without a seat, by why (gone, an error code).",
            (*lic, "why"),
            registry=r,
        )
        self._queue_wait = Histogram(
            "licd_queue_wait",
            "Time a checkout served from the queue waited for its seat.",
            lic,
            unit="seconds",
            buckets=(1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0),
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
        self._clock_behind = Gauge(
            "licd_clock_behind",
            "How far the system clock was found behind the latest time the daemon has seen,"
            " while that is over [server] clock_skew (vendor licences hold new grants); 0"
            " otherwise.",
            unit="seconds",
            registry=r,
        )
        self._request_children: dict[str, Histogram] = {}
        self._children: dict[tuple[int, tuple[str, ...]], Counter] = {}
        r.register(_StateCollector(engine_view, connections, clock_wall))

    # ------------------------------------------------------------------ counting

    def on_event(self, event: Event) -> None:
        """EventBus subscriber: count the changes and denials that matter to operators."""
        licence = event.licence or ""  # a denial of an unknown key names no licence
        kind = event.kind
        if kind is Kind.CHECKOUT:
            self._child(self._checkouts, licence).inc()
            if event.detail.get("overdraft"):
                self._child(self._overdraft, licence).inc()
            waited = event.detail.get("queued")
            if waited is not None:
                self._queue_wait.labels(licence).observe(float(waited))
        elif kind is Kind.QUEUED:
            self._child(self._queued, licence).inc()
        elif kind is Kind.QUEUE_LEFT:
            self._child(self._queue_left, licence, str(event.detail.get("why", ""))).inc()
        elif kind is Kind.DENIED:
            self._child(self._denials, licence, event.reason or "unknown").inc()
        elif kind is Kind.CHECKIN:
            self._child(self._checkins, licence).inc()
        elif kind is Kind.RECLAIM:
            self._child(self._reclaims, licence).inc()
            if event.reason == "idle":
                self._child(self._idle_reclaims, licence).inc()
        elif kind is Kind.REVOKE:
            self._child(self._revokes, licence).inc()
        elif kind is Kind.CLOCK_ROLLBACK:
            self._clock_behind.set(float(event.detail.get("behind", 0.0)))
        elif kind is Kind.CLOCK_RESTORED:
            self._clock_behind.set(0.0)

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
