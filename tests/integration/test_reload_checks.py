"""What a reload and the systemd status promise beyond the licences themselves: a reload
checks the alert hook as `check-config` and a start do (reload applies [alerts] live), and
the READY status counts the licences a router serves through its upstream too."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from pathlib import Path

import pytest

from licd.cli.admin_client import AdminError
from licd.config.licences import RelayedLicence
from licd.config.settings import UpstreamConfig
from licd.daemon import Daemon
from licd.shells.notify import Notifier
from tests.integration.procs import DICOM_TOML, write_config
from tests.integration.test_admin import admin
from tests.support import make_config, reserved_port, running


async def test_a_reload_naming_an_alert_hook_that_cannot_run_changes_nothing(
    tmp_path: Path,
) -> None:
    path = write_config(tmp_path, DICOM_TOML)
    config = dataclasses.replace(make_config(tmp_path / "state"), source=path)
    hook = tmp_path / "alert-hook"
    hook.write_text("#!/bin/sh\nexit 0\n")  # not executable yet
    path.write_text(path.read_text() + f'\n[alerts]\nhook = ["{hook}"]\n')
    async with running(config) as daemon:
        with pytest.raises(AdminError, match=r"alerts\.hook: .*alert-hook is not executable"):
            await admin(daemon, "reload")
        assert not daemon.config.alerts.hook  # the old [alerts] stays
        kinds = [e["event"] for e in (await admin(daemon, "audit"))["entries"]]
        assert kinds[-1] == "reload_failed"
        hook.chmod(0o755)
        await admin(daemon, "reload")
        assert list(daemon.config.alerts.hook) == [str(hook)]


async def test_ready_status_counts_forward_mode_licences(tmp_path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.setblocking(False)
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": sock.getsockname()})
    # An upstream nobody answers on: forward-mode licences are served all the same
    # (each checkout is relayed, or answered upstream_unavailable).
    upstream = UpstreamConfig(servers=(f"127.0.0.1:{reserved_port()}",), trust=(bytes(32),))
    forward = RelayedLicence(key="VENDOR-KEY", id="vendor-app", mode="forward")
    config = dataclasses.replace(
        make_config(tmp_path / "state"), upstream=upstream, relayed=(forward,)
    )
    daemon = await Daemon.open(config)
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop, notifier=notifier))
    try:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(10):
            while not (message := await loop.sock_recv(sock, 4096)).startswith(b"READY=1"):
                pass
        assert b"STATUS=serving 2 licence(s) on 127.0.0.1:" in message
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        notifier.close()
        sock.close()
