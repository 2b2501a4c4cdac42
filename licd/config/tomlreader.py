"""The strict TOML reader under the config: tables that refuse unknown keys, and typed
getters whose errors name the file and the key path.

Also the value parsers the config and the CLI share: durations ("90s", "15m", "2d") and
"host:port" addresses. It knows no schema: `config` says which keys exist.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
from collections.abc import Iterable
from datetime import UTC, date, datetime, time
from typing import Any

#: Upper bound of every duration in the file (366 days): keeps deadlines finite and sane.
MAX_DURATION = 366 * 86400.0
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*([smhdw]?)\s*")
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_PORT = re.compile(r"[0-9]{1,5}")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_EXAMPLES = '90, "90s", "15m", "2h", "2d", "1w"'
_DATETIME_EXAMPLE = "2026-01-01T00:00:00Z"


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file and the key path."""


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


def _number(value: float) -> str:
    """1000000 as "1,000,000", 0.01 as "0.01": bounds as people write them."""
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:g}"


def _span(seconds: float) -> str:
    """A duration bound in days when it is whole days, else in seconds."""
    days, rest = divmod(seconds, 86400.0)
    if days and not rest:
        return f"{days:g} day" if days == 1 else f"{days:g} days"
    return f"{seconds:g} s"


# --- the reader -----------------------------------------------------------------------

MISSING: Any = object()


def _join(prefix: str, name: str) -> str:
    part = name if _BARE_KEY.fullmatch(name) else '"' + name.replace('"', '\\"') + '"'
    return f"{prefix}.{part}" if prefix else part


class Table:
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

    def get(self, name: str, default: Any = MISSING) -> Any:
        if name in self.data:
            return self.data[name]
        if default is MISSING:
            raise self.error(name, "required key is missing")
        return default

    def table(self, name: str, known: Iterable[str]) -> Table:
        value = self.get(name, {})
        if not isinstance(value, dict):
            raise self.error(name, f"must be a table ([{self.key(name)}])")
        return Table(value, self.key(name), self.source, known)

    def integer(self, name: str, default: Any, lo: int, hi: int | None = None) -> int:
        value = self.get(name, default)
        bad = isinstance(value, bool) or not isinstance(value, int)
        if bad or value < lo or (hi is not None and value > hi):
            span = f">= {lo}" if hi is None else f"between {lo} and {hi}"
            raise self.error(name, f"must be an integer {span}")
        return int(value)

    def flag(self, name: str, default: Any) -> bool:
        value = self.get(name, default)
        if not isinstance(value, bool):
            raise self.error(name, "must be true or false")
        return value

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

    def number(self, name: str, default: Any, lo: float, hi: float) -> float:
        """A finite number (an integer or a float) between `lo` and `hi`."""
        value = self.get(name, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or not lo <= value <= hi
        ):
            raise self.error(name, f"must be a number between {_number(lo)} and {_number(hi)}")
        return float(value)

    def duration(
        self,
        name: str,
        default: Any,
        *,
        minimum: float = 0.0,
        allow_zero: bool = False,
        maximum: float = MAX_DURATION,
    ) -> float:
        """A duration > 0 (>= 0 with `allow_zero`), >= `minimum`, <= `maximum`."""
        value = self.get(name, default)
        try:
            seconds = parse_duration(value, what=self.key(name), allow_zero=allow_zero)
        except ValueError as exc:
            raise ConfigError(f"{self.source}: {exc}") from None
        if seconds < minimum:
            raise self.error(name, f"must be at least {_span(minimum)}")
        if seconds > maximum:
            raise self.error(name, f"must be at most {_span(maximum)}")
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
            seconds = value.timestamp()
            try:  # what the admin commands and the report must be able to show
                datetime.fromtimestamp(seconds, UTC)
            except (OverflowError, ValueError, OSError):
                raise self.error(name, "must fall within the years 1 to 9999 in UTC") from None
            return seconds
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
