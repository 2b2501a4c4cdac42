"""A userspace TCP proxy on 127.0.0.1 whose link can be cut, for the HA tests: between a
node and PostgreSQL, or between clients and a node (a network partition without root).

Modes (`set`): "pass" forwards both ways; "blackhole" forwards nothing more (bytes are
read and dropped, new connections are accepted and then ignored), as a cable pulled out
would look: the peers see only silence; "reset" closes every connection with a TCP RST
and refuses new ones the same way. Going back to "pass" resets what was blackholed (its
streams have lost bytes), so both sides reconnect. It runs on the test's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from typing import Literal

Mode = Literal["pass", "blackhole", "reset"]


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, proxy: FaultProxy, down: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.down = down
        self.up: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task[None]] = []

    async def pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                if self.proxy.mode == "pass":
                    writer.write(data)
                    await writer.drain()
        if self.proxy.mode == "pass":
            with contextlib.suppress(ConnectionError, OSError):
                writer.close()

    def reset(self) -> None:
        for writer in (self.down, self.up):
            if writer is not None:
                _reset(writer)
        for task in self.tasks:
            task.cancel()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST (SO_LINGER 0), not a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.mode: Mode = "pass"
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]

    def set(self, mode: Mode) -> None:
        before, self.mode = self.mode, mode
        if mode == "reset" or (mode == "pass" and before == "blackhole"):
            for link in list(self._links):
                link.reset()
            self._links.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = _Link(self, writer)
        if self.mode == "reset":
            _reset(writer)
            return
        self._links.add(link)
        if self.mode == "blackhole":
            link.tasks = [asyncio.ensure_future(_drain(reader))]
            return
        try:
            up_reader, link.up = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(writer)
            self._links.discard(link)
            return
        link.tasks = [
            asyncio.ensure_future(link.pump(reader, link.up)),
            asyncio.ensure_future(link.pump(up_reader, writer)),
        ]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.reset()
        self._links.clear()
        if self._server is not None:
            await self._server.wait_closed()


async def _drain(reader: asyncio.StreamReader) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while await reader.read(65536):
            pass
