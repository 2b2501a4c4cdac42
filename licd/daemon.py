"""The composition root: builds the daemon from its config and runs it until told to stop.

`Daemon.open()` prepares the state directory (mode 0700, one daemon per directory by a
lock), the key, the store and the engine with the leases kept across a restart.
`Daemon.run()` starts the writer, the reaper and the listeners in one TaskGroup (a
crashed background task stops the daemon instead of dying silently) and, when the stop
event is set, shuts down in order. Signals are wired by the CLI, not here.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO

from .clock import Clock, SystemClock
from .config import Config
from .dispatch import Dispatcher
from .engine import Engine
from .keys import Signer, key_path, load_or_create_key
from .server import Server
from .service import LicenceService
from .store import DB_FILE, Store

log = logging.getLogger(__name__)

LOCK_FILE = "licd.lock"


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""


def prepare_state_dir(path: Path) -> None:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"cannot create the state directory {path}: {exc.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise StartupError(f"the state directory {path} is not writable")
    # The database holds lease secrets: only the daemon's user may look inside, even
    # when the directory was made beforehand by someone else's umask.
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        try:
            path.chmod(0o700)
        except OSError as exc:
            raise StartupError(
                f"the state directory {path} is open to other users (mode {mode:o}) "
                f"and cannot be made private: {exc.strerror}"
            ) from None
        log.warning("event=state_dir_made_private path=%s old_mode=%o", path, mode)


def _lock(state_dir: Path) -> IO[str]:
    fh = (state_dir / LOCK_FILE).open("a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise StartupError(
            f"another licd is already running with the state directory {state_dir}"
        ) from None
    return fh


class Daemon:
    def __init__(
        self,
        config: Config,
        store: Store,
        service: LicenceService,
        server: Server,
        signer: Signer,
        lock: IO[str],
    ) -> None:
        self.config = config
        self.store = store
        self.service = service
        self.server = server
        self.signer = signer
        self._lock = lock

    @property
    def engine(self) -> Engine:
        return self.service.engine

    @classmethod
    async def open(cls, config: Config, *, clock: Clock | None = None) -> Daemon:
        clock = clock or SystemClock()
        state_dir = config.server.state_dir
        prepare_state_dir(state_dir)
        lock = _lock(state_dir)
        try:
            key = load_or_create_key(key_path(state_dir))
            store = await Store.open(state_dir / DB_FILE)
        except Exception:
            lock.close()
            raise
        engine = Engine(config.licences)
        kept = await store.load_leases()
        skipped = engine.restore(kept, clock.now())
        for lease in skipped:
            log.warning(
                "event=lease_without_licence licence=%s lease=%s",
                lease.licence_id,
                lease.handle,
            )
        log.info("event=restored leases=%d", len(kept) - len(skipped))
        signer = Signer(key, config.server.site)
        service = LicenceService(engine, store, clock)
        server = Server(config.server, Dispatcher(service, signer))
        return cls(config, store, service, server, signer, lock)

    async def run(
        self,
        stop: asyncio.Event,
        *,
        on_ready: Callable[[Daemon], None] | None = None,
    ) -> None:
        """Serve until `stop` is set, then shut down in order."""
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.store.run(), name="store-writer")
                reaper = tg.create_task(
                    self.service.run_reaper(self.config.server.reap_interval), name="reaper"
                )
                try:
                    addresses = await self.server.start()
                except OSError as exc:
                    raise StartupError(f"cannot listen: {exc.strerror or exc}") from None
                for host, port in addresses:
                    log.info("event=listening addr=%s", _addr(host, port))
                log.info(
                    "event=ready site=%s key=%s licences=%d",
                    self.signer.site,
                    self.signer.public.hex(),
                    len(self.config.licences),
                )
                if on_ready is not None:
                    on_ready(self)
                await stop.wait()
                log.info("event=stopping")
                await self.server.stop()
                reaper.cancel()
                await self.store.close()
        except BaseExceptionGroup as group:
            # Unwrap: one clear error rather than a group of one.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        finally:
            await self.server.stop()
            await self.store.close()
            self._lock.close()
            log.info("event=stopped")


def _addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def setup_logging(level: str) -> None:
    """One structured line per event on stderr, which journald collects."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s level=%(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    with contextlib.suppress(Exception):
        logging.getLogger("aiosqlite").setLevel(logging.WARNING)
