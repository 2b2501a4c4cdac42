"""The metrics endpoint of a real daemon reflects seats, requests and heartbeats."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from licd.config.settings import MetricsConfig
from tests.support import DICOM, RawPeer, address, make_config, running, scrape


async def test_metrics_follow_the_daemon(tmp_path: Path) -> None:
    config = dataclasses.replace(
        make_config(tmp_path), metrics=MetricsConfig(listen=("127.0.0.1", 0))
    )
    async with running(config) as daemon:
        assert daemon.metrics_address is not None
        peer = await RawPeer.connect(address(daemon))
        await peer.hello()
        lease = await peer.checkout(seats=2)
        for _ in range(3):
            await peer.call("heartbeat", lease=lease["lease"], nonce=os.urandom(16))
        await peer.checkout(seats=2)  # refused: only one seat left
        m = await scrape(daemon.metrics_address)
        labels = (("licence", DICOM.id), ("product", DICOM.product))
        assert m[("licd_seats_in_use", labels)] == 2
        assert m[("licd_seats_available", labels)] == 1
        assert m[("licd_heartbeats_total", ())] == 3
        assert m[("licd_checkouts_total", (("licence", DICOM.id),))] == 1
        denial = (("licence", DICOM.id), ("reason", "seats_exhausted"))
        assert m[("licd_denials_total", denial)] == 1
        assert m[("licd_request_seconds_count", (("op", "heartbeat"),))] == 3
        assert m[("licd_connections", ())] == 1
        await peer.close()
