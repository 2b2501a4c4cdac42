"""The TCP shell: accepts connections, reads frames, writes replies. Knows no licences.

Per connection: frames are decoded with the sans-I/O `FrameDecoder` (length checked
before the body is read); before `hello` each request is answered before the next frame
is decoded (so the 1 KiB pre-hello limit holds), after it each request runs as its own
task and replies go out in request order, at most `max_pipeline` outstanding (beyond
that the connection is not read). Timeouts: hello, a started frame, idle, and a write
deadline for peers that never read. Caps on connections overall and per peer address.
`stop()` is the ordered shutdown: stop accepting, refuse new requests, drain, close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl as _ssl
from collections import Counter, deque
from typing import Any

from licd_client.errors import LicdError, ShuttingDown, TooManyConnections
from licd_client.wire import (
    MAX_FRAME_BEFORE_HELLO,
    REQUEST_LIMITS,
    FrameDecoder,
    encode,
)

from .config import ServerConfig
from .dispatch import Dispatcher, Session

log = logging.getLogger(__name__)

READ_CHUNK = 65536
#: Replies buffered for a peer beyond this are drained (under the write deadline) before
#: the connection is read again, so a peer that never reads cannot grow our memory.
WRITE_HIGH_WATER = 256 * 1024

Reply = tuple[dict[str, Any], bool]


class Connection:
    """One client connection: its read loop and its queue of replies in request order."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        session: Session,
        dispatcher: Dispatcher,
        config: ServerConfig,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.session = session
        self.dispatcher = dispatcher
        self.config = config
        self._pending: deque[asyncio.Future[Reply]] = deque()
        self._room = asyncio.Event()  # set when fewer than max_pipeline are outstanding
        self._room.set()
        self._idle = asyncio.Event()  # set when no reply is outstanding
        self._idle.set()
        self._closing = False
        self._frame_started: float | None = None  # loop time a partial frame began
        self._activity = 0.0  # loop time of the last read
        self._hello_deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def _deadline(self) -> float:
        """When this connection must be closed unless something happens first: hello
        not done in time, a frame started but not finished, or nothing said at all."""
        cfg = self.config
        if self._frame_started is not None:
            deadline = self._frame_started + cfg.frame_timeout
        else:
            deadline = self._activity + cfg.idle_timeout
        if not self.session.hello_done:
            deadline = min(deadline, self._hello_deadline)
        return deadline

    def _check_deadline(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = self._deadline()
        if self._closing:
            return
        if loop.time() >= deadline:
            log.debug("event=timeout peer=%s", self.session.peer)
            self.close()
            return
        self._timer = loop.call_at(deadline, self._check_deadline)

    async def run(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        decoder = FrameDecoder(MAX_FRAME_BEFORE_HELLO, REQUEST_LIMITS)
        self._hello_deadline = loop.time() + cfg.hello_timeout
        self._activity = loop.time()
        self._timer = loop.call_at(self._hello_deadline, self._check_deadline)
        try:
            while not self._closing:
                try:
                    frame = decoder.next_frame()
                except LicdError as exc:
                    self._push_done((self.dispatcher.error(exc), True))
                    break
                if frame is not None:
                    if self.session.hello_done:
                        await self._room.wait()
                        if self._closing:
                            break
                        self._push_task(frame)
                    else:
                        # Before hello, one request at a time: its answer decides the
                        # frame limit for the next one.
                        answer = self.dispatcher.handle(self.session, frame)
                        self._push_done(answer if isinstance(answer, tuple) else await answer)
                        if self.session.hello_done:
                            decoder.max_frame = cfg.max_frame
                    continue
                if self.writer.transport.get_write_buffer_size() > WRITE_HIGH_WATER:
                    try:
                        async with asyncio.timeout(cfg.write_timeout):
                            await self.writer.drain()
                    except TimeoutError:
                        log.warning("event=write_timeout peer=%s", self.session.peer)
                        self.writer.transport.abort()
                        break
                # No timer per read: `_check_deadline` closes a connection whose
                # deadline passed; a read just records when it happened.
                # Every whole frame is taken: what is left is a frame begun.
                if not decoder.buffered:
                    self._frame_started = None
                elif self._frame_started is None:
                    self._frame_started = self._activity
                data = await self.reader.read(READ_CHUNK)
                if not data:
                    break
                self._activity = loop.time()
                decoder.feed(data)
        except (ConnectionError, OSError):
            pass
        finally:
            await self._finish()

    def _push_task(self, frame: dict[str, Any]) -> None:
        answer = self.dispatcher.handle(self.session, frame)
        if isinstance(answer, tuple):  # answered from memory: no task needed
            self._push_done(answer)
            return
        self._pending.append(answer)
        self._after_push()
        answer.add_done_callback(self._flush)

    def _push_done(self, reply: Reply) -> None:
        if not self._pending:  # nothing owed before it: out it goes
            self._write(*reply)
            self._settle()
            return
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        fut.set_result(reply)
        self._pending.append(fut)
        self._after_push()
        self._flush(fut)

    def _after_push(self) -> None:
        self._idle.clear()
        if len(self._pending) >= self.config.max_pipeline:
            self._room.clear()

    def _write(self, message: dict[str, Any], close: bool) -> None:
        if self._closing:
            return
        self.writer.write(encode(message))
        if close:
            self._closing = True

    def _flush(self, _: object = None) -> None:
        """Write every reply at the head of the queue that is ready, in order."""
        pending = self._pending
        while pending and pending[0].done() and not self._closing:
            fut = pending.popleft()
            if fut.cancelled():
                continue
            exc = fut.exception()
            if exc is not None:  # dispatch never raises; keep the stream sane regardless
                log.error("event=reply_failed error=%r", str(exc))
                self._closing = True
                break
            self._write(*fut.result())
        self._settle()

    def _settle(self) -> None:
        pending = self._pending
        if self._closing:
            pending.clear()
            self.writer.close()
        if len(pending) < self.config.max_pipeline:
            self._room.set()
        if not pending:
            self._idle.set()

    async def drain(self) -> None:
        """Wait until every outstanding reply has been written."""
        await self._idle.wait()
        with contextlib.suppress(ConnectionError, OSError):
            async with asyncio.timeout(self.config.write_timeout):
                await self.writer.drain()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._closing = True
        self._room.set()
        self.writer.close()

    async def _finish(self) -> None:
        try:
            # Replies already owed are still sent, unless the peer stops reading.
            async with asyncio.timeout(self.config.write_timeout):
                await self.drain()
        except TimeoutError:
            self.writer.transport.abort()
        self.close()
        with contextlib.suppress(ConnectionError, OSError, TimeoutError):
            async with asyncio.timeout(1.0):
                await self.writer.wait_closed()


class Server:
    def __init__(
        self, config: ServerConfig, dispatcher: Dispatcher, ssl: _ssl.SSLContext | None = None
    ) -> None:
        self.config = config
        self.dispatcher = dispatcher
        self.ssl = ssl
        self._servers: list[asyncio.Server] = []
        self._connections: set[Connection] = set()
        self._per_peer: Counter[str] = Counter()
        self._stopping = False
        self.addresses: list[tuple[str, int]] = []

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    async def start(self) -> list[tuple[str, int]]:
        """Listen on every configured address; returns the bound (host, port) pairs."""
        for host, port in self.config.listen:
            server = await asyncio.start_server(
                self._accept, host, port, limit=READ_CHUNK, ssl=self.ssl
            )
            self._servers.append(server)
            for sock in server.sockets:
                addr = sock.getsockname()
                self.addresses.append((addr[0], addr[1]))
        return self.addresses

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        peer = str(peername[0]) if peername else "?"
        refusal: LicdError | None = None
        if self._stopping:
            refusal = ShuttingDown()
        elif len(self._connections) >= self.config.max_connections:
            refusal = TooManyConnections("the daemon's connection limit is reached")
        elif self._per_peer[peer] >= self.config.max_connections_per_peer:
            refusal = TooManyConnections("too many connections from this address")
        if refusal is not None:
            log.warning("event=connection_refused peer=%s reason=%s", peer, refusal.code)
            writer.write(encode(self.dispatcher.error(refusal)))
            with contextlib.suppress(ConnectionError, OSError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await writer.drain()
            writer.close()
            return
        conn = Connection(reader, writer, Session(peer), self.dispatcher, self.config)
        self._connections.add(conn)
        self._per_peer[peer] += 1
        try:
            await conn.run()
        finally:
            self._connections.discard(conn)
            self._per_peer[peer] -= 1
            if self._per_peer[peer] <= 0:
                del self._per_peer[peer]

    async def stop(self) -> None:
        """Stop accepting, answer `shutting_down` to new requests, drain what is in
        flight (up to `shutdown_timeout`), then close every connection."""
        self._stopping = True
        for server in self._servers:
            server.close()
        self.dispatcher.shutting_down = True
        conns = list(self._connections)
        if conns:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.shutdown_timeout):
                    await asyncio.gather(*(c.drain() for c in conns))
        for conn in conns:
            conn.close()
        for server in self._servers:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await server.wait_closed()
