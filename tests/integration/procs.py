"""Real daemon processes for integration tests: `python -m licd serve` in a subprocess.

`Daemons` writes a TOML config into a test's directory and starts, stops and kills
daemons on it; every process it started is killed when its `with` block ends, so a
failing test never leaves a daemon behind. Each start captures stderr to its own file
and waits (bounded) for the `event=listening` line to learn the ephemeral port.
Nothing here sleeps and hopes: every wait has a deadline and fails with the stderr seen.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

#: The repository root, put first on the child's PYTHONPATH so `-m licd` runs this tree
#: whatever the working directory and however the package happens to be installed.
ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0
RUN_TIMEOUT = 20.0  # a one-shot command (`licd key show`, a refused `serve`)
_LISTENING = re.compile(r"event=listening addr=(?:\[[^\]]*\]|[^\s:]+):(\d+)")
_POLL = 0.02


TomlScalar = str | int | float | bool
TomlValue = TomlScalar | Sequence[TomlScalar] | Mapping[str, TomlScalar]


def toml_value(value: TomlValue) -> str:
    """`value` as TOML (strings, numbers, booleans, arrays and inline tables of them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, Mapping):
        items = ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items())
        return "{" + items + "}"
    return "[" + ", ".join(toml_value(v) for v in value) + "]"


def toml_key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else toml_value(name)


def render_config(
    server: Mapping[str, TomlValue], licences: Sequence[Mapping[str, TomlValue]]
) -> str:
    lines = ["[server]"]
    lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in server.items()]
    for licence in licences:
        lines += ["", "[[licence]]"]
        lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in licence.items()]
    return "\n".join(lines) + "\n"


#: A licence as the config file spells it (PROTOCOL's example key).
DICOM_TOML: dict[str, TomlValue] = {
    "key": "XXXX-YYYY-ZZZZ",
    "id": "dicom-hq",
    "product": "dicom",
    "seats": 3,
    "lease_ttl": 90,
    "grace": 15,
    "features": {"tier": "pro"},
}


def write_config(
    directory: Path,
    *licences: Mapping[str, TomlValue],
    **server: TomlValue,
) -> Path:
    """`directory/licd.toml`: loopback port 0, state in `directory/state`."""
    settings: dict[str, TomlValue] = {
        "listen": ["127.0.0.1:0"],
        "state_dir": str(directory / "state"),
        "site": "test",
        "log_level": "info",
    }
    settings.update(server)
    path = directory / "licd.toml"
    path.write_text(render_config(settings, licences or (DICOM_TOML,)), encoding="utf-8")
    return path


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.pop("PYTHONASYNCIODEBUG", None)  # the daemon runs as it would in production
    return env


def licd_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "licd", *args]


def run_licd(*args: str, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run `licd ARGS` to completion (bounded); its output as text."""
    return subprocess.run(
        licd_command(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(),
        cwd=ROOT,
        check=False,
    )


class DaemonProcess:
    """One `licd serve` process. `addr` is known once `start()` returns.

    `command` and `env` replace `licd serve --config CONFIG` and child_env(), e.g. for a
    daemon on its embedded defaults (then `config` is None: there is no file)."""

    def __init__(
        self,
        config: Path | None,
        stderr_path: Path,
        *,
        command: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if command is None:
            assert config is not None, "give a config file or a command"
            command = licd_command("serve", "--config", str(config))
        self.config = config
        self.command = list(command)
        self.env = env
        self.stderr_path = stderr_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def addr(self) -> tuple[str, int]:
        assert self.port, "the daemon has not started"
        return ("127.0.0.1", self.port)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def start(self, timeout: float = START_TIMEOUT, until: str | None = None) -> None:
        """Spawn the daemon and wait for its listening line (or fail, showing stderr).
        With `until`: wait for a line matching that pattern instead (a cluster's standby
        listens on its known `port` before it logs `event=listening`)."""
        assert self.proc is None, "already started"
        with self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=child_env() if self.env is None else dict(self.env),
                cwd=ROOT,
            )
        deadline = time.monotonic() + timeout
        ready = _LISTENING if until is None else re.compile(until)
        while True:
            match = ready.search(self.stderr())
            if match:
                if until is None:
                    self.port = int(match.group(1))
                return
            code = self.proc.poll()
            if code is not None:
                raise AssertionError(
                    f"licd exited with {code} before listening; stderr:\n{self.stderr()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(
                    f"licd did not listen within {timeout:g} s; stderr:\n{self.stderr()}"
                )
            time.sleep(_POLL)

    def wait_for(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
        """Wait (bounded) until stderr has a line matching `pattern`."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.stderr())
            if match:
                return match
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} within {timeout:g} s:\n{self.stderr()}")
            time.sleep(_POLL)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self, timeout: float = STOP_TIMEOUT, sig: int = signal.SIGTERM) -> None:
        """Graceful stop: send `sig`, wait (bounded), and assert exit code 0."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"licd did not stop within {timeout:g} s of signal {sig}; stderr:\n{self.stderr()}"
            ) from None
        assert code == 0, f"licd exited with {code}; stderr:\n{self.stderr()}"

    def kill(self) -> None:
        """SIGKILL, and reap the process (the state directory's lock goes with it)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT)

    # asyncio tests call these so the event loop is not blocked while a daemon starts.
    async def astart(self, within: float = START_TIMEOUT) -> None:
        await asyncio.to_thread(self.start, within)

    async def aterminate(self, within: float = STOP_TIMEOUT, sig: int = signal.SIGTERM) -> None:
        await asyncio.to_thread(self.terminate, within, sig)


class Daemons:
    """Starts daemons for one test; kills whatever is still running on exit."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[DaemonProcess] = []

    def config(self, *licences: Mapping[str, TomlValue], **server: TomlValue) -> Path:
        return write_config(self.directory, *licences, **server)

    def process(self, config: Path) -> DaemonProcess:
        """A daemon for `config`, not yet started."""
        n = len(self.started) + 1
        daemon = DaemonProcess(config, self.directory / f"licd-{n}.stderr")
        self.started.append(daemon)
        return daemon

    def start(self, config: Path) -> DaemonProcess:
        daemon = self.process(config)
        daemon.start()
        return daemon

    async def astart(self, config: Path) -> DaemonProcess:
        daemon = self.process(config)
        await daemon.astart()
        return daemon

    def cleanup(self) -> None:
        for daemon in self.started:
            daemon.kill()

    def __enter__(self) -> Daemons:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


def one_line_error(stderr: str) -> str:
    """The single line a refused command printed; fails on a traceback or more lines."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{stderr}"
    return lines[0]


def lease_fields(reply: Mapping[str, Any]) -> tuple[str, int]:
    """(secret, seats) of an ok checkout reply."""
    assert reply.get("ok") is True, reply
    return str(reply["lease"]), int(reply["seats"])
