"""Strict TOML configuration: read the daemon's config file into frozen dataclasses.

Its one responsibility is turning text into a validated `Config`, or a `ConfigError` whose
message names the file and the key path (`licence[0].seats`; licence indexes count from
0). It must not create directories, open sockets or touch the store: loading only reads.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from licd.config.licences import RelayedLicence as RelayedLicence
from licd.config.licences import licence_from_mapping as licence_from_mapping
from licd.config.licences import licence_to_mapping as licence_to_mapping
from licd.config.licences import parse_groups, parse_licences
from licd.config.tomlreader import (
    ConfigError,
    Table,
    parse_address,
    parse_duration,
)
from licd.engine import Licence
from licd.engine.engine import RENEW_MIN_RATE
from licd_client.tokens import key_from_text
from licd_client.wire import MAX_FRAME_AFTER_HELLO

__all__ = ["ConfigError", "parse_address", "parse_duration"]

DEFAULT_PORT = 27500
DEFAULT_LISTEN = (("127.0.0.1", DEFAULT_PORT),)
LOG_LEVELS = ("debug", "info", "warning", "error")
MAX_SITE_LEN = 64
MAX_RATE = 1_000_000.0  # checkouts a second per peer: the rate limits' upper bound
MAX_BURST = 10_000_000
MAX_KEEP = 100 * 366 * 86400.0  # [audit] keep: at most a century
MAX_DENIAL_INTERVAL = 3600.0


EVENT_LOOPS = ("auto", "asyncio", "uvloop")


@dataclass(frozen=True)
class ServerConfig:
    """The [server] table. Durations are float seconds."""

    listen: tuple[tuple[str, int], ...]  # (host, port); IPv6 hosts without brackets
    state_dir: Path
    site: str
    max_connections: int = 4096
    max_connections_per_peer: int = 256
    idle_timeout: float = 120.0
    hello_timeout: float = 2.0
    frame_timeout: float = 5.0
    write_timeout: float = 10.0  # a client that never reads is dropped after this
    max_frame: int = MAX_FRAME_AFTER_HELLO  # frame limit after hello
    max_pipeline: int = 8
    # Checkouts per peer address (token buckets; docs/admin.md, "Limits"): refused ones
    # and granted ones, each `*_rate` a second with bursts of `*_burst`. A site of 10,000
    # clients behind one NAT address, restarting at once and waiting for seats, stays
    # under them.
    denied_rate: float = 2000.0
    denied_burst: int = 100_000
    checkout_rate: float = 1000.0
    checkout_burst: int = 20_000
    # One lease's renewals: 10 back to back, then at least this many a second (more for
    # a short lease: twice what its renew_in asks). A heartbeat loop gets rate_limited.
    renewals_per_second: float = RENEW_MIN_RATE
    shutdown_timeout: float = 10.0  # drain time for in-flight requests on stop
    reap_interval: float = 1.0  # how often lapsed leases are reclaimed
    # How far the wall clock may be behind the latest time the daemon has seen before it
    # counts as set back, and vendor licences hold new grants (licd/core/clock_guard.py).
    clock_skew: float = 600.0
    log_level: str = "info"
    # The event loop: "auto" (uvloop when installed: `pip install 'licd[fast]'`, else
    # asyncio's own), "asyncio" or "uvloop".
    event_loop: str = "auto"
    tls_cert: Path | None = None  # PEM certificate (chain): serve TLS on every listen address
    tls_key: Path | None = None  # its PEM private key


@dataclass(frozen=True)
class AdminConfig:
    """The [admin] table: the Unix socket admins (and `licd` commands) talk to."""

    socket: Path | None = None  # None: <state_dir>/admin.sock
    group: str | None = None  # the socket's group (mode 0660); members may administer
    allow_uids: tuple[int, ...] = ()  # further uids allowed, besides root and the daemon's


@dataclass(frozen=True)
class MetricsConfig:
    """The [metrics] table: an optional OpenMetrics endpoint on its own address."""

    listen: tuple[str, int] | None = None  # None: no endpoint


@dataclass(frozen=True)
class AlertsConfig:
    """The [alerts] table: when to raise an alert and what to run for it."""

    expiry_days: tuple[int, ...] = (15, 10)  # licence expiring within these many days
    usage_percent: tuple[int, ...] = (75, 90, 100)  # seats in use crossing these levels
    denials: int = 5  # this many denials of one licence ...
    denial_window: float = 600.0  # ... within this many seconds
    hook: tuple[str, ...] = ()  # a command run with each alert as JSON on stdin
    hook_timeout: float = 10.0
    check_interval: float = 60.0  # how often expiry and usage are evaluated
    # A site router: a block not renewed for this many times its renew_every.
    renewals_missed: int = 3
    # A vendor: a site router's block lease not renewed for this long (0: never).
    site_silent: float = 3 * 86400.0


@dataclass(frozen=True)
class AuditConfig:
    """The [audit] table: how long audit entries are kept, and where old ones go."""

    keep: float = 400 * 86400.0  # entries older than this are exported, then deleted
    export_dir: Path | None = None  # None: <state_dir>/audit-export
    denial_interval: float = 60.0  # repeated denials of one group: one entry per interval


@dataclass(frozen=True)
class UpstreamConfig:
    """The [upstream] table: the licd this one relays to (a site router's vendor)."""

    servers: tuple[str, ...]  # "host:port", tried in order
    trust: tuple[bytes, ...]  # keys upstream tokens must chain to
    tls: bool = False
    ca_file: Path | None = None


@dataclass(frozen=True)
class VendorConfig:
    """The [vendor] table: the public keys whose entitlements this site accepts
    (docs/entitlements.md)."""

    keys: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class StoreConfig:
    """The [store] table: where seats persist. SQLite in the state directory (the
    default, a single node), or a PostgreSQL database a cluster of nodes shares, one
    leading at a time (docs/ha.md)."""

    backend: str = "sqlite"  # "sqlite" | "postgres"
    dsn: str | None = None  # postgres: the connection string (no password: use dsn_file)
    dsn_file: Path | None = None  # postgres: a file holding it (it may have a password)
    node: str = ""  # this node's name in the cluster; "": this machine's host name
    advertise: str | None = None  # "host:port" clients reach this node at; None: listen[0]
    leader_ttl: float = 6.0  # a leader not renewed for this long (+ lock_delay) is replaced
    lock_delay: float = 2.0  # how much longer a standby waits before taking over


@dataclass(frozen=True)
class Config:
    """A whole configuration: the server settings and the licences it serves."""

    server: ServerConfig
    licences: tuple[Licence, ...]
    source: Path | None  # the file it came from; None for the embedded defaults
    admin: AdminConfig = AdminConfig()
    metrics: MetricsConfig = MetricsConfig()
    alerts: AlertsConfig = AlertsConfig()
    audit: AuditConfig = AuditConfig()
    upstream: UpstreamConfig | None = None
    relayed: tuple[RelayedLicence, ...] = ()
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # [groups]
    vendor: VendorConfig = VendorConfig()
    entitlement_files: tuple[Path, ...] = ()  # [[entitlement]] file = ...
    store: StoreConfig = StoreConfig()

    @property
    def admin_socket(self) -> Path:
        return self.admin.socket or self.server.state_dir / "admin.sock"

    @property
    def audit_export_dir(self) -> Path:
        return self.audit.export_dir or self.server.state_dir / "audit-export"


# --- public helpers -------------------------------------------------------------------


def default_state_dir() -> Path:
    """$XDG_STATE_HOME/licd when that is set to an absolute path, else ~/.local/state/licd."""
    xdg = os.environ.get("XDG_STATE_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "licd"
    return Path.home() / ".local" / "state" / "licd"


def default_site() -> str:
    """This machine's host name (at most 64 characters), or "licd" when it has none."""
    name = socket.gethostname().strip()[:MAX_SITE_LEN]
    return name if name and name.isprintable() else "licd"


def default_config() -> Config:
    """The embedded defaults: loopback on port 27500 and one demo licence."""
    demo = Licence(
        key="DEMO-0000-0000",
        id="demo",
        product="demo",
        seats=3,
        lease_ttl=90.0,
        grace=15.0,
        features={"tier": "demo"},
    )
    server = ServerConfig(listen=DEFAULT_LISTEN, state_dir=default_state_dir(), site=default_site())
    return Config(server=server, licences=(demo,), source=None)


def load_config(path: Path) -> Config:
    """Read and validate the file at `path`; raises ConfigError naming it."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    return parse_config(text, path)


def parse_config(text: str, source: Path) -> Config:
    """Validate TOML `text`; errors name `source` as the file."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    top = Table(
        doc,
        "",
        str(source),
        (
            "server",
            "licence",
            "admin",
            "metrics",
            "alerts",
            "audit",
            "upstream",
            "groups",
            "vendor",
            "entitlement",
            "store",
        ),
    )
    server = _server(top.table("server", _SERVER_KEYS))
    groups = parse_groups(top)
    licences, relayed = parse_licences(top, groups)
    upstream = _upstream(top) if "upstream" in doc else None
    if relayed and upstream is None:
        raise top.error("upstream", f"licence {relayed[0].id!r} has a mode: it needs [upstream]")
    return Config(
        server=server,
        licences=licences,
        source=source,
        admin=_admin(top.table("admin", _ADMIN_KEYS)),
        metrics=_metrics(top.table("metrics", _METRICS_KEYS)),
        alerts=_alerts(top.table("alerts", _ALERTS_KEYS)),
        audit=_audit(top.table("audit", _AUDIT_KEYS)),
        upstream=upstream,
        relayed=relayed,
        groups=groups,
        vendor=_vendor(top.table("vendor", ("keys",))),
        entitlement_files=_entitlement_files(top),
        store=_store(top.table("store", _STORE_KEYS), server.listen),
    )


# --- [server] -------------------------------------------------------------------------

_SERVER_KEYS = tuple(f.name for f in fields(ServerConfig))
_D = ServerConfig(listen=DEFAULT_LISTEN, state_dir=Path("/"), site="licd")  # field defaults


def _server(t: Table) -> ServerConfig:
    listen = _listen(t)
    state_dir = t.get("state_dir", None)
    if state_dir is None:
        state_path = default_state_dir()
    elif not isinstance(state_dir, str) or not state_dir or "\0" in state_dir:
        raise t.error("state_dir", "must be a non-empty path string")
    else:
        try:
            state_path = Path(state_dir).expanduser()
        except RuntimeError:  # "~user/..." for a user who does not exist
            raise t.error("state_dir", "names a home directory that does not exist") from None
        if not state_path.is_absolute():
            raise t.error("state_dir", "must be an absolute path (or start with ~/)")
    max_connections = t.integer("max_connections", _D.max_connections, 1)
    per_peer = t.integer("max_connections_per_peer", _D.max_connections_per_peer, 1)
    if per_peer > max_connections:
        raise t.error("max_connections_per_peer", "must not exceed max_connections")
    log_level = t.get("log_level", _D.log_level)
    if log_level not in LOG_LEVELS:
        raise t.error("log_level", f"must be one of {', '.join(LOG_LEVELS)}")
    event_loop = t.get("event_loop", _D.event_loop)
    if event_loop not in EVENT_LOOPS:
        raise t.error("event_loop", f"must be one of {', '.join(EVENT_LOOPS)}")
    return ServerConfig(
        listen=listen,
        state_dir=state_path,
        site=t.text("site", default_site(), MAX_SITE_LEN),
        max_connections=max_connections,
        max_connections_per_peer=per_peer,
        idle_timeout=t.duration("idle_timeout", _D.idle_timeout),
        hello_timeout=t.duration("hello_timeout", _D.hello_timeout),
        frame_timeout=t.duration("frame_timeout", _D.frame_timeout),
        write_timeout=t.duration("write_timeout", _D.write_timeout),
        max_frame=t.integer("max_frame", _D.max_frame, 1024, 1024 * 1024),
        max_pipeline=t.integer("max_pipeline", _D.max_pipeline, 1, 64),
        denied_rate=t.number("denied_rate", _D.denied_rate, 0.01, MAX_RATE),
        denied_burst=t.integer("denied_burst", _D.denied_burst, 1, MAX_BURST),
        checkout_rate=t.number("checkout_rate", _D.checkout_rate, 0.01, MAX_RATE),
        checkout_burst=t.integer("checkout_burst", _D.checkout_burst, 1, MAX_BURST),
        renewals_per_second=t.number("renewals_per_second", _D.renewals_per_second, 0.01, MAX_RATE),
        shutdown_timeout=t.duration("shutdown_timeout", _D.shutdown_timeout),
        reap_interval=t.duration("reap_interval", _D.reap_interval),
        clock_skew=t.duration("clock_skew", _D.clock_skew),
        log_level=log_level,
        event_loop=event_loop,
        **_tls(t),
    )


def _tls(t: Table) -> dict[str, Path | None]:
    out: dict[str, Path | None] = {}
    for name in ("tls_cert", "tls_key"):
        value = t.get(name, None)
        if value is not None and (not isinstance(value, str) or not value.startswith("/")):
            raise t.error(name, "must be an absolute path to a PEM file")
        out[name] = Path(value) if value else None
    if (out["tls_cert"] is None) != (out["tls_key"] is None):
        raise t.error(
            "tls_key" if out["tls_cert"] else "tls_cert", "give both tls_cert and tls_key"
        )
    return out


def _listen(t: Table) -> tuple[tuple[str, int], ...]:
    value = t.get("listen", None)
    if value is None:
        return DEFAULT_LISTEN
    if not isinstance(value, list) or not value:
        raise t.error("listen", 'must be a non-empty array of "host:port" strings')
    seen: dict[tuple[str, int], int] = {}
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise t.error("listen", 'must be a "host:port" string', i)
        try:
            address = parse_address(item)
        except ValueError as exc:
            raise t.error("listen", str(exc), i) from None
        if address in seen:
            raise t.error("listen", f"duplicate of listen[{seen[address]}] ({item})", i)
        seen[address] = i
    return tuple(seen)


def _upstream(top: Table) -> UpstreamConfig:
    t = top.table("upstream", tuple(f.name for f in fields(UpstreamConfig)))
    servers = t.get("servers")
    if not isinstance(servers, list) or not servers:
        raise t.error("servers", 'must be a non-empty array of "host:port" strings')
    for i, item in enumerate(servers):
        try:
            parse_address(item if isinstance(item, str) else "")
        except ValueError as exc:
            raise t.error("servers", str(exc), i) from None
    trust = t.get("trust")
    if not isinstance(trust, list) or not trust:
        raise t.error("trust", "must be a non-empty array of public keys (64 hex digits)")
    keys = []
    for i, item in enumerate(trust):
        try:
            keys.append(key_from_text(item if isinstance(item, str) else ""))
        except ValueError as exc:
            raise t.error("trust", str(exc), i) from None
    tls = t.get("tls", False)
    if not isinstance(tls, bool):
        raise t.error("tls", "must be true or false")
    ca_file = t.get("ca_file", None)
    if ca_file is not None and (not isinstance(ca_file, str) or not ca_file.startswith("/")):
        raise t.error("ca_file", "must be an absolute path")
    return UpstreamConfig(
        servers=tuple(servers),
        trust=tuple(keys),
        tls=tls,
        ca_file=Path(ca_file) if ca_file else None,
    )


# --- [vendor] and [[entitlement]] ----------------------------------------------------


def _vendor(t: Table) -> VendorConfig:
    value = t.get("keys", [])
    if not isinstance(value, list):
        raise t.error("keys", "must be an array of public keys (64 hex digits)")
    keys: list[bytes] = []
    for i, item in enumerate(value):
        try:
            key = key_from_text(item if isinstance(item, str) else "")
        except ValueError as exc:
            raise t.error("keys", str(exc), i) from None
        if key in keys:
            raise t.error("keys", f"duplicate of keys[{keys.index(key)}]", i)
        keys.append(key)
    return VendorConfig(tuple(keys))


_STORE_KEYS = tuple(f.name for f in fields(StoreConfig))
_ST = StoreConfig()


def _store(t: Table, listen: tuple[tuple[str, int], ...]) -> StoreConfig:
    backend = t.get("backend", _ST.backend)
    if backend not in ("sqlite", "postgres"):
        raise t.error("backend", 'must be "sqlite" or "postgres"')
    if backend == "sqlite":
        extra = [name for name in _STORE_KEYS if name != "backend" and name in t.data]
        if extra:
            raise t.error(extra[0], 'applies to backend = "postgres" only')
        return StoreConfig()
    dsn, dsn_file = t.get("dsn", None), t.get("dsn_file", None)
    if (dsn is None) == (dsn_file is None):
        raise t.error("dsn", 'backend = "postgres" needs one of dsn and dsn_file')
    if dsn is not None:
        dsn = t.text("dsn", None, 1024)
        if re.search(r"://[^/@]*:[^/@]*@|\bpassword\s*=", dsn):
            raise t.error("dsn", "holds a password: put the address in a dsn_file instead")
    if dsn_file is not None and (
        not isinstance(dsn_file, str) or not dsn_file.startswith("/") or "\0" in dsn_file
    ):
        raise t.error("dsn_file", "must be an absolute path")
    advertise = t.get("advertise", None)
    if advertise is not None:
        if not isinstance(advertise, str):
            raise t.error("advertise", 'must be a "host:port" string')
        try:
            parse_address(advertise)
        except ValueError as exc:
            raise t.error("advertise", str(exc)) from None
    if advertise is None and listen[0][0] in ("0.0.0.0", "::"):
        raise t.error(
            "advertise",
            f"required: the first [server] listen address {listen[0][0]} is no address "
            'clients can be sent to; give this node\'s "host:port"',
        )
    ttl = t.duration("leader_ttl", _ST.leader_ttl, minimum=1.0, maximum=600.0)
    return StoreConfig(
        backend=backend,
        dsn=dsn,
        dsn_file=Path(dsn_file) if dsn_file else None,
        node=t.text("node", "-", MAX_SITE_LEN) if "node" in t.data else "",
        advertise=advertise,
        leader_ttl=ttl,
        lock_delay=t.duration("lock_delay", _ST.lock_delay, allow_zero=True, maximum=600.0),
    )


def _entitlement_files(top: Table) -> tuple[Path, ...]:
    value = top.get("entitlement", [])
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise top.error(
            "entitlement", "must be an array of tables: write each one as [[entitlement]]"
        )
    files: list[Path] = []
    for i, item in enumerate(value):
        t = Table(item, f"entitlement[{i}]", top.source, ("file",))
        name = t.get("file")
        if not isinstance(name, str) or not name.startswith("/") or "\0" in name:
            raise t.error("file", "must be an absolute path")
        path = Path(name)
        if path in files:
            raise t.error("file", f"duplicate: entitlement[{files.index(path)}] names it")
        files.append(path)
    if files and "vendor" not in top.data:
        raise top.error("entitlement", "entitlement files need the vendor's key: add [vendor] keys")
    return tuple(files)


# --- [audit] --------------------------------------------------------------------------

_AUDIT_KEYS = tuple(f.name for f in fields(AuditConfig))
_AU = AuditConfig()


def _audit(t: Table) -> AuditConfig:
    export_dir = t.get("export_dir", None)
    if export_dir is not None and (
        not isinstance(export_dir, str) or not export_dir.startswith("/") or "\0" in export_dir
    ):
        raise t.error("export_dir", "must be an absolute path")
    return AuditConfig(
        keep=t.duration("keep", _AU.keep, minimum=86400.0, maximum=MAX_KEEP),
        export_dir=Path(export_dir) if export_dir else None,
        denial_interval=t.duration(
            "denial_interval", _AU.denial_interval, minimum=1.0, maximum=MAX_DENIAL_INTERVAL
        ),
    )


# --- [admin], [metrics], [alerts] -----------------------------------------------------

_ADMIN_KEYS = tuple(f.name for f in fields(AdminConfig))
_METRICS_KEYS = tuple(f.name for f in fields(MetricsConfig))
_ALERTS_KEYS = tuple(f.name for f in fields(AlertsConfig))
_A = AlertsConfig()


def _admin(t: Table) -> AdminConfig:
    socket_path: Path | None = None
    value = t.get("socket", None)
    if value is not None:
        if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
            raise t.error("socket", "must be an absolute path")
        socket_path = Path(value)
    group = t.get("group", None)
    if group is not None and (not isinstance(group, str) or not group.strip()):
        raise t.error("group", "must be a group name")
    return AdminConfig(
        socket=socket_path,
        group=group,
        allow_uids=tuple(t.integers("allow_uids", (), 0, 2**32 - 2)),
    )


def _metrics(t: Table) -> MetricsConfig:
    value = t.get("listen", None)
    if value is None:
        return MetricsConfig()
    if not isinstance(value, str):
        raise t.error("listen", 'must be a "host:port" string')
    try:
        return MetricsConfig(listen=parse_address(value))
    except ValueError as exc:
        raise t.error("listen", str(exc)) from None


def _alerts(t: Table) -> AlertsConfig:
    hook = t.get("hook", [])
    if not isinstance(hook, list) or not all(isinstance(h, str) and h for h in hook):
        raise t.error("hook", 'must be a command as an array of strings, e.g. ["/bin/cmd"]')
    if hook and not hook[0].startswith("/"):
        raise t.error("hook", "the command must be an absolute path")
    return AlertsConfig(
        expiry_days=tuple(t.integers("expiry_days", _A.expiry_days, 1, 3660)),
        usage_percent=tuple(t.integers("usage_percent", _A.usage_percent, 1, 1000)),
        denials=t.integer("denials", _A.denials, 1),
        denial_window=t.duration("denial_window", _A.denial_window),
        hook=tuple(hook),
        hook_timeout=t.duration("hook_timeout", _A.hook_timeout),
        check_interval=t.duration("check_interval", _A.check_interval, minimum=1.0),
        renewals_missed=t.integer("renewals_missed", _A.renewals_missed, 1, 1000),
        site_silent=t.duration("site_silent", _A.site_silent, allow_zero=True),
    )
