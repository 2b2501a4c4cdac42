"""One client connection to a daemon: connect, hello, then pipelined requests in order.

`Connection.open()` tries each `host:port` in order and says hello, with protocol 2 and,
when the daemon does not speak it (an older one), again with 1 on the same connection;
`hello.protocol` is the version settled on, and a batched token in a reply on a protocol-1
connection is a ProtocolViolation (docs/protocol.md, "Versions"). `request()` sends a
typed request with a per-connection id and returns the typed reply (an error reply is
raised as its LicdError). A reader task matches replies to requests strictly in order:
every frame answers the oldest request, and only a checkout sent with `queue` may get
queue updates (docs/protocol.md, "Queueing") before its reply, which its requester sees
as they come. A broken connection fails every pending request with ConnectionLost. No
retries, no lease logic here: the caller decides what to do after a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import socket
import ssl as _ssl
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeAlias

from . import messages, wire
from .backoff import is_retryable
from .clock import Clock, SystemClock
from .errors import ConnectionLost, LicdError, ProtocolViolation, UnsupportedProtocol

Address: TypeAlias = tuple[str, int]
#: Awaited with each queue update of a queued checkout (`Connection.request`).
UpdateCallback: TypeAlias = Callable[[messages.QueueUpdate], Awaitable[object]]

SERVER_ENV = "LICD_SERVER"
DEFAULT_PORT = 27500
DEFAULT_SERVERS: tuple[Address, ...] = (("127.0.0.1", DEFAULT_PORT),)
#: At most this many requests in flight on one connection (docs/protocol.md section 1).
MAX_PIPELINE = 8
#: The version hello asks for first: the newest this code speaks.
NEWEST_PROTOCOL = max(messages.PROTOCOLS)
READ_CHUNK = 65536


def parse_address(text: str) -> Address:
    """`host:port`, `[v6addr]:port` or a bare host (default port 27500)."""
    text = text.strip()
    if not text:
        raise ValueError("empty server address")
    has_port = False
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad server address {text!r}: expected [ipv6]:port")
        has_port, port_text = bool(rest), rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        has_port = True
    else:  # a bare host name, or a bare IPv6 address
        host, port_text = text, ""
    if not host:
        raise ValueError(f"bad server address {text!r}: no host")
    if not has_port:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"bad server address {text!r}: port must be 1..65535")
    return host, int(port_text)


def parse_servers(text: str) -> list[Address]:
    """A comma-separated list of addresses, tried in order."""
    addresses = [parse_address(part) for part in text.split(",") if part.strip()]
    if not addresses:
        raise ValueError("no server address given")
    return addresses


def format_address(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Awaited:
    """A request sent and not answered yet: the frames that answer it (queue updates, then
    its reply), or the error that broke the connection, in the order they came."""

    __slots__ = ("id", "queued", "_frames")

    def __init__(self, rid: int, *, queued: bool) -> None:
        self.id = rid
        self.queued = queued  # a checkout sent with `queue`: queue updates may come first
        self._frames: asyncio.Queue[dict[str, Any] | ConnectionLost] = asyncio.Queue()

    def put(self, item: dict[str, Any] | ConnectionLost) -> None:
        self._frames.put_nowait(item)

    async def next(self) -> dict[str, Any]:
        """The next frame; ConnectionLost once the connection broke."""
        item = await self._frames.get()
        if isinstance(item, ConnectionLost):
            raise item
        return item


class Connection:
    """An open, hello'd connection. Use `await Connection.open(...)`."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        address: Address,
        *,
        io_timeout: float,
        clock: Clock | None = None,
    ) -> None:
        self.address = address
        self.io_timeout = io_timeout
        self.hello: messages.HelloReply | None = None  # its `protocol`: the version settled on
        self._reader = reader
        self._writer = writer
        # The wait between a queued checkout's frames is measured on it (`request`).
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._ids = itertools.count(1)
        self._pending: deque[_Awaited] = deque()
        self._slots = asyncio.Semaphore(MAX_PIPELINE)
        self._error: ConnectionLost | None = None
        self._task = asyncio.create_task(self._read_loop(), name=f"licd-reader-{address}")

    # ------------------------------------------------------------------ opening

    @classmethod
    async def open(
        cls,
        addresses: Sequence[Address],
        *,
        io_timeout: float,
        client_name: str,
        ssl: _ssl.SSLContext | None = None,
        clock: Clock | None = None,
        protocol: int | None = None,
    ) -> Connection:
        """Connect to the first address that answers hello; ConnectionLost if none does.

        `io_timeout` bounds each connect and each request on the connection; `clock`
        (default: the lease clock) measures the wait between a queued checkout's frames.
        `protocol`: the version to settle on, exactly (default: the newest both sides
        speak). A fatal hello error (e.g. unsupported_protocol) is raised as it is; a
        transient one (too_many_connections, shutting_down) moves on to the next address.
        """
        if not addresses:
            raise ConnectionLost("no server address configured")
        failures: list[str] = []
        last: BaseException | None = None
        for address in addresses:
            try:
                return await cls._open_one(address, io_timeout, client_name, ssl, clock, protocol)
            except Exception as exc:
                if not is_retryable(exc):
                    raise
                failures.append(f"{format_address(address)}: {_describe(exc)}")
                last = exc
        raise ConnectionLost(
            "cannot reach the licence daemon (" + "; ".join(failures) + ")"
        ) from last

    @classmethod
    async def _open_one(
        cls,
        address: Address,
        io_timeout: float,
        client_name: str,
        ssl: _ssl.SSLContext | None,
        clock: Clock | None,
        protocol: int | None,
    ) -> Connection:
        host, port = address
        async with asyncio.timeout(io_timeout):
            reader, writer = await asyncio.open_connection(host, port, ssl=ssl)
        conn = cls(reader, writer, address, io_timeout=io_timeout, clock=clock)
        try:
            if protocol is not None:
                conn.hello = await conn._hello(protocol, client_name)
                return conn
            try:
                conn.hello = await conn._hello(NEWEST_PROTOCOL, client_name)
            except UnsupportedProtocol as exc:
                if NEWEST_PROTOCOL in _supported(exc):
                    raise
                # An older daemon: the connection stays open for another hello.
                conn.hello = await conn._hello(messages.PROTOCOL_VERSION, client_name)
        except BaseException:
            await conn.close()
            raise
        return conn

    async def _hello(self, protocol: int, client_name: str) -> messages.HelloReply:
        """Say hello with `protocol`; the reply, which must settle on that version."""
        reply = await self.request(messages.Hello(0, protocol=protocol, client=client_name[:255]))
        if not isinstance(reply, messages.HelloReply):
            raise ProtocolViolation("hello answered with another reply type")
        if reply.protocol != protocol:
            raise ProtocolViolation(
                f"the daemon answered hello with protocol {reply.protocol} to protocol {protocol}"
            )
        return reply

    # ----------------------------------------------------------------- requests

    @property
    def batched(self) -> bool:
        """True when hello settled on a version whose lease replies may be batched."""
        return self.hello is not None and self.hello.protocol >= messages.BATCHED

    @property
    def closed(self) -> bool:
        return self._error is not None

    async def request(
        self,
        req: messages.Request,
        *,
        reply_timeout: float | None = None,
        on_update: UpdateCallback | None = None,
    ) -> messages.Reply:
        """Send `req` (its `id` is replaced by this connection's next id), await the reply.

        No reply within `reply_timeout` (default: `io_timeout`) breaks the connection, since
        the replies that follow could no longer be matched: ConnectionLost.

        A checkout sent with `queue` may be answered by queue updates first: each is
        awaited in `on_update` (when given), and after one the next frame is awaited for
        that update's `update_in` plus `io_timeout`, on the connection's clock, instead of
        `reply_timeout`: a queued checkout waits as long as the daemon keeps saying where
        it is, and a silent connection is taken as dead (ConnectionLost).
        """
        async with self._slots:
            if self._error is not None:
                raise self._error
            req = dataclasses.replace(req, id=next(self._ids))
            awaited = _Awaited(req.id, queued=isinstance(req, messages.Checkout) and req.queue)
            # Appending and writing with no await between keeps the queue in wire order.
            self._pending.append(awaited)
            try:
                self._writer.write(wire.encode(req.to_wire()))
            except Exception as exc:
                raise self._broken(f"cannot send: {_describe(exc)}") from exc
            limit = self.io_timeout if reply_timeout is None else reply_timeout
            frame = await self._receive(req.op, self._first_frame(awaited, limit))
            reply = messages.parse_reply(req.op, frame)
            while isinstance(reply, messages.QueueUpdate):
                if on_update is not None:
                    await on_update(reply)
                silence = reply.update_in + self.io_timeout
                frame = await self._receive(req.op, self._next_frame(req.op, awaited, silence))
                reply = messages.parse_reply(req.op, frame)
        if isinstance(reply, messages.LeaseReply) and reply.batch is not None and not self.batched:
            raise ProtocolViolation(
                f"a batched token in a {req.op} reply, on a connection that did not "
                f"settle on protocol {messages.BATCHED}"
            )
        return reply

    async def _receive(self, op: str, frame: Awaitable[dict[str, Any]]) -> dict[str, Any]:
        """`frame` awaited; a timeout or a socket error breaks the connection."""
        try:
            return await frame
        except TimeoutError:
            lost = self._broken(f"no reply to {op} within the timeout")
            await self._close_transport()
            raise lost from None
        except OSError as exc:
            raise self._broken(f"connection broken: {_describe(exc)}") from exc

    async def _first_frame(self, awaited: _Awaited, limit: float) -> dict[str, Any]:
        """The request's first frame, sent and received within `limit` (else TimeoutError)."""
        async with asyncio.timeout(limit):
            await self._writer.drain()
            return await awaited.next()

    async def _next_frame(self, op: str, awaited: _Awaited, silence: float) -> dict[str, Any]:
        """A queued request's next frame; after `silence` seconds on the connection's
        clock without one, the connection is taken as dead and closed (ConnectionLost)."""

        async def watch() -> None:
            await self._clock.sleep(silence)
            self._broken(f"no reply or queue update to {op} within {silence:g} s")
            self._writer.close()

        watchdog = asyncio.ensure_future(watch())
        try:
            return await awaited.next()
        finally:
            watchdog.cancel()

    async def _read_loop(self) -> None:
        decoder = wire.FrameDecoder(wire.MAX_FRAME_ADMIN, wire.REPLY_LIMITS)
        try:
            while True:
                chunk = await self._reader.read(READ_CHUNK)
                if not chunk:
                    raise ConnectionLost("the daemon closed the connection")
                decoder.feed(chunk)
                while (frame := decoder.next_frame()) is not None:
                    self._deliver(frame)
        except asyncio.CancelledError:
            self._fail(ConnectionLost("connection closed"))
            raise
        except ConnectionLost as exc:
            self._fail(exc)
        except LicdError as exc:  # a reply the decoder rejects
            self._fail(ConnectionLost(f"undecodable reply from the daemon: {exc.message}"))
        except Exception as exc:
            self._fail(ConnectionLost(f"connection broken: {_describe(exc)}"))
        finally:
            self._writer.close()

    def _deliver(self, frame: dict[str, Any]) -> None:
        rid = frame.get("id")
        if not self._pending:
            raise ConnectionLost(f"unsolicited reply from the daemon (id {rid!r})")
        awaited = self._pending[0]
        # An error for a frame the daemon could not parse carries id null; it answers
        # the oldest request, and the daemon closes the connection after it.
        if rid != awaited.id and not (rid is None and frame.get("ok") is False):
            raise ConnectionLost(f"reply id {rid!r} out of order (expected {awaited.id})")
        if not messages.is_queue_update(frame):
            self._pending.popleft()  # its reply: the next frame answers the next request
        elif not awaited.queued:
            raise ConnectionLost(f"a queue update for a request that did not queue (id {rid!r})")
        awaited.put(frame)

    def _broken(self, message: str) -> ConnectionLost:
        """Mark the connection broken (if it is not already); the error to raise."""
        self._fail(ConnectionLost(message))
        assert self._error is not None
        return self._error

    def _fail(self, exc: ConnectionLost) -> None:
        if self._error is None:
            self._error = exc
        while self._pending:
            self._pending.popleft().put(self._error)

    # ------------------------------------------------------------------ closing

    def write_eof(self) -> None:
        """Half-close where the transport can (not over TLS): send nothing more, keep
        reading. The daemon takes it as the client leaving (docs/protocol.md, "checkout"):
        it sends no reply it has not written yet, and closes the connection."""
        if self._error is None and self._writer.can_write_eof():
            with contextlib.suppress(OSError):
                self._writer.write_eof()

    async def _close_transport(self) -> None:
        self._writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.io_timeout):
                await self._writer.wait_closed()

    async def wait_closed(self) -> None:
        """Return once the connection has ended: closed by either side, or broken."""
        await asyncio.wait({self._task})

    async def close(self) -> None:
        """Close the connection; pending requests fail with ConnectionLost. Idempotent."""
        self._fail(ConnectionLost("connection closed"))
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task
        await self._close_transport()


def _supported(exc: UnsupportedProtocol) -> list[object]:
    """The versions an unsupported_protocol error says the daemon serves ([] if unsaid)."""
    supported = (exc.detail or {}).get("supported")
    return supported if isinstance(supported, list) else []


def _describe(exc: BaseException) -> str:
    if isinstance(exc, LicdError):
        return f"{exc.code}: {exc.message}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return text


def blocking_checkin(
    addresses: Sequence[Address],
    lease: str,
    *,
    timeout: float = 2.0,
    client_name: str = "licd-client",
    ssl: _ssl.SSLContext | None = None,
) -> bool:
    """Check a lease in with plain blocking sockets, for interpreter exit (no event loop).

    Tries each address in order; True once a daemon answered the checkin. Never raises.
    Says hello with protocol 1, which every daemon speaks: a checkin's reply is the same
    in both versions, and one round trip is all there is time for.
    """
    hello = messages.Hello(1, protocol=messages.PROTOCOL_VERSION, client=client_name[:255])
    checkin = messages.Checkin(2, lease=lease)
    payload = wire.encode(hello.to_wire()) + wire.encode(checkin.to_wire())
    for host, port in addresses:
        try:
            with contextlib.ExitStack() as stack:
                sock = stack.enter_context(socket.create_connection((host, port), timeout))
                if ssl is not None:
                    sock = stack.enter_context(ssl.wrap_socket(sock, server_hostname=host))
                sock.sendall(payload)
                frames = _read_frames(sock, 2)
                messages.parse_reply("hello", frames[0])
        except Exception:
            continue
        try:
            messages.parse_reply("checkin", frames[1])
        except LicdError:
            pass  # the daemon answered (e.g. lease_unknown): nothing is left to release
        except Exception:
            continue
        return True
    return False


def _read_frames(sock: socket.socket, count: int) -> list[dict[str, Any]]:
    decoder = wire.FrameDecoder(wire.MAX_FRAME_ADMIN, wire.REPLY_LIMITS)
    frames: list[dict[str, Any]] = []
    while len(frames) < count:
        chunk = sock.recv(READ_CHUNK)
        if not chunk:
            raise ConnectionLost("the daemon closed the connection")
        decoder.feed(chunk)
        while (frame := decoder.next_frame()) is not None:
            frames.append(frame)
    return frames
