"""Strict TOML configuration: read the daemon's config file into frozen dataclasses.

Its one responsibility is turning text into a validated `Config`, or a `ConfigError` whose
message names the file and the key path (`licence[0].seats`; licence indexes count from
0). It must not create directories, open sockets or touch the store: loading only reads.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import socket
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, fields
from datetime import date, datetime, time
from pathlib import Path
from typing import Any

from licd_client.messages import Features

from .engine import Licence

DEFAULT_PORT = 27500
DEFAULT_LISTEN = (("127.0.0.1", DEFAULT_PORT),)
LOG_LEVELS = ("debug", "info", "warning", "error")
#: Upper bound of every duration in the file (366 days): keeps deadlines finite and sane.
MAX_DURATION = 366 * 86400.0
MAX_KEY_LEN = 255
MAX_PRODUCT_LEN = 255
MAX_SITE_LEN = 64
#: Features travel in every checkout reply and, again, inside its token, so they are kept
#: well below the 16 KiB frame: a count (the wire's map limit) and a text budget.
MAX_FEATURES = 32
MAX_FEATURE_NAME_LEN = 64
MAX_FEATURES_TEXT = 2048  # UTF-8 bytes of names and string values together

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*([smhdw]?)\s*")
_LICENCE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_PORT = re.compile(r"[0-9]{1,5}")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_DATETIME_EXAMPLE = "2026-01-01T00:00:00Z"
_EXAMPLES = '90, "90s", "15m", "2h", "2d", "1w"'


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file and the key path."""


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
    max_frame: int = 16384  # frame limit after hello
    max_pipeline: int = 8
    shutdown_timeout: float = 10.0  # drain time for in-flight requests on stop
    reap_interval: float = 1.0  # how often lapsed leases are reclaimed
    log_level: str = "info"


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


@dataclass(frozen=True)
class Config:
    """A whole configuration: the server settings and the licences it serves."""

    server: ServerConfig
    licences: tuple[Licence, ...]
    source: Path | None  # the file it came from; None for the embedded defaults
    admin: AdminConfig = AdminConfig()
    metrics: MetricsConfig = MetricsConfig()
    alerts: AlertsConfig = AlertsConfig()

    @property
    def admin_socket(self) -> Path:
        return self.admin.socket or self.server.state_dir / "admin.sock"


# --- public helpers -------------------------------------------------------------------


def parse_duration(value: object, *, what: str = "duration", allow_zero: bool = False) -> float:
    """Seconds from an int/float, or from a string "90", "90s", "15m", "2h", "2d", "1w".

    The result is finite and > 0 (>= 0 with `allow_zero`); anything else raises
    ValueError with a message that starts with `what`. Callers check their own ranges.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{what}: must be a number of seconds or a string like {_EXAMPLES}")
    if isinstance(value, str):
        match = _DURATION.fullmatch(value)
        if match is None:
            shown = value if len(value) <= 40 else value[:40] + "..."
            raise ValueError(
                f"{what}: invalid duration {shown!r}: use seconds or a number with a unit"
                f" (s, m, h, d, w), e.g. {_EXAMPLES}"
            )
        seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    else:
        seconds = float(value)
    if not math.isfinite(seconds):
        raise ValueError(f"{what}: must be a finite duration")
    if seconds < 0 or (seconds == 0 and not allow_zero):
        bound = "must not be negative" if allow_zero else "must be greater than 0"
        raise ValueError(f"{what}: {bound}")
    return seconds


def parse_address(text: str) -> tuple[str, int]:
    """(host, port) from "host:port" or "[v6]:port"; port 0..65535. Raises ValueError.

    IP addresses come back in their canonical form ("::1"), host names in lower case.
    """
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ValueError(f'invalid address {text!r}: expected "[ipv6]:port"')
        host, port_text = text[1:end], text[end + 2 :]
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise ValueError(f"invalid address {text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f'invalid address {text!r}: expected "host:port"')
        if ":" in host:
            raise ValueError(
                f'invalid address {text!r}: put an IPv6 address in brackets, e.g. "[::1]:27500"'
            )
        if not host:
            raise ValueError(
                f"invalid address {text!r}: the host is missing"
                ' (use "0.0.0.0" for every IPv4 interface, "[::]" for every IPv6 one)'
            )
        host = _host(text, host)
    if not _PORT.fullmatch(port_text) or int(port_text) > 65535:
        raise ValueError(f"invalid address {text!r}: the port must be a number 0..65535")
    return host, int(port_text)


def _host(text: str, host: str) -> str:
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if (
        len(host) > 253
        or not all(_HOST_LABEL.fullmatch(label) for label in labels)
        or labels[-1].isdigit()  # a numeric last label is a mistyped IPv4 address
    ):
        raise ValueError(f"invalid address {text!r}: {host!r} is not an IPv4 address or host name")
    return host.lower()


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
    top = _Table(doc, "", str(source), ("server", "licence", "admin", "metrics", "alerts"))
    server = _server(top.table("server", _SERVER_KEYS))
    licences = _licences(top)
    return Config(
        server=server,
        licences=licences,
        source=source,
        admin=_admin(top.table("admin", _ADMIN_KEYS)),
        metrics=_metrics(top.table("metrics", _METRICS_KEYS)),
        alerts=_alerts(top.table("alerts", _ALERTS_KEYS)),
    )


def licence_from_mapping(data: dict[str, Any], where: str) -> Licence:
    """One licence from a mapping of config-file keys (the admin interface's `licence
    add`/`update`), validated exactly as a [[licence]] table; errors name `where`."""
    return _licence(_Table(data, "licence", where, _LICENCE_KEYS))


# --- the reader -----------------------------------------------------------------------

_MISSING: Any = object()


def _join(prefix: str, name: str) -> str:
    part = name if _BARE_KEY.fullmatch(name) else '"' + name.replace('"', '\\"') + '"'
    return f"{prefix}.{part}" if prefix else part


class _Table:
    """One TOML table at a key path; rejects unknown keys as soon as it is made."""

    def __init__(self, data: dict[str, Any], path: str, source: str, known: Iterable[str]):
        self.data = data
        self.path = path
        self.source = source
        known = tuple(known)
        for name in data:
            if name not in known:
                hint = difflib.get_close_matches(name, known, n=1)
                extra = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise self.error(name, f"unknown key{extra}")

    def key(self, name: str, index: int | None = None) -> str:
        path = _join(self.path, name)
        return path if index is None else f"{path}[{index}]"

    def error(self, name: str, problem: str, index: int | None = None) -> ConfigError:
        return ConfigError(f"{self.source}: {self.key(name, index)}: {problem}")

    def get(self, name: str, default: Any = _MISSING) -> Any:
        if name in self.data:
            return self.data[name]
        if default is _MISSING:
            raise self.error(name, "required key is missing")
        return default

    def table(self, name: str, known: Iterable[str]) -> _Table:
        value = self.get(name, {})
        if not isinstance(value, dict):
            raise self.error(name, f"must be a table ([{self.key(name)}])")
        return _Table(value, self.key(name), self.source, known)

    def integer(self, name: str, default: Any, lo: int, hi: int | None = None) -> int:
        value = self.get(name, default)
        bad = isinstance(value, bool) or not isinstance(value, int)
        if bad or value < lo or (hi is not None and value > hi):
            span = f">= {lo}" if hi is None else f"between {lo} and {hi}"
            raise self.error(name, f"must be an integer {span}")
        return int(value)

    def integers(self, name: str, default: Any, lo: int, hi: int) -> list[int]:
        value = self.get(name, default)
        if not isinstance(value, list | tuple) or any(
            isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi for v in value
        ):
            raise self.error(name, f"must be an array of integers between {lo} and {hi}")
        return [int(v) for v in value]

    def text(self, name: str, default: Any, max_len: int) -> str:
        value = self.get(name, default)
        if not isinstance(value, str) or not value or len(value) > max_len:
            raise self.error(name, f"must be a non-empty string of at most {max_len} characters")
        if not value.isprintable():
            raise self.error(name, "must not contain control characters")
        return value

    def duration(
        self, name: str, default: Any, *, minimum: float = 0.0, allow_zero: bool = False
    ) -> float:
        """A duration > 0 (>= 0 with `allow_zero`), >= `minimum`, <= MAX_DURATION."""
        value = self.get(name, default)
        try:
            seconds = parse_duration(value, what=self.key(name), allow_zero=allow_zero)
        except ValueError as exc:
            raise ConfigError(f"{self.source}: {exc}") from None
        if seconds < minimum:
            raise self.error(name, f"must be at least {minimum:g} s")
        if seconds > MAX_DURATION:
            raise self.error(name, "must be at most 366 days")
        return seconds

    def timestamp(self, name: str) -> float | None:
        value = self.get(name, None)
        if value is None:
            return None
        if isinstance(value, datetime):
            if value.tzinfo is None:
                raise self.error(
                    name,
                    "a local date-time has no time zone: add an offset like Z,"
                    f" e.g. {_DATETIME_EXAMPLE}",
                )
            return value.timestamp()
        if isinstance(value, date):
            raise self.error(
                name,
                f"a bare date is ambiguous: write a date-time with an offset like Z, e.g. "
                f"{_DATETIME_EXAMPLE}",
            )
        kind = "a time of day" if isinstance(value, time) else "not a date-time"
        raise self.error(
            name, f"{kind}: write an unquoted date-time with an offset, e.g. {_DATETIME_EXAMPLE}"
        )


# --- [server] -------------------------------------------------------------------------

_SERVER_KEYS = tuple(f.name for f in fields(ServerConfig))
_D = ServerConfig(listen=DEFAULT_LISTEN, state_dir=Path("/"), site="licd")  # field defaults


def _server(t: _Table) -> ServerConfig:
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
        shutdown_timeout=t.duration("shutdown_timeout", _D.shutdown_timeout),
        reap_interval=t.duration("reap_interval", _D.reap_interval),
        log_level=log_level,
    )


def _listen(t: _Table) -> tuple[tuple[str, int], ...]:
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


# --- [[licence]] ----------------------------------------------------------------------

_LICENCE_KEYS = tuple(f.name for f in fields(Licence))


def _licences(top: _Table) -> tuple[Licence, ...]:
    value = top.get("licence", [])
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise top.error("licence", "must be an array of tables: write each one as [[licence]]")
    licences: list[Licence] = []
    by_id: dict[str, int] = {}
    by_key: dict[str, int] = {}
    for i, item in enumerate(value):
        t = _Table(item, f"licence[{i}]", top.source, _LICENCE_KEYS)
        licence = _licence(t)
        if licence.id in by_id:
            raise t.error("id", f"duplicate: licence[{by_id[licence.id]}] has the same id")
        if licence.key in by_key:  # the key is a secret: never echo it
            raise t.error("key", f"duplicate: licence[{by_key[licence.key]}] has the same key")
        by_id[licence.id] = by_key[licence.key] = i
        licences.append(licence)
    return tuple(licences)


def _licence(t: _Table) -> Licence:
    key = t.text("key", _MISSING, MAX_KEY_LEN)
    if key != key.strip():
        raise t.error("key", "must not start or end with white space")
    licence_id = t.get("id")
    if not isinstance(licence_id, str) or not _LICENCE_ID.fullmatch(licence_id):
        raise t.error("id", "must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' or '-'")
    not_before = t.timestamp("not_before")
    expires = t.timestamp("expires")
    if not_before is not None and expires is not None and expires <= not_before:
        raise t.error("expires", "must be after not_before")
    return Licence(
        key=key,
        id=licence_id,
        product=t.text("product", _MISSING, MAX_PRODUCT_LEN),
        seats=t.integer("seats", _MISSING, 1),
        lease_ttl=t.duration("lease_ttl", 90.0, minimum=1.0),
        grace=t.duration("grace", 15.0, allow_zero=True),
        not_before=not_before,
        expires=expires,
        features=_features(t),
    )


def _features(t: _Table) -> Features:
    value = t.get("features", {})
    if not isinstance(value, dict):
        raise t.error("features", "must be a table of name = value")
    if len(value) > MAX_FEATURES:
        raise t.error("features", f"at most {MAX_FEATURES} features")
    f = _Table(value, t.key("features"), t.source, value)
    text_bytes = 0
    for name, item in value.items():
        if not name or len(name) > MAX_FEATURE_NAME_LEN or not name.isprintable():
            raise f.error(name, f"feature names must be 1 to {MAX_FEATURE_NAME_LEN} characters")
        text_bytes += len(name.encode())
        if isinstance(item, str):
            text_bytes += len(item.encode())
        elif isinstance(item, float) and not math.isfinite(item):
            raise f.error(name, "must be a finite number")
        elif not isinstance(item, bool | int | float):
            raise f.error(name, "must be a string, integer, boolean or float")
    if text_bytes > MAX_FEATURES_TEXT:
        raise t.error(
            "features",
            f"too large: {text_bytes} bytes of names and strings, at most {MAX_FEATURES_TEXT}",
        )
    return dict(value)


# --- [admin], [metrics], [alerts] -----------------------------------------------------

_ADMIN_KEYS = tuple(f.name for f in fields(AdminConfig))
_METRICS_KEYS = tuple(f.name for f in fields(MetricsConfig))
_ALERTS_KEYS = tuple(f.name for f in fields(AlertsConfig))
_A = AlertsConfig()


def _admin(t: _Table) -> AdminConfig:
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


def _metrics(t: _Table) -> MetricsConfig:
    value = t.get("listen", None)
    if value is None:
        return MetricsConfig()
    if not isinstance(value, str):
        raise t.error("listen", 'must be a "host:port" string')
    try:
        return MetricsConfig(listen=parse_address(value))
    except ValueError as exc:
        raise t.error("listen", str(exc)) from None


def _alerts(t: _Table) -> AlertsConfig:
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
    )
