"""A cluster standby's listener: the node's addresses while it does not lead.

Each frame is answered by `StandbyAnswers` (hello as any licd answers it, every other
op `unavailable` naming the leader), one at a time, on the same addresses, with the
same TLS and connection caps as the serving node's. When the node wins the leadership
this listener closes, and the daemon's own server takes the addresses over.
"""

from __future__ import annotations

import asyncio
import logging
import ssl as _ssl
from collections import Counter
from typing import cast

from licd.config.settings import ServerConfig
from licd.core.cluster import StandbyAnswers
from licd_client.errors import LicdError
from licd_client.wire import MAX_FRAME_BEFORE_HELLO, FrameDecoder, encode

log = logging.getLogger(__name__)


class _StandbyConnection(asyncio.Protocol):
    def __init__(self, listener: StandbyListener) -> None:
        self.listener = listener
        self.decoder = FrameDecoder(MAX_FRAME_BEFORE_HELLO)
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if peer else ""
        if not self.listener.admit(self):
            self.transport.abort()
            return
        self._arm()

    def _arm(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
        timeout = self.listener.config.idle_timeout
        self.idle = asyncio.get_running_loop().call_later(timeout, self.close)

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self.decoder.feed(data)
        try:
            while (frame := self.decoder.next_frame()) is not None:
                reply, close = self.listener.answers.answer(frame)
                transport.write(encode(reply))
                if close:
                    transport.close()
                    return
        except LicdError as exc:  # a frame too large, or that cannot be decoded
            transport.write(encode(self.listener.answers.refuse(exc)))
            transport.close()
            return
        self._arm()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.idle is not None:
            self.idle.cancel()
        self.listener.forget(self)


class StandbyListener:
    """Listens on the node's addresses while it is a standby."""

    def __init__(
        self, config: ServerConfig, answers: StandbyAnswers, ssl: _ssl.SSLContext | None = None
    ) -> None:
        self.config = config
        self.answers = answers
        self.ssl = ssl
        self._servers: list[asyncio.Server] = []
        self._connections: set[_StandbyConnection] = set()
        self._per_peer: Counter[str] = Counter()

    def admit(self, conn: _StandbyConnection) -> bool:
        if len(self._connections) >= self.config.max_connections:
            return False
        if self._per_peer[conn.peer] >= self.config.max_connections_per_peer:
            return False
        self._connections.add(conn)
        self._per_peer[conn.peer] += 1
        return True

    def forget(self, conn: _StandbyConnection) -> None:
        if conn in self._connections:
            self._connections.discard(conn)
            self._per_peer[conn.peer] -= 1

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for host, port in self.config.listen:
            self._servers.append(
                await loop.create_server(
                    lambda: _StandbyConnection(self), host, port, ssl=self.ssl, reuse_address=True
                )
            )
        log.info("event=standby_listening")

    async def stop(self) -> None:
        """Stop listening and close every connection (clients come back to the leader
        this node is about to become, or follow the redirect)."""
        for server in self._servers:
            server.close()
        for conn in list(self._connections):
            conn.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers = []
