"""The fair queue end to end, with the real client library and a real `licd-client`
process (issue 18's "done when"): on a 1-seat licence A holds, B and C queue in that
order; when A leaves, B gets the seat and C only after B; `licd queue` shows their
places as they change; a queued client that vanishes (SIGKILL) leaves the queue one
heartbeat interval later."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from licd.cli.admin_client import AdminClient
from licd.clock import ManualClock
from licd.daemon import Daemon
from licd_client import AsyncClient
from tests.cli.test_client_cli import spawn
from tests.integration.test_queue import ONE
from tests.support import address, make_config, running

WITHIN = 10.0  # bound on every wait


async def queue_listing(daemon: Daemon) -> list[tuple[str | None, int, bool]]:
    call = AdminClient(daemon.admin.path).call
    listing = (await asyncio.to_thread(call, "queue", licence=ONE.id))["queue"]
    return [(x["instance"] or x["app"], x["position"], x["connected"]) for x in listing]


async def until(daemon: Daemon, listing: list[tuple[str | None, int, bool]]) -> None:
    """Until `licd queue` shows `listing` (the daemon publishes no event a test could
    wait on for a connection it saw end: polled every 10 ms, within WITHIN)."""
    async with asyncio.timeout(WITHIN):
        while await queue_listing(daemon) != listing:  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_a_one_seat_licence_served_in_queue_order_to_real_clients(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = ManualClock()
    async with running(make_config(tmp_path, ONE), clock) as daemon:
        host, port = address(daemon)
        server, key = f"{host}:{port}", daemon.signer.public.hex()
        clients = [AsyncClient(server, key) for _ in range(3)]
        heard: dict[str, list[tuple[int, int]]] = {"B": [], "C": []}

        def queued(name: str) -> Any:
            return lambda position, waiting, wait: heard[name].append((position, waiting))

        a = await clients[0].checkout(ONE.key, instance="A")
        b = asyncio.create_task(
            clients[1].checkout(ONE.key, instance="B", queue=True, on_queued=queued("B"))
        )
        await until(daemon, [("B", 1, True)])
        c = asyncio.create_task(
            clients[2].checkout(ONE.key, instance="C", queue=True, on_queued=queued("C"))
        )
        await until(daemon, [("B", 1, True), ("C", 2, True)])

        left = time.monotonic()
        await a.release()
        lease_b = await asyncio.wait_for(b, WITHIN)
        print(f"B had the seat {time.monotonic() - left:.3f} s after A's checkin")
        assert lease_b.valid and not c.done()
        await until(daemon, [("C", 1, True)])
        await lease_b.release()
        lease_c = await asyncio.wait_for(c, WITHIN)
        assert lease_c.valid
        assert heard["B"][0] == (1, 1)
        assert heard["C"][0] == (2, 2) and heard["C"][-1] == (1, 1)
        assert daemon.engine.in_use(ONE.id) == 1

        # A licd-client queued behind C, then killed: it keeps its place one heartbeat
        # interval (lease_ttl / 3 = 10 s on the daemon's clock), then it is gone.
        monkeypatch.setenv("LICD_SERVER", server)
        monkeypatch.setenv("LICD_SERVER_KEY", key)
        proc = spawn("checkout", "--queue", "--app", "D", ONE.key)
        try:
            assert proc.stderr is not None
            line = await asyncio.wait_for(asyncio.to_thread(proc.stderr.readline), WITHIN)
            assert "position 1 of 1" in line and ONE.key not in line  # the key is a secret
            await until(daemon, [("D", 1, True)])
            os.killpg(proc.pid, signal.SIGKILL)
        finally:
            await asyncio.to_thread(proc.communicate)
        await until(daemon, [("D", 1, False)])
        clock.advance(9.9)
        daemon.service.tick_queues(clock.now())
        assert await queue_listing(daemon) == [("D", 1, False)]
        clock.advance(0.2)
        daemon.service.tick_queues(clock.now())
        assert await queue_listing(daemon) == []
        await lease_c.release()
        for client in clients:
            await client.aclose()
