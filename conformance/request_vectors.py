"""requests.json: request maps a daemon receives after hello, and the schemas' verdict
(sections 2 and 3).

Each case is a decoded map and whether it is a valid request (then the vector holds it
as licd_client reads it, defaults filled in) or a `bad_request` (then the id the error
reply echoes). `build()` runs each case through licd_client's real `parse_request` and
refuses to write one whose verdict differs from the case's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from licd_client.errors import BadRequest
from licd_client.messages import parse_request, request_id
from licd_client.wire import REQUEST_LIMITS, decode_body

from .frame_vectors import NONCE, SECRET
from .notation import DROP, Disagreement, changed, packed, tagged

VALID, BAD = "valid", "bad_request"

KEY = "XXXX-YYYY-ZZZZ"
REQUEST_KEY = "0123456789abcdef0123456789abcdef"  # 128 bits as 32 hex digits
HOLDER: dict[str, Any] = {
    "host": "machine-a",
    "hostid": "id-machine-a",
    "user": "alice",
    "pid": 4242,
}
BASE: dict[str, dict[str, Any]] = {
    "hello": {"op": "hello", "id": 1, "protocol": 1, "client": "myapp/2.1"},
    "checkout": {
        "op": "checkout",
        "id": 2,
        "key": KEY,
        "holder": HOLDER,
        "request": REQUEST_KEY,
        "nonce": NONCE,
    },
    "heartbeat": {"op": "heartbeat", "id": 3, "lease": SECRET, "nonce": NONCE},
    "checkin": {"op": "checkin", "id": 4, "lease": SECRET},
    "available": {"op": "available", "id": 5, "key": KEY},
    "consume": {"op": "consume", "id": 6, "lease": SECRET, "counter": "studies", "units": 1},
}


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    value: dict[str, Any]
    verdict: str  # VALID or BAD


def holder(**changes: Any) -> dict[str, Any]:
    return changed(BASE["checkout"], holder=changed(HOLDER, **changes))


def _request_cases() -> list[Case]:
    hello, checkout, consume = BASE["hello"], BASE["checkout"], BASE["consume"]
    heartbeat, checkin, available = BASE["heartbeat"], BASE["checkin"], BASE["available"]
    c = Case
    return [
        # ----------------------------------------------------------------- valid
        *(c(op, f"A minimal {op} request.", value, VALID) for op, value in BASE.items()),
        c(
            "checkout_full",
            "A checkout with every optional argument: seats, ttl, delegate, queue, holder "
            "app and instance.",
            changed(
                checkout,
                holder={**HOLDER, "app": "viewer", "instance": "ward-3"},
                seats=2,
                ttl=3600.0,
                delegate=bytes(range(32)),
                queue=True,
            ),
            VALID,
        ),
        c(
            "checkout_queue",
            "A checkout that waits in the licence's queue when no seat is free.",
            changed(checkout, queue=True),
            VALID,
        ),
        c(
            "checkout_queue_false",
            "queue false, the default, given: read back without it, as a client sends it "
            "(a daemon that predates queueing refuses the key).",
            changed(checkout, queue=False),
            VALID,
        ),
        c(
            "hello_protocol_2",
            "Any protocol number is a valid hello (the daemon then "
            "answers unsupported_protocol, section 3).",
            changed(hello, protocol=2),
            VALID,
        ),
        c(
            "hello_client_empty",
            "client may be empty (str <= 255).",
            changed(hello, client=""),
            VALID,
        ),
        c("hello_client_255", "client of 255 characters.", changed(hello, client="c" * 255), VALID),
        c("id_0", "id 0.", changed(hello, id=0), VALID),
        c("id_max", "id 2**64 - 1, the largest uint.", changed(hello, id=2**64 - 1), VALID),
        c(
            "ttl_integer",
            "A float field accepts a msgpack integer: ttl 90.",
            changed(checkout, ttl=90),
            VALID,
        ),
        c("ttl_1", "ttl 1, the shortest lease.", changed(checkout, ttl=1.0), VALID),
        c("seats_1", "seats 1, the default, given.", changed(checkout, seats=1), VALID),
        c(
            "seats_65535",
            "seats 65,535, the most one lease holds.",
            changed(checkout, seats=65535),
            VALID,
        ),
        c(
            "request_22",
            "A request key of 22 characters (128 bits in base64url).",
            changed(checkout, request="AAECAwQFBgcICQoLDA0ODw"),
            VALID,
        ),
        c(
            "request_64",
            "A request key of 64 characters.",
            changed(checkout, request="r" * 64),
            VALID,
        ),
        c("key_255", "A licence key of 255 characters.", changed(checkout, key="K" * 255), VALID),
        c("user_empty", "holder.user may be empty.", holder(user=""), VALID),
        c("pid_max", "holder.pid 2**63 - 1, the largest.", holder(pid=2**63 - 1), VALID),
        c(
            "host_255_chars",
            "holder.host of 255 two-byte characters (510 bytes): lengths "
            "in section 3 count characters.",
            holder(host="\u00e9" * 255),
            VALID,
        ),
        c("units_max", "consume units 2**32, the most.", changed(consume, units=2**32), VALID),
        c(
            "dedup_empty",
            "An empty dedup is a value like any other.",
            changed(consume, dedup=""),
            VALID,
        ),
        c("dedup_64", "dedup of 64 characters.", changed(consume, dedup="d" * 64), VALID),
        c("counter_64", "counter of 64 characters.", changed(consume, counter="c" * 64), VALID),
        # --------------------------------------------------------- the envelope
        c("id_missing", "No id: the error's id is nil.", changed(hello, id=DROP), BAD),
        c("id_negative", "id -1 is not a uint.", changed(hello, id=-1), BAD),
        c("id_bool", "id true: a boolean is not a uint.", changed(hello, id=True), BAD),
        c("id_float", "id 1.0: a float is not a uint.", changed(hello, id=1.0), BAD),
        c("id_str", 'id "1".', changed(hello, id="1"), BAD),
        c("op_missing", "No op.", changed(hello, op=DROP), BAD),
        c("op_not_str", "op as an integer.", changed(hello, op=1), BAD),
        c("op_unknown", "An op the protocol does not have.", changed(checkin, op="renew"), BAD),
        c("op_too_long", "op longer than 32 characters.", changed(checkin, op="x" * 33), BAD),
        c("unknown_key", "A key the op does not take.", changed(checkin, nonce=NONCE), BAD),
        c(
            "unknown_keys_6",
            "Six unknown keys.",
            changed(available, **{f"extra{i}": i for i in range(6)}),
            BAD,
        ),
        c(
            "nil_optional",
            "An optional key given as nil is not an absent key.",
            changed(checkout, ttl=None),
            BAD,
        ),
        # -------------------------------------------------------------- hello
        c("protocol_missing", "hello without protocol.", changed(hello, protocol=DROP), BAD),
        c(
            "protocol_bool",
            "protocol true: a boolean is not a uint.",
            changed(hello, protocol=True),
            BAD,
        ),
        c("protocol_negative", "protocol -1.", changed(hello, protocol=-1), BAD),
        c("client_256", "client of 256 characters.", changed(hello, client="c" * 256), BAD),
        c("client_missing", "hello without client.", changed(hello, client=DROP), BAD),
        # ----------------------------------------------------------- checkout
        c("key_empty", "An empty licence key.", changed(checkout, key=""), BAD),
        c("key_256", "A licence key of 256 characters.", changed(checkout, key="K" * 256), BAD),
        c("key_bin", "A licence key as binary.", changed(checkout, key=KEY.encode()), BAD),
        c("holder_missing", "checkout without holder.", changed(checkout, holder=DROP), BAD),
        c("holder_not_map", "holder as a string.", changed(checkout, holder="machine-a"), BAD),
        c("host_missing", "holder without host.", holder(host=DROP), BAD),
        c("host_empty", "holder.host empty.", holder(host=""), BAD),
        c("hostid_empty", "holder.hostid empty.", holder(hostid=""), BAD),
        c("host_256", "holder.host of 256 characters.", holder(host="h" * 256), BAD),
        c("pid_bool", "holder.pid true: a boolean is not a uint.", holder(pid=True), BAD),
        c("pid_negative", "holder.pid -1.", holder(pid=-1), BAD),
        c("pid_2_63", "holder.pid 2**63, one past the largest.", holder(pid=2**63), BAD),
        c("holder_unknown_key", "A holder key the protocol does not have.", holder(uid=1000), BAD),
        c("seats_0", "seats 0.", changed(checkout, seats=0), BAD),
        c("seats_65536", "seats 65,536.", changed(checkout, seats=65536), BAD),
        c("seats_bool", "seats true: a boolean is not a uint.", changed(checkout, seats=True), BAD),
        c("seats_float", "seats 1.0: a float is not a uint.", changed(checkout, seats=1.0), BAD),
        c("request_missing", "checkout without request.", changed(checkout, request=DROP), BAD),
        c(
            "request_21",
            "A request key of 21 characters: too short to be unguessable.",
            changed(checkout, request="r" * 21),
            BAD,
        ),
        c(
            "request_65",
            "A request key of 65 characters.",
            changed(checkout, request="r" * 65),
            BAD,
        ),
        c("nonce_missing", "checkout without nonce.", changed(checkout, nonce=DROP), BAD),
        c("nonce_15", "A nonce of 15 bytes.", changed(checkout, nonce=NONCE[:15]), BAD),
        c("nonce_17", "A nonce of 17 bytes.", changed(checkout, nonce=NONCE + b"\x00"), BAD),
        c(
            "nonce_str",
            "A nonce as a 16-character string.",
            changed(checkout, nonce="0123456789abcdef"),
            BAD,
        ),
        c("ttl_0", "ttl 0.", changed(checkout, ttl=0.0), BAD),
        c("ttl_below_1", "ttl 0.999: a lease is at least 1 s.", changed(checkout, ttl=0.999), BAD),
        c("ttl_negative", "ttl -90.", changed(checkout, ttl=-90.0), BAD),
        c("ttl_nan", "ttl NaN.", changed(checkout, ttl=float("nan")), BAD),
        c("ttl_inf", "ttl infinity.", changed(checkout, ttl=float("inf")), BAD),
        c("ttl_str", "ttl as a string.", changed(checkout, ttl="90"), BAD),
        c("ttl_bool", "ttl true: a boolean is not a number.", changed(checkout, ttl=True), BAD),
        c("delegate_31", "A delegate of 31 bytes.", changed(checkout, delegate=bytes(31)), BAD),
        c("queue_int", "queue 1: an integer is not a boolean.", changed(checkout, queue=1), BAD),
        c("queue_str", 'queue "true".', changed(checkout, queue="true"), BAD),
        c(
            "delegate_hex",
            "A delegate as 64 hex digits instead of 32 bytes.",
            changed(checkout, delegate="00" * 32),
            BAD,
        ),
        # ---------------------------------------------- heartbeat, checkin, ...
        c("lease_empty", "heartbeat with an empty lease.", changed(heartbeat, lease=""), BAD),
        c(
            "lease_256",
            "checkin with a lease of 256 characters.",
            changed(checkin, lease="l" * 256),
            BAD,
        ),
        c(
            "heartbeat_nonce_missing",
            "heartbeat without nonce.",
            changed(heartbeat, nonce=DROP),
            BAD,
        ),
        c(
            "heartbeat_usage",
            "A site router's heartbeat with a usage report (its content is checked by the "
            "daemon against the lease's del key, not by the schema).",
            changed(heartbeat, usage=bytes(200)),
            VALID,
        ),
        c(
            "heartbeat_idle_for",
            "A heartbeat saying the application was last in use 42.5 s ago.",
            changed(heartbeat, idle_for=42.5),
            VALID,
        ),
        c(
            "heartbeat_idle_for_0",
            "idle_for 0, an integer: in use right now.",
            changed(heartbeat, idle_for=0),
            VALID,
        ),
        c(
            "heartbeat_idle_for_negative",
            "idle_for -1: idleness is never negative.",
            changed(heartbeat, idle_for=-1.0),
            BAD,
        ),
        c(
            "heartbeat_idle_for_nan",
            "idle_for NaN.",
            changed(heartbeat, idle_for=float("nan")),
            BAD,
        ),
        c(
            "heartbeat_idle_for_bool",
            "idle_for true: a boolean is not a number.",
            changed(heartbeat, idle_for=True),
            BAD,
        ),
        c(
            "heartbeat_usage_empty",
            "heartbeat with an empty usage.",
            changed(heartbeat, usage=b""),
            BAD,
        ),
        c(
            "heartbeat_usage_text",
            "heartbeat with usage as a string instead of binary.",
            changed(heartbeat, usage="report"),
            BAD,
        ),
        c("available_key_missing", "available without key.", changed(available, key=DROP), BAD),
        c("units_0", "consume units 0.", changed(consume, units=0), BAD),
        c("units_too_many", "consume units 2**32 + 1.", changed(consume, units=2**32 + 1), BAD),
        c("units_bool", "consume units true.", changed(consume, units=True), BAD),
        c("counter_65", "counter of 65 characters.", changed(consume, counter="c" * 65), BAD),
        c("counter_empty", "An empty counter.", changed(consume, counter=""), BAD),
        c("dedup_65", "dedup of 65 characters.", changed(consume, dedup="d" * 65), BAD),
    ]


def build() -> list[dict[str, Any]]:
    vectors: list[dict[str, Any]] = []
    for case in _request_cases():
        body = packed(case.value)
        vector: dict[str, Any] = {
            "name": case.name,
            "description": case.description,
            "body": body.hex(),
            "value": tagged(case.value),
        }
        try:
            request = parse_request(decode_body(body, REQUEST_LIMITS))
        except BadRequest:
            verdict = BAD
            vector.update(verdict=BAD, reply_id=tagged(request_id(case.value)), closes=True)
        else:
            verdict = VALID
            vector.update(verdict=VALID, request=tagged(request.to_wire()))
        if verdict != case.verdict:
            raise Disagreement(f"requests/{case.name}: licd_client says {verdict}")
        vectors.append(vector)
    return vectors
