"""The TCP shell: accepts connections, reads frames, writes replies. Knows no licences.

Each connection is an asyncio Protocol: the event loop hands it the bytes it read, the
sans-I/O `FrameDecoder` cuts them into frames (length checked before the body is
read), and each frame is dispatched right there, without a task or a stream in
between. Before `hello` one request is answered before the next frame is decoded (so
the 1 KiB pre-hello limit holds); after it, replies that wait for a commit go out in
request order, at most `max_pipeline` outstanding (beyond that the connection is not
read). Replies buffered for a peer that does not read pause reading too, and a peer
that stays so past the write deadline is cut off. Timeouts: hello, a started frame,
idle; one timer per connection. Caps on connections overall and per peer address.
A checkout's answer (a `Handover`) is told whether it reached its client: a client that
left before it (closed, reset, or ended its side while it was owed) gets nothing more.
`stop()` is the ordered shutdown: stop accepting, refuse new requests, drain, close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import ssl as _ssl
from collections import Counter, deque
from typing import Any, cast

from licd.config.settings import ServerConfig
from licd.core.dispatch import Answer, Dispatcher, Handover, QueuedCheckout, Session
from licd.deferred import Deferred
from licd_client.errors import LicdError, ShuttingDown, TooManyConnections
from licd_client.wire import (
    MAX_FRAME_BEFORE_HELLO,
    REQUEST_LIMITS,
    FrameDecoder,
    encode,
)

log = logging.getLogger(__name__)

#: Replies buffered for a peer beyond this pause reading it until they drain (under the
#: write deadline), so a peer that never reads cannot grow our memory.
WRITE_HIGH_WATER = 256 * 1024


#: Why reading a connection is paused (bits): too many replies owed, replies not being
#: read by the peer, or a stream that cannot be decoded any more.
PIPELINE, WRITES, BROKEN = 1, 2, 4


class ServerConnection(asyncio.Protocol):
    """One client connection: its frames in, its replies out in request order."""

    __slots__ = (
        "server",
        "dispatcher",
        "config",
        "loop",
        "session",
        "transport",
        "decoder",
        "_pending",
        "_closing",
        "_counted",
        "_frame_started",
        "_activity",
        "_hello_deadline",
        "_timer",
        "_write_timer",
        "_paused",
        "_eof",
        "_lost",
        "_closed",
    )

    def __init__(self, server: Server) -> None:
        self.server = server
        self.dispatcher = server.dispatcher
        self.config = server.config
        self.loop = asyncio.get_running_loop()
        self.session = Session("?")
        self.transport: asyncio.Transport | None = None
        self.decoder = FrameDecoder(MAX_FRAME_BEFORE_HELLO, REQUEST_LIMITS)
        self._pending: deque[Deferred[Answer]] = deque()
        self._closing = False
        self._counted = False  # in the server's tallies
        self._frame_started: float | None = None  # loop time a partial frame began
        self._activity = 0.0  # loop time of the last read
        self._hello_deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._paused = 0  # PIPELINE | WRITES | BROKEN
        self._eof = False
        self._lost = False
        self._closed: asyncio.Future[None] | None = None  # made only if someone waits

    # ---------------------------------------------------------------- protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream server's transport has Transport's methods whatever the loop; only the
        # standard loop's classes derive from asyncio.Transport (uvloop's do not).
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        peername = transport.get_extra_info("peername")
        self.session.peer = peer = str(peername[0]) if peername else "?"
        refusal = self.server.admit(self, peer)
        if refusal is not None:
            log.warning("event=connection_refused peer=%s reason=%s", peer, refusal.code)
            transport.write(encode(self.dispatcher.error(refusal)[0]))  # not admitted: closed
            self._closing = True
            transport.close()
            return
        self._counted = True
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        now = self.loop.time()
        self._hello_deadline = now + self.config.hello_timeout
        self._activity = now
        self._timer = self.loop.call_at(self._hello_deadline, self._check_deadline)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._activity = self.loop.time()
        self.decoder.feed(data)
        self._take_frames()

    def eof_received(self) -> bool:
        # Replies already owed are still sent; TLS cannot half-close, so there the
        # transport closes at once. But a client that ends its side while a checkout is
        # owed has left (closed, exited, killed: TCP does not tell these from a
        # half-close): it is closed now, and the lease goes back (connection_lost).
        self._eof = True
        if any(isinstance(owed, Handover) for owed in self._pending):
            self.close()
        else:
            self._close_when_idle()
        return self.server.ssl is None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = self._lost = True
        for owed in self._pending:  # never to be written: a checkout's lease goes back
            if isinstance(owed, Handover):
                owed.undelivered()
        self._pending.clear()
        for timer in (self._timer, self._write_timer):
            if timer is not None:
                timer.cancel()
        if self._counted:
            self._counted = False
            self.server.forget(self, self.session.peer)
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    async def wait_closed(self) -> None:
        if not self._lost:
            if self._closed is None:
                self._closed = self.loop.create_future()
            await self._closed

    def pause_writing(self) -> None:
        """The peer is not reading our replies: read nothing more from it until they
        drain, and cut it off if they do not within the write deadline."""
        self._pause(WRITES)
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.config.write_timeout, self._stalled)

    def resume_writing(self) -> None:
        # Closing, the deadline stays: it is for writing everything, not just some.
        if self._write_timer is not None and not self._closing:
            self._write_timer.cancel()
            self._write_timer = None
        self._resume(WRITES)
        self._take_frames()  # what was read meanwhile

    # ------------------------------------------------------------------ frames

    def _take_frames(self) -> None:
        """Dispatch every whole frame buffered, as far as the pipeline allows."""
        decoder = self.decoder
        session = self.session
        took = False
        while not self._closing and not self._paused & (WRITES | BROKEN):
            if session.hello_done and len(self._pending) >= self.config.max_pipeline:
                self._pause(PIPELINE)
                return
            try:
                frame = decoder.next_frame()
            except LicdError as exc:  # the stream cannot be read on: answer, then close
                self._pause(BROKEN)
                self._push(self.dispatcher.error(exc))  # the error map says: close
                return
            if frame is None:
                break
            before_hello = not session.hello_done
            answer = self.dispatcher.handle(session, frame)
            self._push(answer)
            took = True
            if isinstance(answer, tuple) and answer[1]:
                # An answer that closes the connection ends it here, even while replies
                # before it are still owed: no frame after it is carried out.
                self._pause(BROKEN)
                return
            if before_hello:
                if session.hello_done:
                    decoder.max_frame = self.config.max_frame
                if self._pending:
                    # Before hello, one request at a time: its answer decides the frame
                    # limit for the next one.
                    self._pause(PIPELINE)
                    return
        else:
            return  # paused or closing: whole frames may wait here, through no fault of the peer
        self._resume(PIPELINE)
        # Every whole frame is taken: what is left is a frame begun (in the last read,
        # if frames came before it).
        if not decoder.buffered:
            self._frame_started = None
        elif took or self._frame_started is None:
            self._frame_started = self._activity
            self._check_by(self._activity + self.config.frame_timeout)

    def _push(self, answer: Answer | Deferred[Answer]) -> None:
        pending = self._pending
        if isinstance(answer, tuple):
            if not pending:  # nothing owed before it: out it goes
                self._write(*answer)
                return
            # Its turn comes when the head's reply is written (the head is never ready).
            pending.append(Deferred.of(answer))
            return
        pending.append(answer)
        answer.add_done_callback(self._flush)
        if isinstance(answer, QueuedCheckout):
            answer.attach(lambda update: self._update(answer, update))

    def _update(self, queued: QueuedCheckout, update: dict[str, Any]) -> bool:
        """Write a queued checkout's update if its answer is the one owed next (else it
        waits its turn: False, and the next round tries again)."""
        if self._closing or not self._pending or self._pending[0] is not queued:
            return False
        self._write(update, False)
        return True

    def _write(self, message: dict[str, Any], close: bool) -> None:
        if self._closing or self.transport is None:
            return
        self.transport.write(encode(message))
        if close:
            self.close()

    def _flush(self, _: object = None) -> None:
        """Write every reply at the head of the queue that is ready, in order."""
        pending = self._pending
        while pending and pending[0].done() and not self._closing:
            owed = pending.popleft()
            self._write(*owed.result())
            if isinstance(owed, Handover):
                owed.delivered()
            if isinstance(owed, QueuedCheckout):  # its wait was ours: silence counts anew
                self._activity = self.loop.time()
                if self._timer is None:
                    self._check_deadline()
        if self._closing:
            return
        if self._paused & PIPELINE and (
            len(pending) < self.config.max_pipeline if self.session.hello_done else not pending
        ):
            self._take_frames()
        if not pending:
            self.server.idle_changed()
            if self._eof:
                self._close_when_idle()

    # ------------------------------------------------------------ flow control

    def _pause(self, why: int) -> None:
        if not self._paused and self.transport is not None and not self._closing:
            self.transport.pause_reading()
        self._paused |= why

    def _resume(self, why: int) -> None:
        if not self._paused & why:
            return
        self._paused &= ~why
        if not self._paused and self.transport is not None and not self._closing:
            self.transport.resume_reading()
            # The peer's silence, or its frame begun, counts again from now.
            now = self.loop.time()
            self._activity = now
            if self._frame_started is not None:
                self._frame_started = now
            if self._timer is None:
                self._check_deadline()

    def _stalled(self) -> None:
        self._write_timer = None
        log.warning("event=write_timeout peer=%s", self.session.peer)
        self.abort()

    # --------------------------------------------------------------- deadlines

    def _deadline(self) -> float:
        """When this connection must be closed unless something happens first: hello
        not done in time, a frame started but not finished, or nothing said at all."""
        cfg = self.config
        if self._paused:  # we are not reading: neither its silence nor a frame half-read
            deadline = math.inf  # is the peer's doing (writes have a deadline of their own)
        elif self._frame_started is not None:
            deadline = self._frame_started + cfg.frame_timeout
        elif any(isinstance(owed, QueuedCheckout) for owed in self._pending):
            deadline = math.inf  # it waits for us, in the queue (its updates have a deadline)
        else:
            deadline = self._activity + cfg.idle_timeout
        if not self.session.hello_done:
            deadline = min(deadline, self._hello_deadline)
        return deadline

    def _check_by(self, when: float) -> None:
        """Make the deadline timer fire no later than `when` (a frame begun may end the
        connection sooner than the silence the timer was armed for)."""
        timer = self._timer
        if timer is not None and timer.when() <= when:
            return
        if timer is not None:
            timer.cancel()
        self._timer = self.loop.call_at(when, self._check_deadline)

    def _check_deadline(self) -> None:
        # No timer per read: this closes a connection whose deadline passed; a read
        # just records when it happened. Paused, no timer runs: resuming re-arms it.
        self._timer = None
        if self._closing:
            return
        deadline = self._deadline()
        if self.loop.time() >= deadline:
            log.debug("event=timeout peer=%s", self.session.peer)
            self.close()
            return
        if deadline != math.inf:
            self._timer = self.loop.call_at(deadline, self._check_deadline)

    # ----------------------------------------------------------------- closing

    @property
    def idle(self) -> bool:
        """No reply owed."""
        return not self._pending

    def _close_when_idle(self) -> None:
        if not self._pending:
            self.close()

    def close(self) -> None:
        """Close once what is buffered is written; a peer that does not read it within
        the write deadline is cut off."""
        self._closing = True
        transport = self.transport
        if transport is None:
            return
        if transport.get_write_buffer_size() and self._write_timer is None:
            self._write_timer = self.loop.call_later(self.config.write_timeout, self._stalled)
        transport.close()

    def abort(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.abort()


class Server:
    def __init__(
        self, config: ServerConfig, dispatcher: Dispatcher, ssl: _ssl.SSLContext | None = None
    ) -> None:
        self.config = config
        self.dispatcher = dispatcher
        self.ssl = ssl
        self._servers: list[asyncio.Server] = []
        self._connections: set[ServerConnection] = set()
        self._per_peer: Counter[str] = Counter()
        self._stopping = False
        self._idle_waiter: asyncio.Future[None] | None = None
        self.addresses: list[tuple[str, int]] = []

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    @property
    def connections(self) -> list[ServerConnection]:
        return list(self._connections)

    async def start(self) -> list[tuple[str, int]]:
        """Listen on every configured address; returns the bound (host, port) pairs."""
        loop = asyncio.get_running_loop()
        for host, port in self.config.listen:
            server = await loop.create_server(
                lambda: ServerConnection(self), host, port, ssl=self.ssl
            )
            self._servers.append(server)
            for sock in server.sockets:
                addr = sock.getsockname()
                self.addresses.append((addr[0], addr[1]))
        return self.addresses

    def admit(self, conn: ServerConnection, peer: str) -> LicdError | None:
        """Count a new connection in, or say why it is refused."""
        if self._stopping:
            return ShuttingDown()
        if len(self._connections) >= self.config.max_connections:
            return TooManyConnections("the daemon's connection limit is reached")
        if self._per_peer[peer] >= self.config.max_connections_per_peer:
            return TooManyConnections("too many connections from this address")
        self._connections.add(conn)
        self._per_peer[peer] += 1
        return None

    def forget(self, conn: ServerConnection, peer: str) -> None:
        self._connections.discard(conn)
        self._per_peer[peer] -= 1
        if self._per_peer[peer] <= 0:
            del self._per_peer[peer]
        self.idle_changed()

    def idle_changed(self) -> None:
        """A connection has no reply owed any more (or is gone): wake `stop()`."""
        waiter = self._idle_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _drained(self) -> None:
        """Until no connection owes a reply."""
        while any(not c.idle for c in self._connections):
            self._idle_waiter = asyncio.get_running_loop().create_future()
            await self._idle_waiter

    async def stop(self) -> None:
        """Stop accepting, answer `shutting_down` to new requests, drain what is in
        flight (up to `shutdown_timeout`), then close every connection."""
        self._stopping = True
        for server in self._servers:
            server.close()
        self.dispatcher.shutting_down = True
        # Queued checkouts are answered now: their wait would outlast the drain.
        self.dispatcher.service.drop_queue(None, ShuttingDown())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.shutdown_timeout):
                await self._drained()
        conns = list(self._connections)
        for conn in conns:
            conn.close()
        if conns:
            # Closing writes what is buffered first; a peer that does not read it
            # within the write deadline is cut off.
            try:
                async with asyncio.timeout(self.config.write_timeout):
                    await asyncio.gather(*(c.wait_closed() for c in conns))
            except TimeoutError:
                for conn in conns:
                    conn.abort()
        for server in self._servers:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await server.wait_closed()
