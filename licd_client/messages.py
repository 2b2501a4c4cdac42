"""Typed messages of docs/protocol.md sections 2 and 3: frozen dataclasses, strict schemas.

Past the decoder nothing handles raw dicts: `parse_request()` turns a decoded map into a
request type (exact keys, types and lengths, else BadRequest), `parse_reply()` does the
same for replies on the client side, and every message has `to_wire()`. This module knows
the shapes of messages, not what they mean; it does no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import BadRequest, LicdError, ProtocolViolation, from_wire

# Re-exported: the feature types and the field reader are part of the message vocabulary.
from .schema import MAX_UINT as MAX_UINT
from .schema import Features as Features
from .schema import FeatureValue as FeatureValue
from .schema import Fields as Fields

PROTOCOL_VERSION = 1
#: The protocol versions this code speaks: 2 adds batched signatures (docs/protocol.md).
PROTOCOLS = (1, 2)
BATCHED = 2  # the first version whose replies may carry a `batch` proof
#: Bounds on the integers a request may carry: what the daemon stores must fit SQLite's
#: signed 64-bit integers with room to add to them.
MAX_STORED_INT = 2**63 - 1
MAX_SEATS = 65535  # seats in one lease
MAX_UNITS = 2**32  # units in one consume
MIN_TTL = 1.0  # seconds: the shortest lease a checkout may ask for
#: A checkout's idempotency key: at least 128 random bits (e.g. 32 hex digits or 22
#: base64url characters). The daemon refuses shorter ones: a key someone could guess
#: would let them join another holder's checkout.
MIN_REQUEST_KEY_LEN = 22
MAX_REQUEST_KEY_LEN = 64
NONCE_LEN = 16
MAX_USAGE_REPORT = 1024  # bytes of a heartbeat's usage report (a request's longest bin)
KEY_LEN = 32


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Holder:
    """Who holds a lease: the machine, the user and the process."""

    host: str
    hostid: str
    user: str
    pid: int
    app: str | None = None
    instance: str | None = None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "host": self.host,
            "hostid": self.hostid,
            "user": self.user,
            "pid": self.pid,
        }
        if self.app is not None:
            out["app"] = self.app
        if self.instance is not None:
            out["instance"] = self.instance
        return out

    @classmethod
    def from_wire(cls, data: dict[str, Any], error: type[Exception] = BadRequest) -> Holder:
        r = Fields(data, "holder", error)
        holder = cls(
            host=r.nonempty_str("host", max_len=255),
            hostid=r.nonempty_str("hostid", max_len=255),
            user=r.text("user", max_len=255),
            pid=r.uint("pid", maximum=MAX_STORED_INT),
            app=r.text("app", max_len=255, required=False),
            instance=r.text("instance", max_len=255, required=False),
        )
        r.done()
        return holder


@dataclass(frozen=True)
class Request:
    """Base of every request; `op` names it on the wire."""

    op: ClassVar[str]
    id: int

    def _args(self) -> dict[str, Any]:
        return {}

    def to_wire(self) -> dict[str, Any]:
        return {"op": self.op, "id": self.id, **self._args()}


@dataclass(frozen=True)
class Hello(Request):
    op: ClassVar[str] = "hello"
    protocol: int
    client: str

    def _args(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "client": self.client}

    @classmethod
    def read(cls, rid: int, r: Fields) -> Hello:
        return cls(rid, protocol=r.uint("protocol"), client=r.text("client", max_len=255))


@dataclass(frozen=True)
class Checkout(Request):
    op: ClassVar[str] = "checkout"
    key: str
    holder: Holder
    request: str
    nonce: bytes
    seats: int = 1
    ttl: float | None = None
    delegate: bytes | None = None
    queue: bool = False  # wait in the daemon's queue when no seat is free

    def _args(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "key": self.key,
            "holder": self.holder.to_wire(),
            "seats": self.seats,
            "request": self.request,
            "nonce": self.nonce,
        }
        if self.ttl is not None:
            out["ttl"] = self.ttl
        if self.delegate is not None:
            out["delegate"] = self.delegate
        if self.queue:
            out["queue"] = True
        return out

    @classmethod
    def read(cls, rid: int, r: Fields) -> Checkout:
        key = r.nonempty_str("key", max_len=255)
        holder = Holder.from_wire(r.mapping("holder"))
        seats = r.uint("seats", required=False, minimum=1, maximum=MAX_SEATS)
        return cls(
            rid,
            key=key,
            holder=holder,
            request=r.nonempty_str(
                "request", min_len=MIN_REQUEST_KEY_LEN, max_len=MAX_REQUEST_KEY_LEN
            ),
            nonce=r.binary("nonce", length=NONCE_LEN),
            seats=1 if seats is None else seats,
            ttl=r.number("ttl", required=False, minimum=MIN_TTL),
            delegate=r.binary("delegate", length=KEY_LEN, required=False),
            queue=r.flag("queue", False),
        )


@dataclass(frozen=True)
class Heartbeat(Request):
    op: ClassVar[str] = "heartbeat"
    lease: str
    nonce: bytes
    usage: bytes | None = None  # a site router's signed usage report (a block's renewal)
    idle_for: float | None = None  # seconds since the app last marked itself in use

    def _args(self) -> dict[str, Any]:
        out: dict[str, Any] = {"lease": self.lease, "nonce": self.nonce}
        if self.usage is not None:
            out["usage"] = self.usage
        if self.idle_for is not None:
            out["idle_for"] = self.idle_for
        return out

    @classmethod
    def read(cls, rid: int, r: Fields) -> Heartbeat:
        return cls(
            rid,
            lease=r.nonempty_str("lease", max_len=255),
            nonce=r.binary("nonce", length=NONCE_LEN),
            usage=r.binary("usage", required=False, max_len=MAX_USAGE_REPORT),
            idle_for=r.number("idle_for", required=False, minimum=0.0),
        )


@dataclass(frozen=True)
class Checkin(Request):
    op: ClassVar[str] = "checkin"
    lease: str

    def _args(self) -> dict[str, Any]:
        return {"lease": self.lease}

    @classmethod
    def read(cls, rid: int, r: Fields) -> Checkin:
        return cls(rid, lease=r.nonempty_str("lease", max_len=255))


@dataclass(frozen=True)
class Available(Request):
    op: ClassVar[str] = "available"
    key: str

    def _args(self) -> dict[str, Any]:
        return {"key": self.key}

    @classmethod
    def read(cls, rid: int, r: Fields) -> Available:
        return cls(rid, key=r.nonempty_str("key", max_len=255))


@dataclass(frozen=True)
class Consume(Request):
    op: ClassVar[str] = "consume"
    lease: str
    counter: str
    units: int
    dedup: str | None = None

    def _args(self) -> dict[str, Any]:
        out: dict[str, Any] = {"lease": self.lease, "counter": self.counter, "units": self.units}
        if self.dedup is not None:
            out["dedup"] = self.dedup
        return out

    @classmethod
    def read(cls, rid: int, r: Fields) -> Consume:
        return cls(
            rid,
            lease=r.nonempty_str("lease", max_len=255),
            counter=r.nonempty_str("counter", max_len=64),
            units=r.uint("units", minimum=1, maximum=MAX_UNITS),
            dedup=r.text("dedup", max_len=MAX_REQUEST_KEY_LEN, required=False),
        )


REQUEST_TYPES: dict[str, Any] = {
    cls.op: cls for cls in (Hello, Checkout, Heartbeat, Checkin, Available, Consume)
}


def request_id(data: dict[str, Any]) -> int | None:
    """The request's `id` if it is a valid one, for echoing in an error reply."""
    rid = data.get("id")
    if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid <= MAX_UINT:
        return rid
    return None


def lean_heartbeat(data: dict[str, Any]) -> Heartbeat | None:
    """A heartbeat in its common shape (`op`, `id`, `lease`, `nonce`, maybe `idle_for`,
    each well-formed), read without the general field checks: the daemon's hot path. None
    for anything else, which `parse_request` then reads (and refuses as it must): this
    accepts only what `parse_request` accepts, and reads it the same."""
    size = len(data)
    rid, lease, nonce = data.get("id"), data.get("lease"), data.get("nonce")
    if (
        (size != 4 and (size != 5 or "idle_for" not in data))
        or type(rid) is not int
        or not 0 <= rid <= MAX_UINT
        or type(lease) is not str
        or not 0 < len(lease) <= 255
        or type(nonce) is not bytes
        or len(nonce) != NONCE_LEN
    ):
        return None
    idle_for = None
    if size == 5:  # with `idle_for`, which must be a number (an explicit nil is refused)
        idle_for = data["idle_for"]
        if type(idle_for) is not float and type(idle_for) is not int:
            return None
        idle_for = float(idle_for)
        if not 0.0 <= idle_for < float("inf"):
            return None
    return Heartbeat(rid, lease=lease, nonce=nonce, idle_for=idle_for)


def lean_checkin(data: dict[str, Any]) -> Checkin | None:
    """A checkin (`op`, `id`, `lease`, each well-formed; the caller has seen `op`), read
    without the general field checks. None for anything else, which the full reader then
    refuses as it must: a checkin has this one shape, so this accepts exactly what the
    full reader accepts, and reads it the same."""
    rid, lease = data.get("id"), data.get("lease")
    if (
        len(data) != 3
        or type(rid) is not int
        or not 0 <= rid <= MAX_UINT
        or type(lease) is not str
        or not 0 < len(lease) <= 255
    ):
        return None
    return Checkin(rid, lease=lease)


def parse_request(data: dict[str, Any]) -> Request:
    """A decoded map as a typed request, or BadRequest saying what is wrong. The hot
    ops in their common shape (a heartbeat, a checkin: most of a daemon's requests) are
    read by their lean readers; anything else, and anything they do not take, by the
    full one."""
    op = data.get("op")
    lean: Request | None = None
    if op == "heartbeat":
        lean = lean_heartbeat(data)
    elif op == "checkin":
        lean = lean_checkin(data)
    return _read_request(data) if lean is None else lean


def _read_request(data: dict[str, Any]) -> Request:
    """`parse_request`'s full reader, for every op and every shape."""
    r = Fields(data, "request", BadRequest)
    rid = r.uint("id")
    op = r.text("op", max_len=32)
    cls = REQUEST_TYPES.get(op)
    if cls is None:
        raise BadRequest(f"unknown op {op!r}")
    r.rename(op)
    request: Request = cls.read(rid, r)
    r.done()
    return request


# ---------------------------------------------------------------------------- replies


@dataclass(frozen=True)
class Reply:
    """Base of every success reply."""

    id: int

    def _results(self) -> dict[str, Any]:
        return {}

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "ok": True, **self._results()}


@dataclass(frozen=True)
class HelloReply(Reply):
    protocol: int
    server: str
    site: str
    key: bytes
    chain: list[bytes]
    time: float

    def _results(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "server": self.server,
            "site": self.site,
            "key": self.key,
            "chain": self.chain,
            "time": self.time,
        }

    @classmethod
    def read(cls, rid: int, r: Fields) -> HelloReply:
        return cls(
            rid,
            protocol=r.uint("protocol"),
            server=r.text("server"),
            site=r.text("site"),
            key=r.binary("key", length=KEY_LEN),
            chain=r.bins("chain"),
            time=r.number("time"),
        )


@dataclass(frozen=True)
class BatchProof:
    """A batched token's proof (protocol 2): one signature over the root of a Merkle tree
    of `size` tokens, and this token's leaf `index` and audit `path` (licd_client.merkle)."""

    sig: bytes
    size: int
    index: int
    path: list[bytes]

    def to_wire(self) -> dict[str, Any]:
        return {"sig": self.sig, "size": self.size, "index": self.index, "path": self.path}

    @classmethod
    def from_wire(cls, data: Any) -> BatchProof:
        if not isinstance(data, dict):
            raise ProtocolViolation("batch: must be a map")
        r = Fields(data, "batch", ProtocolViolation)
        size = r.uint("size", minimum=2)
        proof = cls(
            sig=r.binary("sig", length=64),
            size=size,
            index=r.uint("index", maximum=size - 1),
            path=r.bins("path"),
        )
        r.done()
        return proof


def lease_wire(
    rid: int,
    *,
    handle: str,
    token: bytes,
    chain: list[bytes],
    expires: float,
    ttl: float,
    renew_in: float,
    seats: int,
    features: Features,
    lease: str | None = None,
    overdraft: bool | None = None,
    idle_reclaim_in: float | None = None,
    batch: BatchProof | None = None,
) -> dict[str, Any]:
    """A checkout's or heartbeat's reply map (`LeaseReply` on the wire), made directly: a
    daemon's heartbeat path builds it without the dataclass."""
    out: dict[str, Any] = {
        "id": rid,
        "ok": True,
        "handle": handle,
        "token": token,
        "chain": chain,
        "expires": expires,
        "ttl": ttl,
        "renew_in": renew_in,
        "seats": seats,
        "features": features,
    }
    if lease is not None:
        out["lease"] = lease
    if overdraft is not None:
        out["overdraft"] = overdraft
    if idle_reclaim_in is not None:
        out["idle_reclaim_in"] = idle_reclaim_in
    if batch is not None:
        out["batch"] = batch.to_wire()
    return out


@dataclass(frozen=True)
class LeaseReply(Reply):
    """The reply to checkout (with `lease`) and to heartbeat (`lease` is None)."""

    handle: str
    token: bytes
    chain: list[bytes]
    expires: float
    ttl: float
    renew_in: float
    seats: int
    features: Features = field(default_factory=dict)
    lease: str | None = None
    overdraft: bool | None = None  # True: granted beyond the licence's seats (its overdraft)
    idle_reclaim_in: float | None = None  # an idle lease: reclaimed this soon unless used
    #: Protocol 2: `token` is a payload whose signature is this batch's, not its own.
    batch: BatchProof | None = None

    def to_wire(self) -> dict[str, Any]:
        return lease_wire(
            self.id,
            handle=self.handle,
            token=self.token,
            chain=self.chain,
            expires=self.expires,
            ttl=self.ttl,
            renew_in=self.renew_in,
            seats=self.seats,
            features=self.features,
            lease=self.lease,
            overdraft=self.overdraft,
            idle_reclaim_in=self.idle_reclaim_in,
            batch=self.batch,
        )

    @classmethod
    def read(cls, rid: int, r: Fields) -> LeaseReply:
        lease = r.text("lease", required=False)
        overdraft = r.flag("overdraft", False) or None
        batch = r.mapping("batch", required=False)
        return cls(
            rid,
            handle=r.text("handle"),
            token=r.binary("token"),
            chain=r.bins("chain"),
            expires=r.number("expires"),
            ttl=r.number("ttl"),
            renew_in=r.number("renew_in"),
            seats=r.uint("seats"),
            features=r.features("features"),
            lease=lease,
            overdraft=overdraft,
            idle_reclaim_in=r.number("idle_reclaim_in", required=False),
            batch=None if batch is None else BatchProof.from_wire(batch),
        )


@dataclass(frozen=True)
class QueueUpdate(Reply):
    """A queued checkout's interim frame (docs/protocol.md, "Queueing"): its place in the
    licence's queue, sent before the checkout's final reply, which has the same id."""

    position: int  # 1 = next to be served
    waiting: int  # checkouts in the licence's queue, this one included
    update_in: float  # the next update comes within this many seconds
    wait: float | None = None  # the daemon's estimate of the seconds until a seat

    def _results(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "queued": True,
            "position": self.position,
            "waiting": self.waiting,
            "update_in": self.update_in,
        }
        if self.wait is not None:
            out["wait"] = self.wait
        return out

    @classmethod
    def read(cls, rid: int, r: Fields) -> QueueUpdate:
        r.flag("queued")
        waiting = r.uint("waiting", minimum=1)
        return cls(
            rid,
            position=r.uint("position", minimum=1, maximum=waiting),
            waiting=waiting,
            update_in=r.number("update_in", positive=True),
            wait=r.number("wait", required=False),
        )


@dataclass(frozen=True)
class CheckinReply(Reply):
    released: bool

    def _results(self) -> dict[str, Any]:
        return {"released": self.released}

    @classmethod
    def read(cls, rid: int, r: Fields) -> CheckinReply:
        return cls(rid, released=r.flag("released"))


@dataclass(frozen=True)
class AvailableReply(Reply):
    total: int
    in_use: int
    available: int  # seats anyone may take now
    reserved: int = 0  # free seats held back for groups (0 when a daemon does not say)

    def _results(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "in_use": self.in_use,
            "available": self.available,
            "reserved": self.reserved,
        }

    @classmethod
    def read(cls, rid: int, r: Fields) -> AvailableReply:
        return cls(
            rid,
            total=r.uint("total"),
            in_use=r.uint("in_use"),
            available=r.uint("available"),
            reserved=r.uint("reserved", required=False) or 0,
        )


@dataclass(frozen=True)
class ConsumeReply(Reply):
    counter: str
    used: int
    limit: int
    remaining: int
    counted: bool

    def _results(self) -> dict[str, Any]:
        return {
            "counter": self.counter,
            "used": self.used,
            "limit": self.limit,
            "remaining": self.remaining,
            "counted": self.counted,
        }

    @classmethod
    def read(cls, rid: int, r: Fields) -> ConsumeReply:
        return cls(
            rid,
            counter=r.text("counter"),
            used=r.uint("used"),
            limit=r.uint("limit"),
            remaining=r.uint("remaining"),
            counted=r.flag("counted"),
        )


#: Which reply type answers which request op.
REPLY_TYPES: dict[str, Any] = {
    "hello": HelloReply,
    "checkout": LeaseReply,
    "heartbeat": LeaseReply,
    "checkin": CheckinReply,
    "available": AvailableReply,
    "consume": ConsumeReply,
}


#: The longest `message` an error frame carries, in characters (longer ones are cut).
MAX_MESSAGE = 1000


def error_frame(rid: int | None, exc: LicdError) -> dict[str, Any]:
    """The failure envelope of docs/protocol.md section 2 for one error."""
    message = exc.message
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 1] + "…"
    out: dict[str, Any] = {"id": rid, "ok": False, "error": exc.code, "message": message}
    if exc.retry_after is not None:
        out["retry_after"] = float(exc.retry_after)
    if exc.detail is not None:
        out["detail"] = exc.detail
    return out


def parse_error(data: dict[str, Any]) -> LicdError:
    """The LicdError an error reply stands for (ProtocolViolation if it is malformed)."""
    code, message = data.get("error"), data.get("message")
    if not isinstance(code, str) or not isinstance(message, str):
        raise ProtocolViolation("error reply without 'error' and 'message' strings")
    retry_after = data.get("retry_after")
    detail = data.get("detail")
    return from_wire(
        code,
        message,
        retry_after=float(retry_after) if isinstance(retry_after, int | float) else None,
        detail=detail if isinstance(detail, dict) else None,
    )


def is_queue_update(data: dict[str, Any]) -> bool:
    """True when a received frame is a queue update (a queued checkout's interim frame,
    `queued: true`), not the final reply to its request."""
    return data.get("ok") is True and data.get("queued") is True


def parse_reply(op: str, data: dict[str, Any]) -> Reply:
    """A received reply to `op` as its type (a checkout's queue update as a QueueUpdate);
    an error reply is raised as its LicdError."""
    ok = data.get("ok")
    if ok is False:
        raise parse_error(data)
    if ok is not True:
        raise ProtocolViolation("reply without a boolean 'ok'")
    r = Fields(data, f"{op} reply", ProtocolViolation)
    rid = r.uint("id")
    r.flag("ok")
    kind = QueueUpdate if op == "checkout" and is_queue_update(data) else REPLY_TYPES[op]
    reply: Reply = kind.read(rid, r)
    # Replies may grow new keys in later protocol revisions: ignore what is left.
    return reply
