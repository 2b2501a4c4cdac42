"""A real `licd serve` restarted with its clock set back a day (libfaketime's `faketime`,
Debian's package; .ci/run installs it): the daemon's clock is the latest time it had
seen, the rollback is logged and alerted, its own licences still serve; a normal
restart afterwards raises nothing. The in-process tests (test_clock_rollback.py) cover
the rules with a ManualClock; this one covers the system clock and the checkpoint kept
across a real process's exit."""

from __future__ import annotations

import glob
import re
from pathlib import Path

import pytest

from tests.integration.procs import DaemonProcess, Daemons, child_env
from tests.support import RawPeer

#: libfaketime, preloaded into the daemon (the `faketime` wrapper would take the signals
#: meant for it).
LIBFAKETIME = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
pytestmark = pytest.mark.skipif(
    not LIBFAKETIME, reason="needs libfaketime (Debian: apt-get install faketime)"
)

DAY = 86400


async def checkout_ok(daemon: DaemonProcess) -> None:
    peer = await RawPeer.connect(daemon.addr)
    try:
        await peer.hello()
        reply = await peer.checkout()
        assert reply["ok"] is True, reply
        assert (await peer.call("checkin", lease=reply["lease"]))["released"] is True
    finally:
        await peer.close()


async def test_a_process_restarted_a_day_behind_keeps_its_time_and_alerts(
    tmp_path: Path,
) -> None:
    with Daemons(tmp_path) as daemons:
        config = daemons.config()
        first = await daemons.astart(config)
        await checkout_ok(first)
        await first.aterminate()  # records the clock's mark at shutdown

        env = {**child_env(), "LD_PRELOAD": LIBFAKETIME[0], "FAKETIME": "-1d"}
        behind = DaemonProcess(config, tmp_path / "behind.stderr", env=env)
        daemons.started.append(behind)
        await behind.astart()
        line = behind.wait_for(r"event=clock_rollback behind=(\d+)").group(0)
        lag = int(re.search(r"behind=(\d+)", line).group(1))  # type: ignore[union-attr]
        assert DAY - 60 <= lag <= DAY + 60
        behind.wait_for(r"event=alert kind=clock_rollback")
        await checkout_ok(behind)  # the site's own licence is not held
        await behind.aterminate()

        normal = await daemons.astart(config)
        await checkout_ok(normal)  # the clock is looked at before the daemon listens
        await normal.aterminate()
        assert "clock_rollback" not in normal.stderr()
        assert "clock_rollback" not in first.stderr()
