"""The metrics endpoint: a minimal HTTP/1.1 server answering `GET /metrics` scrapes.

It serves what an `Exposition` callable renders (the registry of `licd.observe.metrics`,
wired by the composition root) and knows nothing else of the daemon. It runs on the event
loop, so the registry reads engine state without a lock. Every connection is bounded
(`EndpointLimits`): one request head, read within a deadline and a size, one response,
then close. A failing exposition costs one scrape (500), never the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus

log = logging.getLogger(__name__)

#: The registry rendered for a scrape: given whether the scraper accepts OpenMetrics,
#: (body, content type).
Exposition = Callable[[bool], tuple[bytes, str]]

METRICS_PATH = "/metrics"
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


async def serve_metrics(
    exposition: Exposition, host: str, port: int, *, limits: EndpointLimits = DEFAULT_LIMITS
) -> asyncio.Server:
    """Listen for scrapes at `host:port`; the caller closes the returned server."""
    clients = _Clients(limits)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Nobody awaits this task: cancelled at shutdown, it simply ends (Python 3.11's
        # start_server would otherwise log the CancelledError as an error).
        with contextlib.suppress(asyncio.CancelledError):
            await _handle(exposition, reader, writer, clients, limits)

    return await asyncio.start_server(handle, host, port, limit=MAX_REQUEST_HEAD)


async def _handle(
    exposition: Exposition,
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
            response = _respond(exposition, head)
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


def _respond(exposition: Exposition, head: _Head) -> bytes:
    if head.path != METRICS_PATH:
        return _response(HTTPStatus.NOT_FOUND)
    if head.method not in ("GET", "HEAD"):
        return _response(HTTPStatus.METHOD_NOT_ALLOWED, extra=(("Allow", "GET, HEAD"),))
    try:
        body, content_type = exposition("application/openmetrics-text" in head.accept)
    except Exception:  # a broken view must cost a scrape, never the daemon
        log.exception("event=metrics_exposition_failed")
        return _response(HTTPStatus.INTERNAL_SERVER_ERROR)
    return _response(HTTPStatus.OK, body, content_type, head_only=head.method == "HEAD")


# --- connections and the request reader ---------------------------------------------


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
