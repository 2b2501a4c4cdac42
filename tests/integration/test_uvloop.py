"""The daemon and the client library under uvloop: any event loop with the asyncio API
must do, not only the standard one (whose classes uvloop's transports do not derive from).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import secrets
from pathlib import Path

import pytest

from licd.cli.admin_client import AdminClient
from licd.config.settings import MetricsConfig
from licd_client import AsyncClient, LeaseState
from tests.support import DICOM, RawPeer, address, make_config, running, scrape

uvloop = pytest.importorskip("uvloop", reason="uvloop is not installed (the dev extra has it)")


async def _serve_everyone(tmp_path: Path) -> None:
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
    config = dataclasses.replace(
        make_config(tmp_path), metrics=MetricsConfig(listen=("127.0.0.1", 0))
    )
    async with running(config) as daemon, contextlib.AsyncExitStack() as cleanup:
        host, port = address(daemon)
        # By hand: hello, checkout, heartbeat, checkin.
        peer = await RawPeer.connect((host, port))
        cleanup.push_async_callback(peer.close)
        await peer.hello()
        lease = await peer.checkout(request=secrets.token_hex(16))
        assert lease["ok"], lease
        beat = await peer.call("heartbeat", lease=lease["lease"], nonce=os.urandom(16))
        assert beat["ok"], beat
        assert (await peer.call("checkin", lease=lease["lease"]))["ok"]
        # A bad request is answered, then the connection closes.
        await peer.send({"op": "checkout", "id": 9})
        assert (await peer.recv() or {}).get("error") == "bad_request"
        assert await peer.closed()
        # The client library, on this loop too.
        client = AsyncClient(f"{host}:{port}", daemon.signer.public, retry_for=0)
        cleanup.push_async_callback(client.aclose)
        held = await client.checkout(DICOM.key)
        await held.renew_once()
        # The admin socket and the metrics endpoint.
        admin = AdminClient(daemon.admin.path, timeout=10)
        status = await asyncio.to_thread(admin.call, "status")
        (row,) = status["licences"]
        assert row["in_use"] == 1
        assert daemon.metrics_address is not None
        samples = await scrape(daemon.metrics_address)
        labels = (("licence", DICOM.id), ("product", DICOM.product))
        assert samples[("licd_seats_in_use", labels)] == 1
        await held.release()
        assert held.state is LeaseState.RELEASED
        assert daemon.engine.in_use(DICOM.id) == 0


def test_a_daemon_under_uvloop_serves_clients_admins_and_scrapers(tmp_path: Path) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve_everyone(tmp_path))
