"""The composition root: builds the daemon from its config and runs it until told to stop.

`Daemon.open()` prepares the state directory (mode 0700, one daemon per directory by a
lock), the key, the store and the engine with the leases kept across a restart.
`Daemon.run()` starts the writer, the reaper, the audit upkeep (counted denials,
retention) and the listeners in one TaskGroup (a crashed background task stops the
daemon instead of dying silently) and, when the stop event is set, shuts down in order;
when the exit-now event is set too, it cuts the shutdown short. Signals are wired by the
CLI, not here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import importlib.util
import logging
import os
import ssl
import stat
import sys
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any, cast

from nacl.signing import SigningKey

from licd.clock import Clock, SystemClock
from licd.config.settings import Config, ConfigError, StoreConfig, default_site, load_config
from licd.core.admin import AdminOps
from licd.core.audit_upkeep import RETIRE_CHUNK, RETIRE_MAX_CHUNKS, DenialLog, retire
from licd.core.clock_guard import ClockGuard
from licd.core.cluster import ClusterStore, Leadership, LeaderStore, StandbyAnswers
from licd.core.dispatch import Dispatcher
from licd.core.entitlements import EntitlementRefused, Entitlements
from licd.core.events import Event, EventBus, Kind
from licd.core.keys import Signer
from licd.core.router import Router
from licd.core.service import LicenceService
from licd.engine import Engine, Licence
from licd.engine.licence import key_clash
from licd.engine.ratelimit import CheckoutLimits, PeerBuckets
from licd.observe.alerts import AlertMonitor
from licd.observe.metrics import Metrics, engine_usage
from licd.shells.admin_server import Access, AdminServer, check_socket_path
from licd.shells.metrics_http import serve_metrics
from licd.shells.notify import Notifier
from licd.shells.server import Server
from licd.shells.standby import StandbyListener
from licd.shells.upstream import UpstreamLink
from licd.store.base import Store, StoreError
from licd.store.keyfile import key_path, load_key, load_or_create_key
from licd.store.sqlite import DB_FILE, SqliteStore
from licd_client.connection import format_address
from licd_client.errors import LicdError
from licd_client.identity import site_components
from licd_client.safetext import OneLineFormatter, kv_line
from licd_client.statements import fingerprint

log = logging.getLogger(__name__)

DENIAL_FLUSH_EVERY = 1.0  # seconds between looks for denial groups whose interval is over
RETIRE_EVERY = 3600.0  # seconds between audit retention runs (the first soon after start)
EXIT_NOW_GRACE = 1.0  # seconds the store gets to close when told to exit now


POSTGRES_EXTRA = "[store] backend = \"postgres\" needs asyncpg: pip install 'licd[postgres]'"


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""


def event_loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop `[server] event_loop` asks for: uvloop's (for "uvloop", and for
    "auto" when it is installed), or None for asyncio's own. StartupError when uvloop
    is asked for and not installed."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise StartupError(
                '[server] event_loop = "uvloop" but uvloop is not installed: '
                "pip install 'licd[fast]', or set event_loop = \"auto\""
            ) from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def prepare_state_dir(path: Path) -> None:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"cannot create the state directory {path}: {exc.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise StartupError(f"the state directory {path} is not writable")
    # The database holds lease secrets: only the daemon's user may look inside, even
    # when the directory was made beforehand by someone else's umask.
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & (stat.S_ISVTX | stat.S_IWOTH):
        raise StartupError(
            f"the state directory {path} is shared (mode {mode:o}), like /tmp: give licd "
            "a directory of its own"
        )
    if mode & 0o077:
        try:
            path.chmod(0o700)
        except OSError as exc:
            raise StartupError(
                f"the state directory {path} is open to other users (mode {mode:o}) "
                f"and cannot be made private: {exc.strerror}"
            ) from None
        log.warning("event=state_dir_made_private path=%s old_mode=%o", path, mode)


async def open_store(config: StoreConfig, state_dir: Path) -> Store:
    """The store the config names: SQLite in `state_dir` (the default), or PostgreSQL
    (imported only then: asyncpg is an optional extra, `licd[postgres]`)."""
    if config.backend == "postgres":
        try:
            from licd.store.postgres import PostgresStore, read_dsn
        except ImportError:
            raise StartupError(POSTGRES_EXTRA) from None
        dsn = read_dsn(config.dsn, config.dsn_file)
        return await PostgresStore.open(dsn, idle_timeout=config.leader_ttl)
    return await SqliteStore.open(state_dir / DB_FILE)


async def _cluster_node_key(store: ClusterStore, path: Path) -> SigningKey:
    """A cluster node's key: the cluster's, copied to every node (clients pin one key).
    The first node's key becomes the cluster's; a node with another key is refused, and
    a node without one is told to copy it rather than given a new one."""
    known = await store.cluster_key()
    key = _node_key_file(path, known)
    mine = bytes(key.verify_key)
    if known is None:
        known = await store.cluster_key(mine)  # unless a node starting with us was first
    if mine != known:
        raise StartupError(
            f"{path} is not the cluster's key: this node's is {fingerprint(mine)}, the "
            f"cluster's {fingerprint(known or b'')}; copy daemon.key from another node "
            "(docs/ha.md)"
        )
    return key


def _node_key_file(path: Path, known: bytes | None) -> SigningKey:
    """The node's key file: made when the cluster has no key yet, else it must exist."""
    if known is None:
        return load_or_create_key(path)
    if not path.exists():
        raise StartupError(
            f"{path} is missing: every node of a cluster signs with the cluster's key "
            f"({fingerprint(known)}); copy daemon.key from another node (docs/ha.md)"
        )
    return load_key(path)


async def _win_leadership(
    config: Config,
    store: LeaderStore,
    signer: Signer,
    surroundings: Surroundings,
    clock: Clock,
    on_standby: Callable[[str], None] | None,
) -> Leadership:
    """Serve as a standby (hello, and `unavailable` naming the leader) on the node's
    addresses until this node leads; then its renewals run (`Leadership.hold`)."""
    s = config.store
    address = s.advertise or format_address(config.server.listen[0])
    leadership = Leadership(
        store,
        node=s.node or default_site(),  # the host name: the site is every node's
        address=address,
        ttl=s.leader_ttl,
        lock_delay=s.lock_delay,
    )
    answers = StandbyAnswers(signer, leadership, lambda: clock.now().wall)
    listener = StandbyListener(config.server, answers, ssl=surroundings.tls)
    try:
        await listener.start()
    except OSError as exc:
        await listener.stop()
        raise StartupError(f"cannot listen: {exc.strerror or exc}") from None
    if on_standby is not None:
        on_standby(f"standby of a cluster, node {leadership.node} at {address}")
    try:
        await leadership.campaign()
    finally:
        await listener.stop()
    leadership.start_holding()
    return leadership


def _check_key_kept(state_dir: Path) -> None:
    """StartupError when a database is there but its key is gone: a new key would
    silently invalidate every token and chain that clients and sites hold."""
    db = state_dir / DB_FILE
    key = key_path(state_dir)
    if not key.exists() and db.exists() and db.stat().st_size > 0:
        raise StartupError(
            f"{db} exists but its signing key {key} is missing: clients trust that key. "
            f"Restore it from the backup, or move {DB_FILE} away to start afresh with a new key"
        )


class StateLock:
    """The state directory itself, locked (flock) while a daemon uses it. A lock file
    could be deleted from under a running daemon and let a second one in; the
    directory cannot be."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # and with it the lock
            self._fd = -1


def _lock(state_dir: Path) -> StateLock:
    try:
        fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise StartupError(f"cannot open the state directory {state_dir}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StartupError(
            f"another licd is already running with the state directory {state_dir}"
        ) from None
    return StateLock(fd)


class Daemon:
    def __init__(
        self,
        config: Config,
        store: Store,
        service: LicenceService,
        server: Server,
        signer: Signer,
        lock: StateLock,
        admin_access: Access,
        entitlements: Entitlements,
        clock_guard: ClockGuard,
    ) -> None:
        self.config = config
        self.store = store
        self.service = service
        self.server = server
        self.signer = signer
        self.entitlements = entitlements
        self.clock_guard = clock_guard
        self._lock = lock
        self._reloads: asyncio.Queue[None] = asyncio.Queue()
        self._notifier = Notifier()  # no-op unless run() is given systemd's
        self._metrics_server: asyncio.Server | None = None
        self._stored_licences: dict[str, Licence] | None = None  # until written at start
        self.leadership: Leadership | None = None  # a cluster node's, once it leads
        self.started = time.time()
        self._started_mono = time.monotonic()
        self.admin = AdminServer(
            AdminOps(service, self), config.admin, config.admin_socket, admin_access
        )
        # Metrics and alerts listen to the service's events.
        clock = service.clock
        view = partial(engine_usage, service.engine)
        self.metrics = Metrics(view, lambda: server.connection_count, lambda: clock.now().wall)
        self.alerts = AlertMonitor(
            config.alerts,
            view,
            wall=lambda: clock.now().wall,
            monotonic=lambda: clock.now().mono,
            on_alert=lambda alert: self.metrics.alert(alert.kind),
            leases=lambda: service.engine.leases,
        )
        service.events.subscribe(self.metrics.on_event)
        service.events.subscribe(self.alerts.on_event)
        if config.metrics.listen is not None:  # no endpoint, nobody to read the timings
            server.dispatcher.on_request = self._observe_request

    def _observe_request(self, op: str, seconds: float, error: str | None) -> None:
        self.metrics.observe_request(op, seconds, error)
        if op == "heartbeat" and error is None:
            self.metrics.heartbeat()

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """Where the metrics endpoint listens, once it does."""
        if self._metrics_server is None:
            return None
        host, port = self._metrics_server.sockets[0].getsockname()[:2]
        return host, port

    async def _stop_metrics(self) -> None:
        server, self._metrics_server = self._metrics_server, None
        if server is not None:
            server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await server.wait_closed()

    # The admin interface's view of the daemon (admin.DaemonView).

    @property
    def uptime(self) -> float:
        return time.monotonic() - self._started_mono

    @property
    def listen(self) -> list[str]:
        return [format_address(a) for a in self.server.addresses]

    @property
    def site(self) -> str:
        return self.signer.site

    @property
    def router(self) -> Router | None:
        """A site router's relaying (None unless the config has an `[upstream]`)."""
        return self.server.dispatcher.router

    @property
    def public_key(self) -> bytes:
        return self.signer.public

    @property
    def connections(self) -> int:
        return self.server.connection_count

    @property
    def engine(self) -> Engine:
        return self.service.engine

    @classmethod
    async def open(
        cls,
        config: Config,
        *,
        clock: Clock | None = None,
        components: Iterable[str] | None = None,
        on_standby: Callable[[str], None] | None = None,
    ) -> Daemon:
        """The daemon for `config`, its state opened; `components` are this machine's
        host-id components an entitlement's site binding is checked against (by default
        `site_components()`). A cluster node (`[store] backend = "postgres"`) first
        waits, as a standby (`on_standby` is told so), until it leads."""
        clock = clock or SystemClock()
        site = tuple(site_components() if components is None else components)
        # A missing certificate, CA file or group stops us before anything is opened.
        surroundings = resolve_surroundings(config)
        state_dir = config.server.state_dir
        prepare_state_dir(state_dir)
        lock = _lock(state_dir)
        try:
            _check_key_kept(state_dir)
            store = await open_store(config.store, state_dir)
        except Exception:
            lock.close()
            raise
        leadership: Leadership | None = None
        try:
            if config.store.backend == "postgres":
                key = await _cluster_node_key(cast(ClusterStore, store), key_path(state_dir))
            else:
                key = load_or_create_key(key_path(state_dir))
            signer = Signer(key, config.server.site)
            if config.store.backend == "postgres":
                # A cluster node: a standby until it leads; only then is state loaded.
                leadership = await _win_leadership(
                    config, cast(LeaderStore, store), signer, surroundings, clock, on_standby
                )
            daemon = await cls._build(config, clock, surroundings, store, signer, lock, site)
        except BaseException:
            if leadership is not None:
                leadership.stop()
            await store.close()
            lock.close()
            raise
        if leadership is not None:
            daemon.leadership = leadership
            daemon.server.dispatcher.cluster = leadership
        return daemon

    @classmethod
    async def _build(
        cls,
        config: Config,
        clock: Clock,
        surroundings: Surroundings,
        store: Store,
        signer: Signer,
        lock: StateLock,
        components: tuple[str, ...],
    ) -> Daemon:
        """The engine from the database and the config, and the daemon around it."""
        # The daemon's clock: its wall time never goes back, across restarts too.
        guard = ClockGuard(clock, store, skew=config.server.clock_skew)
        await guard.load()
        clock = guard
        events = EventBus()
        router: Router | None = None
        stored = await store.load_licences()
        # A relayed licence's terms come from upstream, never from the database.
        relayed_ids = {r.id for r in config.relayed}
        stored = [x for x in stored if x.id not in relayed_ids]
        daemon: Daemon | None = None
        entitlements = Entitlements(
            store,
            signer,
            vendor_keys=config.vendor.keys,
            components=components,
            declared=lambda: _declared_ids(daemon.config if daemon is not None else config),
        )
        # Entitled licences as their (re-verified) entitlements allow; the config may
        # not declare one (its terms are the vendor's).
        entitled = await entitlements.load({x.id: x for x in stored})
        _refuse_declared_entitled(config, entitlements.held)
        stored_by_id = {x.id: x for x in stored}
        stored = list(entitled.values())
        engine = Engine(
            _merge_licences(stored, config.licences),
            random_bytes=os.urandom,  # the engine reads no entropy itself
            groups=config.groups,
            renew_min_rate=config.server.renewals_per_second,
        )
        # The service publishes (and logs) every event, the relay's forwarded ones too.
        service = LicenceService(engine, store, clock, events)
        entitlements.install(service)
        guard.attach(service)
        if config.upstream is not None:
            link = UpstreamLink(config.upstream, clock, signer.site, surroundings.upstream_tls)
            router = Router(
                config.upstream,
                config.relayed,
                link=link,
                engine=engine,
                store=store,
                signer=signer,
                clock=clock,
                publish=service.publish,
                checkpoint=guard.checkpoint,
                renewals_missed=config.alerts.renewals_missed,
            )
            await router.load()  # a stored block's licence, before its sub-leases
        kept = await store.load_leases()
        engine.counters.restore(await store.load_counters())
        skipped = engine.restore(kept, clock.now())
        for lease in skipped:
            log.warning(
                "event=lease_without_licence licence=%s lease=%s",
                lease.licence_id,
                lease.handle,
            )
        log.info("event=restored leases=%d", len(kept) - len(skipped))
        service.denial_log = DenialLog(config.audit.denial_interval)
        s = config.server
        limits = CheckoutLimits(
            denied=PeerBuckets(s.denied_rate, s.denied_burst),
            granted=PeerBuckets(s.checkout_rate, s.checkout_burst),
        )
        server = Server(s, Dispatcher(service, signer, limits=limits), ssl=surroundings.tls)
        server.dispatcher.router = router
        daemon = cls(
            config,
            store,
            service,
            server,
            signer,
            lock,
            surroundings.admin_access,
            entitlements,
            guard,
        )
        daemon._stored_licences = stored_by_id
        return daemon

    # ------------------------------------------------------------------- reload

    def request_reload(self) -> None:
        """SIGHUP: reload the config file soon (on the event loop, in order)."""
        self._reloads.put_nowait(None)

    async def _run_reloads(self) -> None:
        while True:
            await self._reloads.get()
            self._notifier.reloading()
            status = "reloaded"
            try:
                await self.reload()
            except (ConfigError, LicdError):
                status = "reload failed; the old configuration stays (see the journal)"
            finally:
                self._notifier.ready(status)

    async def reload(self, *, admin_uid: int | None = None) -> dict[str, Any]:
        """Re-read the config file: licences it declares are created or updated, live.
        A bad file changes nothing and raises ConfigError saying why."""
        async with self.service.licence_edits:  # no admin edit in between
            return await self._reload(admin_uid)

    async def _reload(self, admin_uid: int | None) -> dict[str, Any]:
        source = self.config.source
        if source is None:
            raise ConfigError("running on the embedded defaults: there is no file to reload")
        log.info("event=reloading file=%s", source)
        try:
            new = load_config(source)
            self._check_reload(new)
        except ConfigError as exc:
            log.error("event=reload_failed error=%r", str(exc))
            await self.service.record(
                Event(
                    Kind.RELOAD_FAILED,
                    self.service.now().wall,
                    reason=str(exc),
                    admin_uid=admin_uid,
                )
            )
            raise
        self.engine.groups = dict(new.groups)  # before the licences whose rules name them
        changes = await self._apply_licences(new.licences, admin_uid=admin_uid)
        self.entitlements.vendor_keys = frozenset(new.vendor.keys)
        # Licences and alerts apply live; addresses and the like need a restart.
        old = self.config
        restart = [
            f"server.{f.name}"
            for f in dataclasses.fields(new.server)
            if getattr(new.server, f.name) != getattr(old.server, f.name)
        ]
        restart += [
            name
            for name in ("admin", "metrics", "audit")
            if getattr(new, name) != getattr(old, name)
        ]
        if restart:
            log.warning("event=reload_needs_restart settings=%s", ",".join(restart))
        self.config = dataclasses.replace(
            self.config,
            licences=new.licences,
            alerts=new.alerts,
            groups=new.groups,
            vendor=new.vendor,
            entitlement_files=new.entitlement_files,
        )
        self.alerts.reconfigure(new.alerts)
        entitled = await self._reload_entitlements(admin_uid)
        summary = {"licences": changes, "entitlements": entitled, "restart_needed": restart}
        await self.service.record(
            Event(Kind.RELOAD, self.service.now().wall, admin_uid=admin_uid, detail=summary)
        )
        return summary

    async def _reload_entitlements(self, admin_uid: int | None) -> dict[str, str]:
        """The config's entitlement files imported again: {file: outcome}. A refused
        file changes nothing of its own and is reported (and logged), the others apply."""
        out: dict[str, str] = {}
        for path in self.config.entitlement_files:
            try:
                done = await self.entitlements.import_files([path], admin_uid=admin_uid)
            except LicdError as exc:
                log.error("event=entitlement_not_imported file=%s error=%r", path, exc.message)
                out[str(path)] = f"error: {exc.message}"
                continue
            out[str(path)] = ", ".join(
                f"{x.licence_id}: {x.result}" for x in done.get(str(path), [])
            )
        return out

    def _check_reload(self, new: Config) -> None:
        """ConfigError when the new file cannot apply whole: a licence with the key of
        another licence of the daemon's, a group gone that a kept licence names, or an
        alert hook that cannot run (reload applies [alerts] live)."""
        try:
            _check_alert_hook(new)
        except StartupError as exc:
            raise ConfigError(str(exc)) from None
        clash = key_clash({x.key: x for x in self.engine.licences}, new.licences)
        if clash is not None:
            licence, holder = clash.licence.id, clash.holder.id
            raise ConfigError(
                f"licence {licence!r} has the key of licence {holder!r}: a licence "
                f"keeps its id; remove {holder!r} first (licd licence remove)"
            )
        try:
            _refuse_declared_entitled(new, self.entitlements.held)
        except StartupError as exc:
            raise ConfigError(str(exc)) from None
        declared = {x.id for x in new.licences}
        for kept in self.engine.licences:
            missing = (
                sorted(kept.groups_named() - set(new.groups)) if kept.id not in declared else []
            )
            if missing:
                raise ConfigError(
                    f"licence {kept.id!r} names group {missing[0]!r}, which the file no "
                    "longer declares in [groups]"
                )

    async def _apply_licences(
        self,
        licences: Iterable[Licence],
        *,
        admin_uid: int | None = None,
        stored: dict[str, Licence] | None = None,
    ) -> dict[str, str]:
        """Create or update each licence the config declares; {id: outcome}."""
        out: dict[str, str] = {}
        for licence in licences:
            try:
                out[licence.id] = await self.service.put_licence(
                    licence, admin_uid=admin_uid, source="config", stored=stored
                )
            except LicdError as exc:
                log.error("event=licence_not_applied licence=%s error=%r", licence.id, exc.message)
                out[licence.id] = f"error: {exc.message}"
        return out

    async def _flush_denials(self) -> None:
        """Write the counted entries of repeated denials as their intervals end."""
        while True:
            await asyncio.sleep(DENIAL_FLUSH_EVERY)
            self.service.flush_denials(self.service.now())

    async def retire_audit(self) -> int:
        """Export, then delete, audit entries older than `[audit] keep`; how many."""
        cutoff = self.service.now().wall - self.config.audit.keep
        return await retire(self.store, cutoff=cutoff, directory=self.config.audit_export_dir)

    async def _retire_audit(self) -> None:
        """Retention, every RETIRE_EVERY seconds. A failure (a full disk for the export,
        a database error) is logged and tried again next time; nothing is deleted that
        was not exported."""
        delay = 10.0  # not in the way of the start
        while True:
            await asyncio.sleep(delay)
            delay = RETIRE_EVERY
            try:
                if await self.retire_audit() >= RETIRE_CHUNK * RETIRE_MAX_CHUNKS:
                    delay = 1.0  # a backlog: go on soon, in bounded steps
            except (OSError, StoreError) as exc:
                log.error("event=audit_retention_failed error=%r", str(exc))

    async def run(
        self,
        stop: asyncio.Event,
        *,
        exit_now: asyncio.Event | None = None,
        on_ready: Callable[[Daemon], None] | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        """Serve until `stop` is set, then shut down in order. `exit_now` set during the
        shutdown (a second SIGTERM or SIGINT) cuts it short: see `_exit_now`."""
        if notifier is not None:
            self._notifier = notifier
        try:
            async with asyncio.TaskGroup() as tg:
                started = await self._start(tg)
                if on_ready is not None:
                    on_ready(self)
                await stop.wait()
                await self._shutdown(started, exit_now or asyncio.Event())
        except BaseExceptionGroup as group:
            # Unwrap: one clear error rather than a group of one.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        finally:
            # Whatever happened: nothing listens, the store is closed, the lock let go.
            await self.server.stop()
            await self.admin.stop()
            await self._stop_metrics()
            leadership = self.leadership
            if leadership is not None and not leadership.leading:
                # The leadership is lost: nothing can commit any more (fenced), and a
                # commit may hang (the database's synchronous standby is gone).
                await self.store.close(within=EXIT_NOW_GRACE)
            await self.store.close()  # a leader's clean close lets the leadership go
            if leadership is not None:
                leadership.stop()
            self._lock.close()
            log.info("event=stopped")

    # -------------------------------------------------------------------- start

    async def _start(self, tg: asyncio.TaskGroup) -> _Started:
        """Start the store's writer and the background tasks in `tg` (a crashed one
        stops the daemon), save the config's licences, listen, and say it is ready."""
        # Pings come from this loop, so a stuck loop stops them; they go on through
        # the drain at shutdown.
        watchdog = tg.create_task(self._notifier.run_watchdog(), name="watchdog")
        tg.create_task(self.store.run(), name="store-writer")
        background = [
            tg.create_task(
                self.service.run_reaper(self.config.server.reap_interval), name="reaper"
            ),
            tg.create_task(self._run_reloads(), name="reloads"),
            tg.create_task(self.alerts.run(), name="alerts"),
            tg.create_task(self._flush_denials(), name="denials"),
            tg.create_task(self._retire_audit(), name="audit-retention"),
            tg.create_task(self.clock_guard.run(), name="clock-guard"),
        ]
        if self.leadership is not None:  # its loss stops the daemon (LeadershipLost)
            background.append(tg.create_task(self.leadership.watch(), name="leadership"))
        await self.clock_guard.check()  # a clock set back while the daemon was down
        await self._save_config_licences()
        await self._import_config_entitlements()
        if self.router is not None:
            background.append(tg.create_task(self.router.run(), name="router"))
        addresses = await self._listen()
        self._announce_ready(addresses)
        return _Started(watchdog, background)

    async def _save_config_licences(self) -> None:
        """The file's licences, written to the database (the engine has them). One that
        cannot be saved stops the start: it would be served from memory only."""
        applied = await self._apply_licences(self.config.licences, stored=self._stored_licences)
        for licence_id, outcome in applied.items():
            if outcome.startswith("error"):
                raise StartupError(
                    f"cannot save licence {licence_id!r} from the config: "
                    f"{outcome.removeprefix('error: ')}"
                )
        self._stored_licences = None

    async def _import_config_entitlements(self) -> None:
        """The entitlement files the config names, imported (one that is refused stops
        the start: the admin named it to be served)."""
        try:
            async with self.service.licence_edits:
                await self.entitlements.import_files(self.config.entitlement_files)
        except EntitlementRefused as exc:
            raise StartupError(f"entitlement file {exc.message}") from None
        except LicdError as exc:
            raise StartupError(f"cannot save the entitlements: {exc.message}") from None

    async def _listen(self) -> list[tuple[str, int]]:
        """Open the admin socket, the client listeners and the metrics endpoint; the
        client addresses bound. StartupError naming what cannot listen."""
        try:
            await self.admin.start()
        except (OSError, ValueError) as exc:
            raise StartupError(f"admin socket {self.admin.path}: {exc}") from None
        try:
            addresses = await self.server.start()
            if self.config.metrics.listen is not None:
                listen = self.config.metrics.listen
                self._metrics_server = await serve_metrics(self.metrics.exposition, *listen)
                log.info(
                    "event=metrics_listening addr=%s",
                    format_address(self.metrics_address or listen),
                )
        except OSError as exc:
            raise StartupError(f"cannot listen: {exc.strerror or exc}") from None
        for host, port in addresses:
            log.info(
                "event=listening addr=%s loop=%s",
                format_address((host, port)),
                type(asyncio.get_running_loop()).__module__.partition(".")[0],
            )
        log.info("event=admin_listening path=%s", self.admin.path)
        return addresses

    def _announce_ready(self, addresses: list[tuple[str, int]]) -> None:
        """The `ready` line and systemd's READY=1. Served: the engine's own licences
        (database and config) and, on a router, every relayed one (forward-mode ones are
        never in the engine, block-mode ones only while a block is held), each once."""
        relayed = {r.id for r in self.config.relayed}
        own = [x for x in self.engine.licences if x.id not in relayed]
        served = len(own) + len(relayed)
        log.info(
            "%s",
            kv_line(
                event="ready",
                site=self.signer.site,
                key=self.signer.public.hex(),
                licences=served,
                relayed=len(relayed) if self.router is not None else None,
            ),
        )
        listening = ", ".join(format_address(a) for a in addresses)
        self._notifier.ready(f"serving {served} licence(s) on {listening}")

    # ----------------------------------------------------------------- shutdown

    async def _shutdown(self, started: _Started, exit_now: asyncio.Event) -> None:
        """Stop in order (`_stop_in_order`), unless `exit_now` is set before that is
        done: then what is left is cut short (`_exit_now`)."""
        log.info("event=stopping")
        self._notifier.stopping()
        in_order = asyncio.ensure_future(self._stop_in_order(started.background))
        cut_short = asyncio.ensure_future(exit_now.wait())
        try:
            await asyncio.wait({in_order, cut_short}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            cut_short.cancel()
            finished = in_order.done()
            if not finished:
                in_order.cancel()
                await asyncio.wait({in_order})
        if finished:
            in_order.result()  # its error, if any
        else:
            await self._exit_now(started.background)
        started.watchdog.cancel()

    async def _stop_in_order(self, background: list[asyncio.Task[Any]]) -> None:
        """Stop accepting; drain the requests in flight (up to `shutdown_timeout`) and
        close the connections; stop the background tasks; let running alert hooks end
        (up to `hook_timeout`); close the upstream link; write the pending denial counts;
        record the clock's mark; commit what is queued and close the store."""
        await self.server.stop()
        await self.admin.stop()
        await self._stop_metrics()
        for task in background:
            task.cancel()
        await self.alerts.hooks.drain(grace=self.config.alerts.hook_timeout)
        if self.router is not None:
            await self.router.close()
        await self.clock_guard.checkpoint()
        self.service.flush_denials(self.service.now(), every=True)
        await self.store.close()

    async def _exit_now(self, background: list[asyncio.Task[Any]]) -> None:
        """The rest of the shutdown, without waiting on clients, hooks or the disk.

        Every client connection is cut off: a request in flight gets no reply (it was
        not acknowledged, so nothing promised is lost; its client retries, or its lease
        lapses). Running alert hooks are killed, the background tasks cancelled. The
        upstream link and the store then get EXIT_NOW_GRACE seconds together to record
        the clock's mark and the denial counts, commit what is queued and close; a store
        still busy after that (a stalled disk, a write lock held elsewhere) is abandoned:
        its transaction in progress commits whole or not at all (SQLite)."""
        log.warning("event=exit_now grace=%g", EXIT_NOW_GRACE)
        deadline = asyncio.get_running_loop().time() + EXIT_NOW_GRACE
        for conn in self.server.connections:
            conn.abort()
        await self.server.stop()  # stops listening: nothing is left to drain
        await self.admin.stop()
        await self._stop_metrics()
        for task in background:
            task.cancel()
        await self.alerts.hooks.drain(grace=0)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                if self.router is not None:
                    await self.router.close()
                await self.clock_guard.checkpoint()
        self.service.flush_denials(self.service.now(), every=True)
        left = max(0.0, deadline - asyncio.get_running_loop().time())
        await self.store.close(within=left)


@dataclasses.dataclass(frozen=True)
class _Started:
    """What `Daemon._start` started that the shutdown stops."""

    watchdog: asyncio.Task[None]
    background: list[asyncio.Task[Any]]


@dataclasses.dataclass(frozen=True)
class Surroundings:
    """What the config names outside itself, resolved before anything is opened: the
    listener's certificate, the upstream's CA file, the admin socket's path and group.
    `check-config` resolves them too, so a file it passes does not fail at start."""

    tls: ssl.SSLContext | None
    upstream_tls: ssl.SSLContext | None
    admin_access: Access


def resolve_surroundings(config: Config) -> Surroundings:
    """Each missing file or group, or an alert hook that cannot run, is a StartupError
    naming it."""
    _check_alert_hook(config)
    _check_files(config)
    _check_driver(config)
    return Surroundings(_tls_context(config), _upstream_tls(config), _admin_access(config))


def _check_alert_hook(config: Config) -> None:
    """The [alerts] hook's command must be an executable regular file (if one is set)."""
    if not config.alerts.hook:
        return
    command = config.alerts.hook[0]
    try:
        mode = os.stat(command).st_mode
    except FileNotFoundError:
        raise StartupError(f"alerts.hook: {command} does not exist") from None
    except OSError as exc:
        raise StartupError(f"alerts.hook: cannot read {command}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise StartupError(f"alerts.hook: {command} is not a regular file")
    if not os.access(command, os.X_OK):
        raise StartupError(f"alerts.hook: {command} is not executable")


def _check_files(config: Config) -> None:
    """Each `[[entitlement]] file` and the `[store] dsn_file` must be a regular file the
    daemon can read (what they hold is checked when they are used)."""
    named = [(f"entitlement file {path}", path) for path in config.entitlement_files]
    if config.store.dsn_file is not None:
        named.append((f"store.dsn_file {config.store.dsn_file}", config.store.dsn_file))
    for what, path in named:
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:
            raise StartupError(f"{what}: {exc.strerror}") from None
        if not stat.S_ISREG(mode):
            raise StartupError(f"{what}: not a regular file")
        if not os.access(path, os.R_OK):
            raise StartupError(f"{what}: not readable")


def _check_driver(config: Config) -> None:
    """The PostgreSQL store needs asyncpg, an optional extra, and event_loop = "uvloop"
    needs uvloop."""
    if config.store.backend == "postgres" and importlib.util.find_spec("asyncpg") is None:
        raise StartupError(POSTGRES_EXTRA)
    event_loop_factory(config.server.event_loop)


def _tls_context(config: Config) -> ssl.SSLContext | None:
    cert, key = config.server.tls_cert, config.server.tls_key
    if cert is None or key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"cannot load the TLS certificate {cert} and key {key}: {exc}") from None
    return context


def _upstream_tls(config: Config) -> ssl.SSLContext | None:
    upstream = config.upstream
    if upstream is None or not upstream.tls:
        return None
    ca_file = upstream.ca_file
    try:
        return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(
            f"cannot load the upstream CA file {ca_file}: {getattr(exc, 'strerror', None) or exc}"
        ) from None


def _admin_access(config: Config) -> Access:
    try:
        check_socket_path(config.admin_socket)
    except ValueError as exc:
        raise StartupError(f"admin socket {config.admin_socket}: {exc}") from None
    try:
        return Access.from_config(config.admin)
    except ValueError as exc:
        raise StartupError(str(exc)) from None


def _declared_ids(config: Config) -> set[str]:
    """The ids of the licences `config` declares, its relayed ones too."""
    return {x.id for x in config.licences} | {x.id for x in config.relayed}


def _refuse_declared_entitled(config: Config, entitled: Iterable[str]) -> None:
    """StartupError when `config` declares a licence a vendor's entitlement serves."""
    taken = sorted(_declared_ids(config) & set(entitled))
    if taken:
        raise StartupError(
            f"licence {taken[0]!r} is entitled by a vendor: its terms come from the "
            "entitlement, so the config file may not declare it; remove its [[licence]] "
            "table (narrow it with `licd licence update` instead)"
        )


def _merge_licences(stored: Iterable[Licence], declared: Iterable[Licence]) -> list[Licence]:
    """The database's licences, with the config file's replacing those of the same id.
    A declared licence with the key of a stored licence the file does not declare is a
    StartupError: leaving the stored one out would drop its leases and grant their seats
    again, and keeping both would give one key two licences."""
    by_id = {licence.id: licence for licence in stored}
    declared = list(declared)
    clash = key_clash({x.key: x for x in by_id.values()}, declared)
    if clash is not None:
        licence, owner = clash.licence.id, clash.holder.id
        raise StartupError(
            f"licence {licence!r} in the config has the key of licence {owner!r} in "
            f"the database: a licence keeps its id. Give it the id {owner!r} again, or "
            f"remove {owner!r} first (licd licence remove) and then reload"
        )
    by_id.update((x.id, x) for x in declared)
    return list(by_id.values())


def setup_logging(level: str) -> None:
    """One structured line per event on stderr, which journald collects: whatever a
    module logs (a client's host, a traceback), each record stays one line with no
    escape sequences."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        OneLineFormatter("%(asctime)s level=%(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiosqlite's debug lines quote SQL parameters, lease secrets among them.
    logging.getLogger("aiosqlite").setLevel(logging.WARNING)
