"""A throwaway, real PostgreSQL server for the tests of the PostgreSQL store and of HA.

`PgServer().start()` runs `initdb` into a fresh temporary directory and starts the
server on a free port of 127.0.0.1 only (no Unix socket), trusting every connection
from there; `dsn` then names its database `licd`, owned by the superuser `licd`.
`cleanup()` stops it and removes everything it left, also after a failed start (which
raises RuntimeError with the tail of the server log). A primary can be given a
streaming standby (`PgServer.standby_of`), made synchronous (`make_synchronous`) and
the standby promoted (`promote`); `kill()` SIGKILLs a server to test crash recovery.

Tests call `postgres_or_skip()` first: it skips, naming what to install, when the
server binaries or the asyncpg driver (the optional extra `licd[postgres]`) are missing.

PostgreSQL refuses to run as root, and CI runs the tests as root: then every server
program (initdb, pg_ctl, pg_basebackup and so the server) runs as the unprivileged
`postgres` user, dropped to by subprocess itself, and the server's directory is chowned
to it. The directory is made under the system temporary directory (not pytest's
`tmp_path`, which is private to root). Linux only: `kill()` finds processes in /proc.

Nothing here sleeps and hopes: pg_ctl waits (`-w`, bounded by START_TIMEOUT) and every
other wait is a short polling loop with a deadline.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal

import pytest

#: Names the directory holding initdb, pg_ctl and postgres, overriding the search.
BINDIR_ENV = "LICD_PG_BINDIR"
#: The account the server runs as when the tests run as root.
SERVER_USER = "postgres"
SUPERUSER = "licd"
DATABASE = "licd"
#: Seconds: pg_ctl's wait for a start, stop or promotion (`-t`), generous for a loaded
#: machine; and the bound on any other command or wait.
START_TIMEOUT = 60
COMMAND_TIMEOUT = 120.0
_POLL = 0.05
_SERVER_TOOLS = ("initdb", "pg_ctl", "postgres", "pg_basebackup")
_NAME = re.compile(r"[A-Za-z0-9_]+")

StopMode = Literal["fast", "immediate"]


def find_bindir() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres: $LICD_PG_BINDIR if set, else
    the newest /usr/lib/postgresql/<version>/bin with a `postgres`, else what
    `pg_config --bindir` says, else None."""
    named = os.environ.get(BINDIR_ENV)
    if named:
        return Path(named)
    versions: list[tuple[tuple[int, ...], Path]] = []
    for bindir in Path("/usr/lib/postgresql").glob("*/bin"):
        try:
            version = tuple(int(part) for part in bindir.parent.name.split("."))
        except ValueError:
            continue
        if (bindir / "postgres").is_file():
            versions.append((version, bindir))
    if versions:
        return max(versions)[1]
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"],
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT,
                check=True,
            ).stdout.strip()
            if out:
                return Path(out)
    return None


def postgres_or_skip() -> Path:
    """The server binaries' directory; skips the test when they, psql or asyncpg are
    missing (or, running as root, the `postgres` user to run the server as)."""
    install = (
        "install the server (`apt-get install postgresql`, or set LICD_PG_BINDIR) and "
        "the driver (`pip install 'licd[postgres]'`)"
    )
    if importlib.util.find_spec("asyncpg") is None:
        pytest.skip(f"the PostgreSQL driver asyncpg is not installed: {install}")
    bindir = find_bindir()
    if bindir is None:
        pytest.skip(
            "no PostgreSQL server found ($LICD_PG_BINDIR, /usr/lib/postgresql/*/bin, "
            f"`pg_config --bindir`): {install}"
        )
    missing = [tool for tool in _SERVER_TOOLS if not (bindir / tool).is_file()]
    if missing:
        pytest.skip(
            f"the PostgreSQL binaries directory {bindir} lacks {', '.join(missing)}: {install}"
        )
    if _psql(bindir) is None:
        pytest.skip(f"no psql found: {install}")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            pytest.skip(
                f"running as root, and there is no `{SERVER_USER}` user to run the "
                f"PostgreSQL server as (it refuses root): {install}"
            )
    return bindir


def _psql(bindir: Path) -> Path | None:
    """psql: the server's own, else the one on PATH."""
    if (bindir / "psql").is_file():
        return bindir / "psql"
    found = shutil.which("psql")
    return None if found is None else Path(found)


def _environment() -> dict[str, str]:
    """This environment without its PG* variables (PGDATA, PGPORT, PGHOST and so on
    would redirect initdb, pg_ctl or psql), in the C locale."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


def _reserve_port() -> socket.socket:
    """A socket holding a free port of 127.0.0.1 for as long as it is open: bound with
    SO_REUSEADDR and never listening, so a server (PostgreSQL binds with SO_REUSEADDR)
    can listen on the port, again after every restart, while no `bind(port 0)` or
    outgoing connection of another process can take it meanwhile."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
    except BaseException:
        sock.close()
        raise
    return sock


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (entry / "stat").read_text()
                # pid (comm) state ppid ...; comm may hold spaces and parentheses
                if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                    children.append(int(entry.name))
    return children


def _alive(pid: int) -> bool:
    """Whether process `pid` exists and has not exited (a zombie has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in ("Z", "X")


class PgServer:
    """One PostgreSQL server in its own temporary directory (see the module docstring).

    Usable as a context manager: started on entry, cleaned up on exit.
    """

    def __init__(
        self, bindir: Path | None = None, *, settings: Mapping[str, str] | None = None
    ) -> None:
        """`settings`: more postgresql.conf lines, name to (already quoted) value."""
        found = bindir or find_bindir()
        if found is None:
            raise RuntimeError("no PostgreSQL binaries found (see postgres_or_skip)")
        self.bindir = found
        self.settings = dict(settings or {})
        self._workdir: Path | None = None
        self._port_holder: socket.socket | None = None
        self._running = False
        if os.geteuid() == 0:
            account = pwd.getpwnam(SERVER_USER)
            self._uid: int | None = account.pw_uid
            self._gid: int | None = account.pw_gid
            self._groups: list[int] | None = os.getgrouplist(SERVER_USER, account.pw_gid)
        else:
            self._uid = self._gid = self._groups = None

    # -- where it is ------------------------------------------------------------------

    @property
    def workdir(self) -> Path:
        """The server's temporary directory: `datadir` and `logfile` are in it."""
        if self._workdir is None:
            raise RuntimeError("the server has no directory: not started, or cleaned up")
        return self._workdir

    @property
    def datadir(self) -> Path:
        return self.workdir / "data"

    @property
    def logfile(self) -> Path:
        """The server's log (its stderr, through `pg_ctl -l`): beside the data directory,
        not in it, so that `pg_basebackup` does not copy it to a standby."""
        return self.workdir / "server.log"

    @property
    def port(self) -> int:
        if self._port_holder is None:
            raise RuntimeError("the server has no port: not started, or cleaned up")
        port: int = self._port_holder.getsockname()[1]
        return port

    @property
    def dsn(self) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{DATABASE}"

    @property
    def running(self) -> bool:
        return self._running

    def replication_conninfo(self, application_name: str) -> str:
        """A conninfo string for a standby streaming from this server."""
        return (
            f"host=127.0.0.1 port={self.port} user={SUPERUSER} application_name={application_name}"
        )

    # -- life -------------------------------------------------------------------------

    def start(self) -> None:
        """initdb, configure, start, create the database `licd`. On failure everything is
        removed again and RuntimeError raised (with the server log's tail)."""
        if self._workdir is not None:
            raise RuntimeError("start() is for a new server: use restart()")
        try:
            self._make_workdir()
            self._server_tool(
                "initdb",
                f"--pgdata={self.datadir}",
                f"--username={SUPERUSER}",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            )
            self._configure()
            self._launch()
            self.psql(f"CREATE DATABASE {DATABASE}", database="postgres")
        except BaseException:
            self.cleanup()
            raise

    def _make_workdir(self) -> None:
        self._port_holder = _reserve_port()
        self._workdir = Path(tempfile.mkdtemp(prefix="licd-pg-"))
        if self._uid is not None and self._gid is not None:
            os.chown(self._workdir, self._uid, self._gid)

    def _configure(self) -> None:
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": "''",
            "fsync": "on",
            "max_connections": "50",
            "shared_buffers": "32MB",
            "wal_level": "replica",
            "max_wal_senders": "5",
            "hot_standby": "on",
            "logging_collector": "off",  # stderr, into `logfile` by pg_ctl -l
            "log_line_prefix": "'%m [%p] '",
            **self.settings,
        }
        # appended (not rewritten), as the server's user owns the files: the last wins
        with (self.datadir / "postgresql.conf").open("a") as conf:
            conf.write("\n# tests/pgcluster.py\n")
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())
        (self.datadir / "pg_hba.conf").write_text(
            "host all all 127.0.0.1/32 trust\nhost replication all 127.0.0.1/32 trust\n"
        )

    def _launch(self) -> None:
        try:
            self._server_tool(
                "pg_ctl",
                "start",
                "-w",
                f"-t{START_TIMEOUT}",
                f"--pgdata={self.datadir}",
                f"--log={self.logfile}",
            )
        except RuntimeError as exc:
            self._halt()  # pg_ctl may have given up on a server still starting
            raise RuntimeError(f"{exc}\n{self._log_report()}") from None
        self._running = True

    def stop(self, mode: StopMode = "fast") -> None:
        """Stops the server (pg_ctl stop -m `mode`, waiting); nothing if not running."""
        if not self._running:
            return
        try:
            self._server_tool(
                "pg_ctl",
                "stop",
                "-w",
                f"-t{START_TIMEOUT}",
                f"-m{mode}",
                f"--pgdata={self.datadir}",
            )
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{self._log_report()}") from None
        self._running = False

    def kill(self) -> None:
        """SIGKILLs the postmaster and all its children (backends, auxiliary processes,
        WAL senders), waiting until all have exited: a crash, as of the machine, for
        `restart()` to recover from. (Killed alone, the postmaster would leave children
        attached to its shared memory for a while, failing the next start.)"""
        pid = self._postmaster_pid()
        if not self._running or pid is None or not self._is_postmaster(pid):
            raise RuntimeError("the server is not running")
        self._kill_server(pid)
        self._running = False

    def restart(self) -> None:
        """Stops the server (fast) if running, and starts it again on its directory."""
        self.stop("fast")
        self._launch()

    def promote(self) -> None:
        """Promotes this standby to a primary (pg_ctl promote, waiting until writable)."""
        self._server_tool(
            "pg_ctl", "promote", "-w", f"-t{START_TIMEOUT}", f"--pgdata={self.datadir}"
        )

    def cleanup(self) -> None:
        """Stops the server (immediately; killed if that fails) and removes its directory
        and port. Safe to call in any state, and again."""
        if self._workdir is not None:
            if self._running:
                try:
                    self.stop("immediate")
                except RuntimeError:
                    self._running = False
            self._halt()
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        if self._port_holder is not None:
            self._port_holder.close()
            self._port_holder = None

    def __enter__(self) -> PgServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    # -- replication ------------------------------------------------------------------

    @classmethod
    def standby_of(cls, primary: PgServer, name: str = "standby1") -> PgServer:
        """A hot standby of the running `primary`, streaming from it as application
        `name` (pg_basebackup -R -X stream), started. Asynchronous until
        `primary.make_synchronous(name)`."""
        if not _NAME.fullmatch(name):
            raise ValueError(f"standby name {name!r}: letters, digits and _ only")
        standby = cls(primary.bindir, settings=primary.settings)
        try:
            standby._make_workdir()
            standby._server_tool(
                "pg_basebackup",
                f"--pgdata={standby.datadir}",
                "--write-recovery-conf",
                "--wal-method=stream",
                "--checkpoint=fast",
                "--no-sync",
                f"--dbname={primary.replication_conninfo(name)}",
            )
            # postgresql.auto.conf, written by -R, overrides postgresql.conf (copied from
            # the primary); a synchronous_standby_names set on the primary by ALTER SYSTEM
            # would make every write of the promoted standby wait for a standby of its own
            with (standby.datadir / "postgresql.auto.conf").open("a") as conf:
                conf.write(
                    f"port = {standby.port}\n"
                    f"primary_conninfo = '{primary.replication_conninfo(name)}'\n"
                    "synchronous_standby_names = ''\n"
                )
            standby._launch()
        except BaseException:
            standby.cleanup()
            raise
        return standby

    def make_synchronous(self, name: str = "standby1") -> None:
        """Makes the standby `name` synchronous (ALTER SYSTEM synchronous_standby_names)
        and waits until pg_stat_replication reports it as `sync`."""
        if not _NAME.fullmatch(name):
            raise ValueError(f"standby name {name!r}: letters, digits and _ only")
        self.psql(f"ALTER SYSTEM SET synchronous_standby_names = '{name}'")
        self.psql("SELECT pg_reload_conf()")
        query = f"SELECT sync_state FROM pg_stat_replication WHERE application_name = '{name}'"
        deadline = time.monotonic() + COMMAND_TIMEOUT
        state = ""
        while time.monotonic() < deadline:
            state = self.psql(query)
            if state == "sync":
                return
            time.sleep(_POLL)
        raise RuntimeError(f"standby {name} not synchronous (sync_state {state!r}) in time")

    # -- commands ---------------------------------------------------------------------

    def psql(self, sql: str, *, database: str = DATABASE) -> str:
        """Runs `sql` with psql (-X -A -t, stopping at the first error) and returns its
        output without the final newline; RuntimeError with psql's stderr on failure."""
        psql = _psql(self.bindir)
        if psql is None:
            raise RuntimeError("no psql found")
        dsn = f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}?connect_timeout=30"
        argv = [str(psql), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-c", sql]
        return self._run(argv, as_server=False).removesuffix("\n")

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.logfile.read_text(errors="replace")
        except (OSError, RuntimeError):
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _log_report(self) -> str:
        tail = self.log_tail()
        return f"server log ({self.logfile}), last lines:\n{tail}" if tail else "(no server log)"

    def _server_tool(self, tool: str, *args: str) -> str:
        """Runs one of the server's programs as the server's user."""
        return self._run([str(self.bindir / tool), *args], as_server=True)

    def _run(self, argv: Sequence[str], *, as_server: bool) -> str:
        server = as_server and self._uid is not None
        try:
            done = subprocess.run(
                argv,
                cwd=self._workdir,
                env=_environment(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT,
                check=False,
                user=self._uid if server else None,
                group=self._gid if server else None,
                extra_groups=self._groups if server else None,
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"{' '.join(argv)}: no answer in {exc.timeout} s") from None
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)} exited with {done.returncode}:\n{done.stdout}{done.stderr}"
            )
        return done.stdout

    # -- processes --------------------------------------------------------------------

    def _postmaster_pid(self) -> int | None:
        try:
            first = (self.datadir / "postmaster.pid").read_text().split("\n", 1)[0]
            return int(first)
        except (OSError, ValueError, RuntimeError):
            return None

    def _is_postmaster(self, pid: int) -> bool:
        """Whether `pid` is a live process in this server's data directory (the
        postmaster's working directory): never kill a stranger that reused the pid."""
        try:
            return Path(os.readlink(f"/proc/{pid}/cwd")) == self.datadir.resolve()
        except (OSError, RuntimeError):
            return False

    def _halt(self) -> None:
        """Kills a postmaster left behind (by a failed start or stop), if any."""
        pid = self._postmaster_pid()
        if pid is not None:
            with contextlib.suppress(OSError, RuntimeError):
                self._kill_server(pid)
        self._running = False

    def _kill_server(self, pid: int) -> None:
        """SIGKILLs postmaster `pid` and all its children, and waits until all exited."""
        if not self._is_postmaster(pid):
            return  # gone already (or the pid, from a stale file, is another's now)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)  # so that it forks no child we do not see
        doomed = [pid, *_children(pid)]
        for each in doomed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(each, signal.SIGKILL)
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while (alive := [each for each in doomed if _alive(each)]) and time.monotonic() < deadline:
            time.sleep(_POLL)
        if alive:
            raise RuntimeError(f"server processes {alive} still alive after SIGKILL")
        # The dead postmaster's pid file is stale. Remove it: under a PID 1 that does not
        # reap orphans (some containers), the postmaster stays a zombie, whose pid the
        # next postmaster would take for a running server ("lock file already exists").
        with contextlib.suppress(OSError):
            (self.datadir / "postmaster.pid").unlink()
