"""A real licd for the benchmarks: config, process, readiness, CPU and memory, state.

`LicdProcess` writes a TOML config (state in a temp dir, 127.0.0.1 port 0, one licence
with seats to spare, caps raised, quiet logs; a [store] table for `--backend postgres`),
starts `python -m licd serve` with NOTIFY_SOCKET pointing at a datagram socket it binds,
and learns readiness and the port from the READY=1 message (the daemon's STATUS names
its addresses; a cluster node's first READY=1, as a standby, is passed over: it is ready
once it leads). CPU comes from /proc/PID/stat (utime + stime, all threads), RSS from
/proc/PID/status. It also builds a state directory full of leases for the restart
scenario. Every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LICENCE_KEY = "BNCH-0000-0001"
LICENCE_ID = "bench"
_ADDR = re.compile(r"(?:^|[ ,])(?:\[[^\]]*\]|[0-9.]+):(\d+)")
_LISTENING = re.compile(r"event=listening addr=(?:\[[^\]]*\]|[^\s:]+):(\d+)")
_TICK = os.sysconf("SC_CLK_TCK")

TomlValue = str | int | float | bool | Sequence[Any] | Mapping[str, Any]


def toml_value(value: TomlValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return "[" + ", ".join(toml_value(v) for v in value) + "]"


def licence(seats: int, lease_ttl: float | str, **extra: TomlValue) -> dict[str, TomlValue]:
    out: dict[str, TomlValue] = {
        "key": LICENCE_KEY,
        "id": LICENCE_ID,
        "product": "bench",
        "seats": seats,
        "lease_ttl": lease_ttl,
        "grace": 15,
        "features": {"tier": "pro", "modules": "core,ocr"},
    }
    out.update(extra)
    return out


def write_config(
    directory: Path,
    lic: Mapping[str, TomlValue],
    *,
    store: Mapping[str, TomlValue] | None = None,
    **server: TomlValue,
) -> Path:
    """licd.toml in `directory`: [server] (the defaults below, updated by `server`),
    the one [[licence]] `lic`, and a [store] table when `store` is given (None: the
    default, SQLite in the state directory)."""
    settings: dict[str, TomlValue] = {
        "listen": ["127.0.0.1:0"],
        "state_dir": str(directory / "state"),
        "site": "bench",
        "log_level": "warning",
        "idle_timeout": "1h",
        "max_connections": 20000,
        "max_connections_per_peer": 20000,
        # The load generator drives each lease, and all its checkouts from one address,
        # as fast as it can: just what the per-lease and per-peer limits refuse.
        "renewals_per_second": 1_000_000.0,
        "checkout_rate": 1_000_000.0,
        "checkout_burst": 10_000_000,
    }
    settings.update(server)
    lines = ["[server]", *(f"{k} = {toml_value(v)}" for k, v in settings.items())]
    lines += ["", "[[licence]]", *(f"{k} = {toml_value(v)}" for k, v in lic.items())]
    if store is not None:
        lines += ["", "[store]", *(f"{k} = {toml_value(v)}" for k, v in store.items())]
    path = directory / "licd.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU time the process (all its threads) or one of its threads used."""
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    with open(path, encoding="ascii") as fh:
        rest = fh.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / _TICK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class CpuMeter:
    """CPU used by a process (or one thread of it) between `start()` and `stop()`, as %
    of one core."""

    def __init__(self, pid: int, thread: int | None = None) -> None:
        self.pid = pid
        self.thread = thread
        self._cpu0 = self._t0 = 0.0
        self.percent = 0.0

    def start(self) -> None:
        self._cpu0, self._t0 = cpu_seconds(self.pid, self.thread), time.monotonic()

    def stop(self) -> float:
        cpu, now = cpu_seconds(self.pid, self.thread), time.monotonic()
        self.percent = 100.0 * (cpu - self._cpu0) / max(now - self._t0, 1e-9)
        return self.percent


class SystemMeter:
    """Machine-wide CPU between `start()` and `stop()` from /proc/stat, in % of one core
    (so 2 busy cores read 200 %): busy, softirq (loopback traffic) and steal."""

    def __init__(self) -> None:
        self._t0: list[int] = []
        self.busy = self.softirq = self.steal = 0.0

    @staticmethod
    def _read() -> list[int]:
        with open("/proc/stat", encoding="ascii") as fh:
            return [int(x) for x in fh.readline().split()[1:]]

    def start(self) -> None:
        self._t0 = self._read()

    def stop(self) -> dict[str, float]:
        delta = [b - a for a, b in zip(self._t0, self._read(), strict=False)]
        total = sum(delta[:8]) or 1
        cores = os.cpu_count() or 1
        idle = delta[3] + delta[4]  # idle + iowait
        self.busy = 100.0 * cores * (total - idle) / total
        self.softirq = 100.0 * cores * delta[6] / total
        self.steal = 100.0 * cores * delta[7] / total
        return {"busy": self.busy, "softirq": self.softirq, "steal": self.steal}


def sleep_until(when: float) -> None:
    delay = when - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    for name in ("PYTHONASYNCIODEBUG", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(name, None)
    env.update(extra or {})
    return env


class LicdProcess:
    """One `licd serve` on a generated config; started by `start()`, stopped by `stop()`."""

    def __init__(self, config: Path, directory: Path, name: str = "licd") -> None:
        self.config = config
        self.stderr_path = directory / f"{name}.stderr"
        self.notify_path = directory / f"{name}.notify"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.started_at = 0.0  # monotonic, just before the process was spawned
        self.ready_at = 0.0  # monotonic, when READY=1 arrived
        self.log_ready_at = 0.0  # monotonic, when the `event=ready` line was first seen

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def start(self, timeout: float = 60.0) -> float:
        """Spawn the daemon and wait for READY=1; the seconds that took."""
        with contextlib.suppress(FileNotFoundError):
            self.notify_path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(str(self.notify_path))
            with self.stderr_path.open("wb") as err:
                self.started_at = time.monotonic()
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "licd", "serve", "--config", str(self.config)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    env=child_env({"NOTIFY_SOCKET": str(self.notify_path)}),
                    cwd=ROOT,
                )
            self._wait_ready(sock, timeout)
        finally:
            sock.close()
        return self.ready_at - self.started_at

    def _wait_ready(self, sock: socket.socket, timeout: float) -> None:
        assert self.proc is not None
        deadline = self.started_at + timeout
        while True:
            ready, _, _ = select.select([sock], [], [], 0.005)
            if not self.log_ready_at and "event=ready" in self.stderr():
                self.log_ready_at = time.monotonic()  # needs log_level info
            if ready:
                message = sock.recv(4096).decode("utf-8", "replace")
                if "READY=1" in message.split("\n"):
                    status = next(
                        (x[7:] for x in message.split("\n") if x.startswith("STATUS=")), ""
                    )
                    if status.startswith("standby"):
                        continue  # a cluster node (PostgreSQL store) not leading yet
                    self.ready_at = time.monotonic()
                    match = _ADDR.search(status)
                    if match is None:  # an older daemon: its log names the port
                        match = _LISTENING.search(self.stderr())
                    if match is None:
                        raise RuntimeError(f"READY=1 without an address: {message!r}")
                    self.port = int(match.group(1))
                    return
                continue
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"licd exited with {self.proc.returncode}; stderr:\n{self.stderr()[-3000:]}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"licd not ready within {timeout:g} s:\n{self.stderr()[-3000:]}")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM and wait (bounded); SIGKILL if it will not stop."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10.0)

    def __enter__(self) -> LicdProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.kill()


def add_leases(state_dir: Path, count: int, ttl: float) -> list[str]:
    """Insert `count` live leases of the bench licence into the daemon's database
    (created by a first start, daemon stopped), through licd's own row mapping so the
    columns match. Returns a few of their secrets."""
    import secrets

    from licd.engine import SeatLease
    from licd.store.records import INSERT_LEASE, lease_row
    from licd.store.sqlite import DB_FILE
    from licd_client.messages import Holder

    now = time.time()
    db = sqlite3.connect(state_dir / DB_FILE, isolation_level=None)
    kept: list[str] = []
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("BEGIN IMMEDIATE")
        batch: list[tuple[Any, ...]] = []
        for i in range(count):
            secret = secrets.token_urlsafe(24)
            if i < 16:
                kept.append(secret)
            holder = Holder(host=f"host{i}", hostid=f"hostid-{i}", user="bench", pid=1000 + i)
            lease = SeatLease(
                secret=secret,
                handle=f"b{i:011d}",
                licence_id=LICENCE_ID,
                holder=holder,
                request=f"restart-{i}",
                seats=1,
                ttl=ttl,
                created=now,
                expires=now + ttl,
                last_heartbeat=now,
                ip="127.0.0.1",
            )
            batch.append(lease_row(lease))
            if len(batch) >= 10_000:
                db.executemany(INSERT_LEASE, batch)
                batch.clear()
        if batch:
            db.executemany(INSERT_LEASE, batch)
        db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    return kept
