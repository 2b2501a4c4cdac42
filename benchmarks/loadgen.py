"""The load generator: spawned worker processes speaking licd's protocol over loopback.

Each worker runs one asyncio loop with many connections and one request in flight per
connection (no pipelining; the floor server is driven the same way). The parent drives
the workers over pipes in three phases: set up (connect, hello, checkout), "go" with a
measurement window on the system-wide monotonic clock, and results (latencies as packed
doubles, counts, error codes). Every loop ends by itself at the window's end or at a
request cap, and every wait has a deadline. Percentiles are computed by the parent.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import random
import resource
import secrets
import time
from array import array
from collections import Counter
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, cast

from licd_client.wire import MAX_FRAME_AFTER_HELLO, REPLY_LIMITS, FrameDecoder, encode

#: The protocol the clients speak: 2, as licd_client does, so licd may batch signatures.
PROTOCOL = 2

#: Modes: "heartbeat" (renew in a tight loop), "churn" (checkout + checkin cycles),
#: "site" (scheduled renewals plus scheduled churn), "hold" (hold a lease, idle or with
#: slow renewals).
MODES = ("heartbeat", "churn", "site", "hold")
DUMMY_LEASE = "x" * 32  # what a floor server's fixed reply leaves us to renew


@dataclass(frozen=True)
class Plan:
    """One worker's share of a scenario (picklable: it crosses to a spawned process)."""

    mode: str
    host: str
    port: int
    key: str
    worker: int
    connections: int  # renewing / holding connections of this worker
    churn_connections: int = 0  # site: connections doing checkout + checkin cycles
    interval: float = 0.0  # site / hold: seconds between one connection's heartbeats
    churn_interval: float = 0.0  # site: seconds between one churn connection's cycles
    connect_concurrency: int = 64
    setup_timeout: float = 120.0
    go_timeout: float = 600.0
    request_timeout: float = 10.0
    max_requests: int = 5_000_000  # per worker, whatever the window


@dataclass
class Recorder:
    """Latencies of requests sent inside [start, end), by kind; errors by code."""

    start: float
    end: float
    latencies: dict[str, array[float]] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    sent: int = 0
    reply_bytes: int = 0

    def add(self, kind: str, sent_at: float, seconds: float) -> None:
        if self.start <= sent_at < self.end:
            lat = self.latencies.get(kind)
            if lat is None:
                lat = self.latencies[kind] = array("d")
            lat.append(seconds)

    def result(self) -> dict[str, Any]:
        return {
            "latencies": {k: v.tobytes() for k, v in self.latencies.items()},
            "errors": dict(self.errors),
            "sent": self.sent,
            "reply_bytes": self.reply_bytes,
        }


class RequestFailed(Exception):
    """An error reply: its wire code."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


class FrameClient(asyncio.Protocol):
    """One connection: raw frames out, decoded maps in, one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._decoder = FrameDecoder(MAX_FRAME_AFTER_HELLO * 4, REPLY_LIMITS)
        self._waiter: asyncio.Future[dict[str, Any]] | None = None
        self.sent_at = 0.0  # monotonic time of the request in flight (watchdog)
        self.closed = False
        self.last_size = 0
        self._rid = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # any asyncio loop's

    def data_received(self, data: bytes) -> None:
        try:
            self._decoder.feed(data)
            while (frame := self._decoder.next_frame()) is not None:
                waiter, self._waiter = self._waiter, None
                if waiter is not None and not waiter.done():
                    self.last_size = len(data)
                    waiter.set_result(frame)
        except Exception as exc:  # a broken stream: fail the request, drop the connection
            self._fail(ConnectionError(f"bad reply stream: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError("connection lost"))

    def _fail(self, exc: Exception) -> None:
        self.closed = True
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    def abort_stalled(self, now: float, timeout: float) -> bool:
        if self._waiter is not None and now - self.sent_at > timeout:
            self._fail(TimeoutError("no reply in time"))
            return True
        return False

    async def call(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send one request and return its ok reply, or raise RequestFailed/ConnectionError."""
        if self.closed or self.transport is None:
            raise ConnectionError("connection closed")
        self._rid += 1
        message["id"] = self._rid
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiter = fut
        self.sent_at = time.monotonic()
        self.transport.write(encode(message))
        reply = await fut
        if reply.get("ok") is not True:
            raise RequestFailed(str(reply.get("error")))
        return reply

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def raise_nofile() -> int:
    """Raise this process's open-file limit to its hard limit; the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        new = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ----------------------------------------------------------------------------- worker


def worker_main(plan: Plan, pipe: Connection) -> None:
    """Entry point of a spawned worker process."""
    raise_nofile()
    try:
        asyncio.run(_worker(plan, pipe))
    except Exception as exc:  # report rather than die silently
        with contextlib.suppress(OSError, ValueError):
            pipe.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        pipe.close()


class _Worker:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.holder = {"host": f"bench-w{plan.worker}", "user": "bench", "pid": os.getpid()}
        self.clients: list[FrameClient] = []
        self.leases: list[str] = []
        self.churners: list[FrameClient] = []
        self.setup_errors: Counter[str] = Counter()
        self._n = 0
        self._salt = secrets.token_hex(11)  # 22 characters: request keys long enough alone

    def request_key(self, prefix: str, conn: int) -> str:
        """Unique, and at least the 22 characters (128 bits) the protocol asks for."""
        self._n += 1
        return f"{prefix}{self.plan.worker}-{conn}-{self._n}-{self._salt}"

    def checkout_msg(self, conn: int, prefix: str) -> dict[str, Any]:
        return {
            "op": "checkout",
            "key": self.plan.key,
            "holder": {**self.holder, "hostid": f"bench-w{self.plan.worker}-c{conn}"},
            "request": self.request_key(prefix, conn),
            "nonce": os.urandom(16),
        }

    async def connect(self, index: int, gate: asyncio.Semaphore, hold: bool) -> None:
        loop = asyncio.get_running_loop()
        plan = self.plan
        async with gate:
            try:
                async with asyncio.timeout(plan.request_timeout):
                    _, client = await loop.create_connection(FrameClient, plan.host, plan.port)
                    await client.call(
                        {"op": "hello", "protocol": PROTOCOL, "client": "licd-bench/1"}
                    )
                    lease = ""
                    if hold:
                        reply = await client.call(self.checkout_msg(index, "h"))
                        lease = str(reply.get("lease", DUMMY_LEASE))
            except RequestFailed as exc:
                self.setup_errors[exc.code] += 1
                return
            except (OSError, TimeoutError) as exc:
                self.setup_errors[type(exc).__name__] += 1
                return
        if hold:
            self.clients.append(client)
            self.leases.append(lease)
        else:
            self.churners.append(client)

    async def setup(self) -> None:
        plan = self.plan
        gate = asyncio.Semaphore(plan.connect_concurrency)
        hold = plan.mode != "churn"
        n_hold = plan.connections if hold else 0
        n_churn = plan.connections if plan.mode == "churn" else plan.churn_connections
        async with asyncio.timeout(plan.setup_timeout):
            await asyncio.gather(
                *(self.connect(i, gate, True) for i in range(n_hold)),
                *(self.connect(n_hold + i, gate, False) for i in range(n_churn)),
            )

    # --- the load -------------------------------------------------------------------

    async def _sends(self, rec: Recorder, interval: float, requests: int) -> AsyncIterator[float]:
        """When to send next (the monotonic time, yielded): back to back (interval 0) or
        every `interval` s from a random phase, until the window ends or the request cap
        is reached; each send counts `requests` towards the cap."""
        end = rec.end
        next_at = time.monotonic() + random.uniform(0, interval)
        while rec.sent < self.plan.max_requests:
            if interval:
                if next_at >= end:
                    return
                delay = next_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                next_at += interval
            sent_at = time.monotonic()
            if sent_at >= end:
                return
            rec.sent += requests
            yield sent_at

    async def renew_loop(
        self, rec: Recorder, client: FrameClient, lease: str, interval: float
    ) -> None:
        """Heartbeats: back to back (interval 0) or on a fixed schedule."""
        async for sent_at in self._sends(rec, interval, 1):
            t0 = time.perf_counter()
            try:
                await client.call({"op": "heartbeat", "lease": lease, "nonce": os.urandom(16)})
            except RequestFailed as exc:
                rec.errors[exc.code] += 1
                continue
            except (ConnectionError, TimeoutError) as exc:
                rec.errors[type(exc).__name__] += 1
                return
            rec.add("heartbeat", sent_at, time.perf_counter() - t0)
            rec.reply_bytes = client.last_size

    async def churn_loop(
        self, rec: Recorder, client: FrameClient, conn: int, interval: float
    ) -> None:
        """checkout + checkin cycles: back to back (interval 0) or on a schedule."""
        async for sent_at in self._sends(rec, interval, 2):
            try:
                t0 = time.perf_counter()
                reply = await client.call(self.checkout_msg(conn, "c"))
                t1 = time.perf_counter()
                await client.call({"op": "checkin", "lease": reply.get("lease", DUMMY_LEASE)})
                t2 = time.perf_counter()
            except RequestFailed as exc:
                rec.errors[exc.code] += 1
                continue
            except (ConnectionError, TimeoutError) as exc:
                rec.errors[type(exc).__name__] += 1
                return
            rec.add("checkout", sent_at, t1 - t0)
            rec.add("checkin", sent_at, t2 - t1)
            rec.add("cycle", sent_at, t2 - t0)

    async def idle_until(self, end: float) -> None:
        delay = end - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    async def watchdog(self, end: float) -> None:
        """Fails requests that get no reply within request_timeout (bounded by `end`)."""
        timeout = self.plan.request_timeout
        while (now := time.monotonic()) < end + timeout:
            for client in self.clients + self.churners:
                client.abort_stalled(now, timeout)
            await asyncio.sleep(0.5)

    async def run(self, start: float, end: float) -> Recorder:
        plan = self.plan
        rec = Recorder(start, end)
        jobs: list[Coroutine[Any, Any, None]] = []
        renew_interval = plan.interval if plan.mode in ("site", "hold") else 0.0
        if plan.mode in ("heartbeat", "site") or (plan.mode == "hold" and plan.interval > 0):
            for client, lease in zip(self.clients, self.leases, strict=True):
                jobs.append(self.renew_loop(rec, client, lease, renew_interval))
        if plan.mode in ("churn", "site"):
            churn_interval = plan.churn_interval if plan.mode == "site" else 0.0
            for i, client in enumerate(self.churners):
                jobs.append(self.churn_loop(rec, client, i, churn_interval))
        if not jobs:
            jobs.append(self.idle_until(end))
        dog = asyncio.create_task(self.watchdog(end))
        try:
            await asyncio.gather(*jobs)
        finally:
            dog.cancel()
        return rec

    def close(self) -> None:
        for client in self.clients + self.churners:
            client.close()


async def _recv(pipe: Connection, within: float) -> Any:
    """The parent's next message, waiting at most `within` seconds (in a thread: the
    pipe blocks)."""

    def wait() -> Any:
        if not pipe.poll(within):
            return ("stop", "no message from the parent in time")
        return pipe.recv()

    return await asyncio.to_thread(wait)


async def _worker(plan: Plan, pipe: Connection) -> None:
    worker = _Worker(plan)
    t0 = time.monotonic()
    try:
        await worker.setup()
        pipe.send(
            (
                "ready",
                {
                    "connections": len(worker.clients) + len(worker.churners),
                    "setup_seconds": time.monotonic() - t0,
                    "errors": dict(worker.setup_errors),
                },
            )
        )
        message = await _recv(pipe, plan.go_timeout)
        if message[0] != "go":
            return
        _, start, end = message
        rec = await worker.run(start, end)
        pipe.send(("result", rec.result()))
        # Hold the connections until the parent has sampled what it needs.
        await _recv(pipe, plan.go_timeout)
    finally:
        worker.close()
        await asyncio.sleep(0)  # let the transports close


# ----------------------------------------------------------------------------- parent


@dataclass
class Results:
    """What the workers measured, merged."""

    latencies: dict[str, list[float]]
    errors: Counter[str]
    sent: int
    reply_bytes: int
    window: float

    def count(self, kind: str) -> int:
        return len(self.latencies.get(kind, ()))

    def rate(self, kind: str) -> float:
        return self.count(kind) / self.window if self.window > 0 else 0.0

    def requests(self) -> list[float]:
        """Latencies of every request (a churn "cycle" is two requests, counted apart)."""
        return [x for kind, v in self.latencies.items() if kind != "cycle" for x in v]


class LoadGen:
    """Spawns one worker per plan; `setup()`, then `go()`, then `collect()`; `close()`
    (or the `with` block) ends every worker it started."""

    def __init__(self, plans: list[Plan]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.plans = plans
        self._pipes: list[Connection] = []
        self._procs: list[multiprocessing.process.BaseProcess] = []
        for plan in plans:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(plan, child), daemon=True)
            proc.start()
            child.close()
            self._pipes.append(parent)
            self._procs.append(proc)
        self.window = (0.0, 0.0)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None]

    def _receive(self, pipe: Connection, deadline: float, expect: str) -> Any:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not pipe.poll(remaining):
            raise TimeoutError(f"a load worker sent no {expect!r} in time")
        kind, payload = pipe.recv()
        if kind != expect:
            raise RuntimeError(f"a load worker failed: {payload}")
        return payload

    def setup(self, timeout: float) -> dict[str, Any]:
        """Wait until every worker has its connections; their merged setup report."""
        deadline = time.monotonic() + timeout
        reports = [self._receive(p, deadline, "ready") for p in self._pipes]
        errors: Counter[str] = Counter()
        for r in reports:
            errors.update(r["errors"])
        return {
            "connections": sum(r["connections"] for r in reports),
            "setup_seconds": max(r["setup_seconds"] for r in reports),
            "errors": dict(errors),
        }

    def go(self, warmup: float, duration: float) -> tuple[float, float]:
        """Start the load now; measure from `warmup` s on for `duration` s. The window."""
        start = time.monotonic() + warmup
        end = start + duration
        for pipe in self._pipes:
            pipe.send(("go", start, end))
        self.window = (start, end)
        return self.window

    def collect(self, timeout: float) -> Results:
        deadline = self.window[1] + timeout
        latencies: dict[str, list[float]] = {}
        errors: Counter[str] = Counter()
        sent = reply_bytes = 0
        for pipe in self._pipes:
            payload = self._receive(pipe, deadline, "result")
            for kind, packed in payload["latencies"].items():
                values = array("d")
                values.frombytes(packed)
                latencies.setdefault(kind, []).extend(values)
            errors.update(payload["errors"])
            sent += payload["sent"]
            reply_bytes = max(reply_bytes, payload["reply_bytes"])
        return Results(latencies, errors, sent, reply_bytes, self.window[1] - self.window[0])

    def close(self, timeout: float = 10.0) -> None:
        for pipe in self._pipes:
            with contextlib.suppress(OSError, ValueError):
                pipe.send(("stop", None))
        deadline = time.monotonic() + timeout
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(5.0)
        for pipe in self._pipes:
            pipe.close()

    def __enter__(self) -> LoadGen:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def split(total: int, parts: int) -> list[int]:
    """`total` divided into `parts` near-equal shares."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]
