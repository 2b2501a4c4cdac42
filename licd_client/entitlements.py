"""Vendor-signed entitlements and a site's renewal requests (docs/protocol.md section 4,
docs/entitlements.md): their payloads both ways, their files, and what an entitlement
allows at an instant.

An entitlement is a statement of `typ` "entitlement" signed by a vendor key: the terms of
one licence (id, a hash of its key, product, seats, features, counters, add-ons,
validity, longest lease, a `sequence` that only grows) issued for one daemon key (`del`),
optionally bound to a site's host-id components (k of n must match). The daemon that
serves the licence puts the entitlement first in every lease token's chain, so a client
trusting only the vendor key accepts the lease and checks it stays within the terms.

A renewal request is a statement of `typ` "entitlement_request" signed by the daemon's
own key: the entitlements it holds, its host-id components and a usage summary. The
vendor answers it with the same terms, `sequence` + 1, valid for longer.

A usage report (`typ` "usage_report") is the same usage summary online: a site router
signs one with its key at each renewal of a block and sends it with the heartbeat
(docs/protocol.md, heartbeat), so the vendor sees a site's use either way.

Files are TOML, readable by a person: the statement in base64 beside what it says.
No I/O here but for text in and out, and no wall clock: callers pass the instants.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from nacl.signing import SigningKey

from .errors import TokenInvalid, UntrustedKey
from .messages import MAX_SEATS, MAX_USAGE_REPORT
from .schema import Fields
from .statements import KEY_LEN, Statement, fingerprint, open_statement, sign

# The terms are plain values (terms.py, which the daemon's pure engine reads too).
from .terms import RESETS as RESETS
from .terms import AddonTerm as AddonTerm
from .terms import Binding as Binding
from .terms import CounterTerm as CounterTerm
from .terms import Terms as Terms
from .wire import REPLY_LIMITS, decode_body

ENTITLEMENT = "entitlement"
REQUEST = "entitlement_request"
USAGE_REPORT = "usage_report"
#: Domain separation of the licence key's hash: the hash is of licd's licence keys only.
KEY_HASH_DOMAIN = b"licd-licence-key-v1\x00"
#: How long a renewal request stays answerable after it was made.
REQUEST_VALID = 30 * 86400.0
MAX_COMPONENTS = 16
MAX_NAME = 64
MAX_KEY = 256
#: The most slots of peaks a usage summary has: a renewal request's (a file), and a
#: usage report's (it must fit a heartbeat: MAX_USAGE_REPORT bytes); a longer span is
#: summed up in longer slots.
MAX_PEAKS = 1000
MAX_REPORT_PEAKS = 40


def key_hash(key: str) -> bytes:
    """What an entitlement holds of the licence key clients present: its SHA-256, domain
    separated. The key itself is a secret and is never in a statement (tokens carry the
    entitlement to every client)."""
    return hashlib.sha256(KEY_HASH_DOMAIN + key.encode()).digest()


@dataclass(frozen=True)
class Entitlement:
    """A verified entitlement: its terms, who signed it, for which daemon key, and the
    signed statement itself (what goes first in a lease's chain)."""

    terms: Terms
    vendor: bytes
    daemon: bytes
    issued: float
    statement: bytes

    @property
    def expires(self) -> float:
        return self.terms.expires


# --------------------------------------------------------------------------- payloads


def _time(t: float) -> float | int:
    return int(t) if float(t).is_integer() else float(t)


def entitlement_payload(
    vendor: bytes, daemon: bytes, issued: float, terms: Terms
) -> dict[str, Any]:
    """The payload of an entitlement of `terms` for daemon key `daemon`, by key `vendor`."""
    payload: dict[str, Any] = {
        "typ": ENTITLEMENT,
        "iss": vendor,
        "iat": _time(issued),
        "exp": _time(terms.expires),
        "del": daemon,
        "lic": terms.licence_id,
        "keyhash": terms.key_hash,
        "product": terms.product,
        "seats": terms.seats,
        "features": dict(terms.features),
        "seq": terms.sequence,
    }
    if terms.counters:
        payload["counters"] = [
            {"name": c.name, "limit": c.limit, "reset": c.reset} for c in terms.counters
        ]
    if terms.addons:
        payload["addons"] = [_addon_payload(a) for a in terms.addons]
    if terms.not_before is not None:
        payload["nbf"] = _time(terms.not_before)
    if terms.max_ttl is not None:
        payload["max_ttl"] = _time(terms.max_ttl)
    if terms.binding is not None:
        payload["bind"] = {"hostid": list(terms.binding.components), "need": terms.binding.need}
    return payload


def _addon_payload(a: AddonTerm) -> dict[str, Any]:
    out: dict[str, Any] = {"seats": a.seats, "features": dict(a.features)}
    if a.starts is not None:
        out["starts"] = _time(a.starts)
    if a.ends is not None:
        out["ends"] = _time(a.ends)
    return out


def issue(key: SigningKey, daemon: bytes, issued: float, terms: Terms) -> Entitlement:
    """Sign `terms` for daemon key `daemon` with the vendor's `key`."""
    if len(daemon) != KEY_LEN:
        raise ValueError(f"a daemon key is {KEY_LEN} bytes")
    if terms.expires <= issued:
        raise ValueError("an entitlement must expire after it is issued")
    vendor = bytes(key.verify_key)
    blob = sign(key, entitlement_payload(vendor, daemon, issued, terms))
    return read_entitlement(open_statement(blob, vendor), blob)


def read_entitlement(st: Statement, blob: bytes) -> Entitlement:
    """The entitlement a verified statement holds (`blob` its bytes), or TokenInvalid
    naming the field that is wrong. Every field is checked; unknown ones are refused."""
    if st.typ != ENTITLEMENT:
        raise TokenInvalid(f"a {st.typ!r} statement is not an entitlement")
    if st.delegate is None:
        raise TokenInvalid("entitlement: 'del' (the daemon key it is for) is required")
    # typ, iss, iat, exp and del were checked by open_statement
    data = {k: v for k, v in st.payload.items() if k not in ("typ", "iss", "iat", "exp", "del")}
    f = Fields(data, "entitlement", TokenInvalid)
    licence_id = f.nonempty_str("lic", max_len=MAX_NAME)
    keyhash = f.binary("keyhash", length=32)
    product = f.nonempty_str("product", max_len=MAX_NAME)
    seats = f.uint("seats", minimum=1, maximum=MAX_SEATS)
    features = f.features("features")
    sequence = f.uint("seq", minimum=1, maximum=2**53)
    counters = tuple(_counter(c) for c in _array(f, "counters"))
    addons = tuple(_addon(a) for a in _array(f, "addons"))
    not_before = f.number("nbf", required=False)
    max_ttl = f.number("max_ttl", required=False, positive=True)
    bind = f.mapping("bind", required=False)
    f.done()
    names = [c.name for c in counters]
    if len(set(names)) != len(names):
        raise TokenInvalid("entitlement: 'counters' names a counter twice")
    if not_before is not None and not_before >= st.exp:
        raise TokenInvalid("entitlement: 'nbf' is not before 'exp'")
    terms = Terms(
        licence_id=licence_id,
        key_hash=keyhash,
        product=product,
        seats=seats,
        expires=st.exp,
        sequence=sequence,
        features=features,
        counters=counters,
        addons=addons,
        not_before=not_before,
        max_ttl=max_ttl,
        binding=_binding(bind) if bind is not None else None,
    )
    return Entitlement(terms, st.iss, st.delegate, st.iat, blob)


def _array(f: Fields, name: str) -> list[dict[str, Any]]:
    value = f.array(name, required=False)
    if not all(isinstance(v, dict) for v in value):
        raise TokenInvalid(f"entitlement: '{name}' must be an array of maps")
    if len(value) > 64:
        raise TokenInvalid(f"entitlement: '{name}' has more than 64 entries")
    return value


def _counter(data: dict[str, Any]) -> CounterTerm:
    f = Fields(data, "entitlement counter", TokenInvalid)
    name = f.nonempty_str("name", max_len=MAX_NAME)
    limit = f.uint("limit", maximum=2**53)
    reset = f.text("reset", max_len=16, required=False) or "never"
    f.done()
    if reset not in RESETS:
        raise TokenInvalid(f"entitlement counter: 'reset' must be one of {', '.join(RESETS)}")
    return CounterTerm(name, limit, reset)


def _addon(data: dict[str, Any]) -> AddonTerm:
    f = Fields(data, "entitlement add-on", TokenInvalid)
    seats = f.uint("seats", maximum=MAX_SEATS)
    features = f.features("features")
    starts = f.number("starts", required=False)
    ends = f.number("ends", required=False)
    f.done()
    if starts is not None and ends is not None and ends <= starts:
        raise TokenInvalid("entitlement add-on: 'ends' is not after 'starts'")
    return AddonTerm(seats, features, starts, ends)


def _binding(data: dict[str, Any]) -> Binding:
    f = Fields(data, "entitlement bind", TokenInvalid)
    components = f.strings("hostid", max_len=128)
    need = f.uint("need", minimum=1, maximum=MAX_COMPONENTS)
    f.done()
    if not components or len(components) > MAX_COMPONENTS:
        raise TokenInvalid(f"entitlement bind: 'hostid' holds 1 to {MAX_COMPONENTS} components")
    if len(set(components)) != len(components):
        raise TokenInvalid("entitlement bind: 'hostid' names a component twice")
    if need > len(components):
        raise TokenInvalid("entitlement bind: 'need' is more than the components named")
    return Binding(tuple(components), need)


def open_entitlement(blob: bytes, vendors: Iterable[bytes]) -> Entitlement:
    """Verify `blob` as an entitlement signed by one of the `vendors` keys and read it.
    UntrustedKey when it is genuinely signed by another key; TokenInvalid otherwise."""
    keys = set(vendors)
    if not keys:
        raise TokenInvalid("no vendor key to check an entitlement against")
    try:
        iss = decode_body(blob[64:], REPLY_LIMITS).get("iss")
    except Exception:
        raise TokenInvalid("not a signed statement") from None
    if not isinstance(iss, bytes) or len(iss) != KEY_LEN:
        raise TokenInvalid("the statement names no signing key ('iss')")
    if iss not in keys:
        try:
            open_statement(blob, iss)
        except TokenInvalid:
            raise TokenInvalid("bad signature") from None
        trusted = ", ".join(sorted(fingerprint(k) for k in keys))
        raise UntrustedKey(
            f"signed by key fingerprint {fingerprint(iss)}, not by a vendor key "
            f"(trusted: {trusted})",
            signer=iss,
        )
    return read_entitlement(open_statement(blob, iss), blob)


# ------------------------------------------------------------------------------ files


@dataclass(frozen=True)
class FileEntry:
    """One entitlement in a file: the licence key it is for (None in a vendor's renewal,
    which never saw the key: the site has it) and the signed statement."""

    key: str | None
    statement: bytes


def _iso(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_file(entries: Sequence[tuple[str | None, Entitlement]]) -> str:
    """An entitlement file: per entitlement, its licence key (left out when None: a
    renewal, for a licence the site already holds) and statement, with what it says in
    comments (for a person; only `key` and `statement` are read back)."""
    out = ["# licd entitlements: import with `licd entitlement import FILE`", ""]
    for key, ent in entries:
        t = ent.terms
        out += [
            f"# licence {t.licence_id}: product {t.product}, {t.seats} seat(s), "
            f"sequence {t.sequence}, valid {_iso(t.not_before or ent.issued)} .. {_iso(t.expires)}",
            f"# for daemon key {ent.daemon.hex()}",
            f"# by vendor key {ent.vendor.hex()}",
            "[[entitlement]]",
            f"licence = {_toml_str(t.licence_id)}",
            *([] if key is None else [f"key = {_toml_str(key)}"]),
            f'statement = "{base64.b64encode(ent.statement).decode()}"',
            "",
        ]
    return "\n".join(out)


def _toml_str(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in escaped):
        raise ValueError("a licence key or id holds a control character")
    return f'"{escaped}"'


def read_file(text: str) -> list[FileEntry]:
    """The entitlements of a file's text, or ValueError saying what is wrong (and where).
    The statements are not verified here."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"not an entitlement file (TOML): {exc}") from None
    items = data.get("entitlement")
    if set(data) != {"entitlement"} or not isinstance(items, list) or not items:
        raise ValueError("not an entitlement file: it must hold [[entitlement]] tables only")
    out: list[FileEntry] = []
    for i, item in enumerate(items):
        where = f"entitlement[{i}]"
        unknown = set(item) - {"licence", "key", "statement"}
        if unknown:
            raise ValueError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
        key, statement = item.get("key"), item.get("statement")
        if key is not None and (not isinstance(key, str) or not 0 < len(key) <= MAX_KEY):
            raise ValueError(f"{where}: 'key' must be the licence key, 1 to {MAX_KEY} characters")
        if not isinstance(statement, str):
            raise ValueError(f"{where}: 'statement' must be the statement in base64")
        try:
            blob = base64.b64decode(statement, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{where}: 'statement' is not valid base64") from None
        out.append(FileEntry(key, blob))
    return out


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class LicenceUsage:
    """What a site used of one licence since its last request: the peak seats in use per
    slot (slot start, peak), the checkouts refused, and each counter's units consumed."""

    licence_id: str
    slot: float
    peaks: tuple[tuple[float, int], ...] = ()
    denials: int = 0
    counters: Mapping[str, int] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {
            "slot": _time(self.slot),
            "peaks": [[_time(t), n] for t, n in self.peaks],
            "denials": self.denials,
            "counters": dict(self.counters),
        }


@dataclass(frozen=True)
class Request:
    """A verified renewal request: the daemon key that signed it, its site, its host-id
    components, the entitlements it holds (statements, not yet verified) and its usage."""

    daemon: bytes
    site: str
    made: float
    expires: float
    components: tuple[str, ...]
    entitlements: tuple[bytes, ...]
    usage: tuple[LicenceUsage, ...]
    statement: bytes


def make_request(
    key: SigningKey,
    *,
    site: str,
    made: float,
    components: Sequence[str],
    entitlements: Sequence[bytes],
    usage: Sequence[LicenceUsage],
) -> bytes:
    """A renewal request signed by the daemon's `key`."""
    return _self_signed(
        key,
        REQUEST,
        made,
        site=site,
        hostid=list(components),
        entitlements=list(entitlements),
        usage={u.licence_id: u.to_wire() for u in usage},
    )


def _self_signed(key: SigningKey, typ: str, made: float, **fields: Any) -> bytes:
    """A statement of `typ` that `key` signs of itself (a site daemon's request, a
    router's report), made at `made` and valid REQUEST_VALID after."""
    payload = {
        "typ": typ,
        "iss": bytes(key.verify_key),
        "iat": _time(made),
        "exp": _time(made + REQUEST_VALID),
        **fields,
    }
    return sign(key, payload)


def read_request(blob: bytes) -> Request:
    """Verify a renewal request against the key it names (it is self-signed: the vendor
    checks that key is the one its entitlements were issued for) and read it."""
    try:
        iss = decode_body(blob[64:], REPLY_LIMITS).get("iss")
    except Exception:
        raise TokenInvalid("not a signed statement") from None
    if not isinstance(iss, bytes) or len(iss) != KEY_LEN:
        raise TokenInvalid("the request names no signing key ('iss')")
    st = open_statement(blob, iss)
    if st.typ != REQUEST:
        raise TokenInvalid(f"a {st.typ!r} statement is not a renewal request")
    data = {k: v for k, v in st.payload.items() if k not in ("typ", "iss", "iat", "exp")}
    f = Fields(data, "renewal request", TokenInvalid)
    site = f.text("site", max_len=MAX_NAME)
    components = f.strings("hostid", max_len=128)
    entitlements = f.bins("entitlements")
    usage = f.mapping("usage")
    f.done()
    return Request(
        daemon=iss,
        site=site,
        made=st.iat,
        expires=st.exp,
        components=tuple(components),
        entitlements=tuple(entitlements),
        usage=tuple(_usage(k, v) for k, v in usage.items()),
        statement=blob,
    )


def _usage(licence_id: Any, data: Any, what: str = "renewal request") -> LicenceUsage:
    if not isinstance(licence_id, str) or not isinstance(data, dict):
        raise TokenInvalid(f"{what}: 'usage' must map licence ids to maps")
    where = f"{what} usage of {licence_id!r}"
    f = Fields(data, where, TokenInvalid)
    slot = f.number("slot", positive=True)
    peaks = f.array("peaks")
    denials = f.uint("denials")
    counters = f.mapping("counters")
    f.done()
    if not all(
        isinstance(p, list)
        and len(p) == 2
        and isinstance(p[0], int | float)
        and not isinstance(p[0], bool)
        and math.isfinite(p[0])
        and isinstance(p[1], int)
        and not isinstance(p[1], bool)
        and p[1] >= 0
        for p in peaks
    ):
        raise TokenInvalid(f"{where}: 'peaks' is malformed")
    if not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
        for k, v in counters.items()
    ):
        raise TokenInvalid(f"{where}: 'counters' is malformed")
    return LicenceUsage(
        licence_id, slot, tuple((float(t), n) for t, n in peaks), denials, dict(counters)
    )


@dataclass(frozen=True)
class UsageReport:
    """A verified usage report: the site that made it, when, and its use of one block."""

    site: str
    made: float
    usage: LicenceUsage


def make_usage_report(key: SigningKey, *, site: str, made: float, usage: LicenceUsage) -> bytes:
    """A usage report of one block, signed by the site router's `key`."""
    return _self_signed(
        key, USAGE_REPORT, made, site=site, usage={usage.licence_id: usage.to_wire()}
    )


def read_usage_report(blob: bytes, key: bytes) -> UsageReport:
    """Verify a usage report against the site router's `key` (the block lease's
    `delegate`) and read it; TokenInvalid saying what is wrong."""
    if len(blob) > MAX_USAGE_REPORT:
        raise TokenInvalid(f"usage report: larger than {MAX_USAGE_REPORT} bytes")
    st = open_statement(blob, key)
    if st.typ != USAGE_REPORT:
        raise TokenInvalid(f"a {st.typ!r} statement is not a usage report")
    data = {k: v for k, v in st.payload.items() if k not in ("typ", "iss", "iat", "exp")}
    f = Fields(data, "usage report", TokenInvalid)
    site = f.text("site", max_len=MAX_NAME)
    usage = f.mapping("usage")
    f.done()
    if len(usage) != 1:
        raise TokenInvalid("usage report: 'usage' must hold one licence")
    [(licence_id, item)] = usage.items()
    return UsageReport(site, st.iat, _usage(licence_id, item, "usage report"))


def request_file(blob: bytes) -> str:
    """A renewal request's file: the statement in base64, with what it is in a comment."""
    return (
        "# licd renewal request: send it to the vendor (`licd vendor renew --request FILE`)\n"
        f'request = "{base64.b64encode(blob).decode()}"\n'
    )


def read_request_file(text: str) -> bytes:
    """A request file's statement, or ValueError saying what is wrong."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"not a renewal request file (TOML): {exc}") from None
    value = data.get("request")
    if set(data) != {"request"} or not isinstance(value, str):
        raise ValueError('not a renewal request file: it must hold `request = "..."` only')
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the request is not valid base64") from None
