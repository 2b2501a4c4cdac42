"""Seed 000's scenario end to end with real processes: a licd daemon and `licd-client`
processes for machines A, B, C and D, each with its own host id."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.procs import DICOM_TOML, DaemonProcess, Daemons, child_env, run_licd

pytestmark = pytest.mark.slow

WAIT = 20.0  # bound on every wait for a process or a seat


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    with Daemons(tmp_path) as d:
        yield d


def machine_env(daemon: DaemonProcess, config: Path, machine: str) -> dict[str, str]:
    key = run_licd("key", "show", "--config", str(config)).stdout.strip()
    env = child_env()
    env.update(LICD_SERVER="{}:{}".format(*daemon.addr), LICD_SERVER_KEY=key, LICD_HOSTID=machine)
    return env


def client_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "licd_client.cli", *args]


class Holder:
    """A `licd-client checkout` process holding a seat for one machine."""

    def __init__(self, env: dict[str, str], key: str) -> None:
        self.proc = subprocess.Popen(
            client_cmd("checkout", key),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # "handle ..." once the seat is held
        assert line.startswith("handle"), (line, self.proc.stderr and self.proc.stderr.read())
        self.handle = line.split()[1]

    def stop(self, sig: int) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(WAIT)
        finally:
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    stream.close()


def run_client(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        client_cmd(*args), env=env, capture_output=True, text=True, timeout=WAIT, check=False
    )


def wait_for_free_seat(env: dict[str, str], key: str) -> float:
    """Poll `available` until a seat is free; returns the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < WAIT:
        reply = run_client(env, "--json", "available", key)
        if reply.returncode == 0 and '"available": 0' not in reply.stdout:
            return time.monotonic() - start
    raise AssertionError("no seat came back")


@pytest.mark.parametrize("how", ["checkin", "crash"])
def test_machine_d_gets_a_seat_once_a_releases_it(daemons: Daemons, how: str) -> None:
    licence = {**DICOM_TOML, "lease_ttl": 2, "grace": 1}
    config = daemons.config(licence)
    daemon = daemons.start(config)
    key = str(licence["key"])
    envs = {m: machine_env(daemon, config, m) for m in ("machine_A", "B", "C", "D")}
    holders = {m: Holder(envs[m], key) for m in ("machine_A", "B", "C")}
    try:
        refused = run_client(envs["D"], "exec", "--key", key, "--", sys.executable, "-c", "")
        assert refused.returncode == 3
        assert "seats_exhausted: maximum allowed concurrent licences reached" in refused.stderr
        if how == "checkin":
            # The user shuts the application down: its seat goes back at once.
            assert holders["machine_A"].stop(signal.SIGTERM) == 0
            assert '"available": 1' in run_client(envs["D"], "--json", "available", key).stdout
        else:
            # Machine A dies: nothing checks in; the seat comes back when the lease lapses.
            holders["machine_A"].stop(signal.SIGKILL)
            waited = wait_for_free_seat(envs["D"], key)
            assert waited >= 1.0  # not at once: ttl 2 s + grace 1 s had to pass first
        done = run_client(
            envs["D"], "exec", "--key", key, "--", sys.executable, "-c", "raise SystemExit(7)"
        )
        assert done.returncode == 7, done.stderr  # the command's own status
        assert "Traceback" not in done.stderr
    finally:
        for m in ("B", "C"):
            holders[m].stop(signal.SIGTERM)
        if holders["machine_A"].proc.poll() is None:
            holders["machine_A"].stop(signal.SIGKILL)
    daemon.terminate()
