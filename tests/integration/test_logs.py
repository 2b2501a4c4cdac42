"""The daemon's own log lines (issue 14, "Logs"): absent fields left out rather than
shown as `None`, and `event=ready` counting the licences actually served."""

from __future__ import annotations

import dataclasses
import logging
import secrets
from pathlib import Path

import pytest

from licd.clock import ManualClock
from tests.support import DICOM, RawPeer, address, holder, make_config, running


def messages(caplog: pytest.LogCaptureFixture, start: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(start)]


async def test_a_denial_of_an_unknown_key_logs_no_none(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    clock = ManualClock()
    async with running(make_config(tmp_path), clock) as daemon:
        peer = await RawPeer.connect(address(daemon))
        await peer.hello()
        for _ in range(2):  # the second is counted, its group written out at shutdown
            reply = await peer.checkout("NO-SUCH-KEY", holder(), request=secrets.token_hex(16))
            assert reply["error"] == "unknown_licence"
        await peer.close()
    [denied] = messages(caplog, "event=denied ")
    assert denied == "event=denied seats=1 host=machine-a user=alice ip=127.0.0.1 " + (
        "reason=unknown_licence"
    )
    [repeated] = messages(caplog, "event=denied_repeatedly ")
    assert repeated == "event=denied_repeatedly ip=127.0.0.1 reason=unknown_licence count=1"
    assert not [m for m in caplog.messages if "None" in m]


async def test_ready_counts_the_licences_served_from_the_database(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    licences = [
        dataclasses.replace(DICOM, key=f"KEY-{n}", id=f"lic-{n}", product=f"p{n}") for n in range(5)
    ]
    config = make_config(tmp_path, *licences)
    async with running(config):
        pass
    assert messages(caplog, "event=ready ")[-1].endswith(" licences=5")
    # The config declares none now: all five are the database's, and served.
    from_db_only = dataclasses.replace(config, licences=())
    async with running(from_db_only) as daemon:
        assert len(daemon.engine.licences) == 5
    ready = messages(caplog, "event=ready ")[-1]
    assert ready.endswith(" licences=5"), ready
