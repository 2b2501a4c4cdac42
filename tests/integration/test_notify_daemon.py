"""The daemon speaks systemd's notify protocol: READY once it listens, watchdog pings,
RELOADING / READY around a reload, STOPPING on shutdown. A real datagram socket."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from licd.daemon import Daemon
from licd.shells.notify import Notifier
from tests.integration.procs import DICOM_TOML, write_config
from tests.support import make_config


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.setblocking(False)
    yield sock
    sock.close()


async def next_message(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(10):
        return await loop.sock_recv(sock, 4096)


async def messages_until(sock: socket.socket, prefix: bytes) -> list[bytes]:
    seen = []
    while True:
        message = await next_message(sock)
        seen.append(message)
        if message.startswith(prefix):
            return seen


async def test_notify_lifecycle(tmp_path: Path, notify_socket: socket.socket) -> None:
    path = write_config(tmp_path, DICOM_TOML)
    config = dataclasses.replace(make_config(tmp_path / "state"), source=path)
    notifier = Notifier.from_environ(
        {"NOTIFY_SOCKET": notify_socket.getsockname(), "WATCHDOG_USEC": "100000"}
    )
    assert notifier.watchdog_interval == pytest.approx(0.05)
    daemon = await Daemon.open(config)
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop, notifier=notifier))
    try:
        before_ready = await messages_until(notify_socket, b"READY=1")
        ready = before_ready[-1]
        assert b"STATUS=serving 1 licence(s) on 127.0.0.1:" in ready
        # READY comes only once it listens: the port answers now.
        _, writer = await asyncio.open_connection(*daemon.server.addresses[0])
        writer.close()
        assert await next_message(notify_socket) == b"WATCHDOG=1"
        assert await next_message(notify_socket) == b"WATCHDOG=1"

        daemon.request_reload()
        reload_messages = await messages_until(notify_socket, b"READY=1")
        reloading = [m for m in reload_messages if m.startswith(b"RELOADING=1")]
        assert len(reloading) == 1 and b"MONOTONIC_USEC=" in reloading[0]
        assert reload_messages[-1] == b"READY=1\nSTATUS=reloaded"

        path.write_text("not toml [")
        daemon.request_reload()
        after_bad = await messages_until(notify_socket, b"READY=1")
        assert b"reload failed" in after_bad[-1]

        stop.set()
        assert b"STOPPING=1" in await messages_until(notify_socket, b"STOPPING=1")
        await asyncio.wait_for(task, 20)
    finally:
        stop.set()
        notifier.close()
        if not task.done():
            task.cancel()
