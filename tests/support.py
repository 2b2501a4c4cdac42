"""Test support: configs, an in-process daemon on 127.0.0.1 port 0, a raw protocol peer.

The raw peer speaks frames by hand (it can send garbage on purpose); the real client
library is tested on its own and against the daemon in tests/integration.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client.parser import text_string_to_metric_families

from licd.clock import Clock, ManualClock
from licd.config.settings import Config, ServerConfig
from licd.core.errors import Audience, wire_error
from licd.core.service import LicenceService
from licd.daemon import Daemon
from licd.deferred import Deferred
from licd.engine import Engine, Grant, Licence, SeatLease
from licd.engine.counters import Consumed
from licd.store.base import Store
from licd_client.messages import Holder
from licd_client.wire import REPLY_LIMITS, FrameDecoder, encode

DICOM = Licence(
    key="XXXX-YYYY-ZZZZ",
    id="dicom-hq",
    product="dicom",
    seats=3,
    lease_ttl=90.0,
    grace=15.0,
    features={"tier": "pro", "modules": "core,ocr"},
)


def make_config(state_dir: Path, *licences: Licence, **server: Any) -> Config:
    base = ServerConfig(listen=(("127.0.0.1", 0),), state_dir=state_dir, site="test")
    return Config(replace(base, **server), licences or (DICOM,), None)


def new_engine(licences: Iterable[Licence], **options: Any) -> Engine:
    """An engine drawing its secrets and handles from `os.urandom`, as the daemon's does."""
    return Engine(licences, random_bytes=os.urandom, **options)


def holder(host: str = "machine-a", *, user: str = "alice", pid: int | None = None) -> Holder:
    return Holder(
        host=host, hostid=f"id-{host}", user=user, pid=os.getpid() if pid is None else pid
    )


async def checkout_committed(
    service: LicenceService, key: str, holder: Holder, **options: Any
) -> Grant:
    """`service.begin_checkout`, answered as dispatch answers it: the grant once its
    commit is done; a failed commit raises what a client is told (`unavailable`)."""
    grant, commit = service.begin_checkout(key, holder, **options)
    if commit is not None:
        await _committed(commit)
        service.checkout_landed(grant)
    return grant


async def consume_committed(
    service: LicenceService, secret: str, counter: str, units: int, dedup: str | None
) -> Consumed:
    """`service.begin_consume`, answered as dispatch answers it (`checkout_committed`)."""
    consumed, commit = service.begin_consume(secret, counter, units, dedup)
    if commit is not None:
        await _committed(commit)
    return consumed


async def _committed(commit: Deferred[None]) -> None:
    try:
        await commit
    except Exception as exc:
        raise wire_error(exc, Audience.CLIENT) from None


@contextlib.asynccontextmanager
async def running(
    config: Config, clock: Clock | None = None, *, components: Iterable[str] | None = None
) -> AsyncIterator[Daemon]:
    """A daemon serving in this event loop until the block ends (`components`: the
    host-id components it binds entitlements to; by default this machine's)."""
    daemon = await Daemon.open(config, clock=clock or ManualClock(), components=components)
    stop = asyncio.Event()
    ready = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop, on_ready=lambda _: ready.set()))
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        waiter.cancel()
        task.result()  # raises the startup error
    try:
        yield daemon
    finally:
        stop.set()
        await task


def stored_lease(n: int, *, at: float = 1_790_000_000.0, **kw: Any) -> SeatLease:
    """Lease number `n` of DICOM as the store keeps it (a unit of its own), `kw` changed."""
    fields: dict[str, Any] = {
        "secret": f"secret-{n}",
        "handle": f"h{n}",
        "licence_id": DICOM.id,
        "holder": holder(f"host-{n}"),
        "request": f"r{n}",
        "seats": 1,
        "ttl": 90.0,
        "created": at,
        "expires": at + 90,
        "last_heartbeat": at,
        "unit": f"unit-{n}",
    }
    fields.update(kw)
    return SeatLease(**fields)


S = TypeVar("S", bound=Store)


@contextlib.asynccontextmanager
async def writing(store: S) -> AsyncIterator[S]:
    """`store` (opened) with its writer running; closed on exit, lazy writes written."""
    writer = asyncio.create_task(store.run())
    try:
        yield store
    finally:
        await store.close()
        await writer


def address(daemon: Daemon) -> tuple[str, int]:
    return daemon.server.addresses[0]


class RawPeer:
    """A protocol peer with no manners: sends what it is told, reads what comes back."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = FrameDecoder(1 << 20, REPLY_LIMITS)
        self._next_id = 0

    @classmethod
    async def connect(cls, addr: tuple[str, int]) -> RawPeer:
        reader, writer = await asyncio.open_connection(*addr)
        return cls(reader, writer)

    async def send_bytes(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send(self, message: dict[str, Any]) -> None:
        await self.send_bytes(encode(message))

    async def recv(self, within: float = 5.0) -> dict[str, Any] | None:
        """The next reply, or None when the daemon closed the connection."""
        async with asyncio.timeout(within):
            while True:
                frame = self.decoder.next_frame()
                if frame is not None:
                    return frame
                data = await self.reader.read(65536)
                if not data:
                    return None
                self.decoder.feed(data)

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        self._next_id += 1
        await self.send({"op": op, "id": self._next_id, **args})
        reply = await self.recv()
        assert reply is not None, f"connection closed instead of answering {op}"
        assert reply["id"] == self._next_id
        return reply

    async def hello(self) -> dict[str, Any]:
        reply = await self.call("hello", protocol=1, client="tests/1")
        assert reply["ok"] is True, reply
        return reply

    async def checkout(
        self, key: str = DICOM.key, h: Holder | None = None, **args: Any
    ) -> dict[str, Any]:
        args.setdefault("request", os.urandom(16).hex())
        args.setdefault("nonce", os.urandom(16))
        return await self.call("checkout", key=key, holder=(h or holder()).to_wire(), **args)

    async def closed(self, within: float = 5.0) -> bool:
        """True when the daemon closes the connection (after any pending replies, which
        are dropped) within `within` seconds; False when it is still open then. Either
        way our end is closed afterwards."""
        try:
            async with asyncio.timeout(within):
                while await self.reader.read(65536):
                    pass
        except TimeoutError:  # before OSError: since Python 3.11 it is one
            return False
        except OSError:  # a reset closes it too
            pass
        finally:
            await self.close()
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


async def scrape(addr: tuple[str, int]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics from a daemon's endpoint: every sample, keyed (name, sorted labels)."""
    reader, writer = await asyncio.open_connection(*addr)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    await writer.drain()
    async with asyncio.timeout(10):
        raw = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


#: Sockets holding the ports `reserved_port()` handed out; closed after each test by
#: the autouse fixture in tests/conftest.py.
_RESERVED: list[socket.socket] = []


def reserved_port(host: str = "127.0.0.1") -> int:
    """A port on `host` that daemons of this test may bind, again and again, and no other
    process can take until the test ends: for a daemon restarted on the same address, or
    an address that must be named (router upstream) before its daemon starts.

    Prefer port 0 and `address(daemon)`: only use this where the port must outlive one
    daemon. The port is held by a bound, never listening socket with SO_REUSEADDR. Linux
    lets another SO_REUSEADDR socket (asyncio's `create_server` sets it) bind and listen
    on it, while a plain `bind` elsewhere fails with EADDRINUSE and `bind(port 0)` or an
    outgoing connection never picks it. Connecting to it while no daemon listens is
    refused at once.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    except BaseException:
        sock.close()
        raise
    _RESERVED.append(sock)
    return port


def release_reserved_ports() -> None:
    while _RESERVED:
        _RESERVED.pop().close()
