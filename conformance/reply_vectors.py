"""replies.json: reply maps a client receives in answer to an op, and licd_client's verdict
(sections 2 and 3).

Each case is a decoded map and whether it is a result (then the vector holds it as
licd_client reads it), a wire error (its code, retry_after and detail) or a protocol
violation. `build()` runs each case through licd_client's real `parse_reply` and refuses
to write one whose verdict differs from the case's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from licd_client.errors import LicdError, ProtocolViolation
from licd_client.messages import (
    AvailableReply,
    BatchProof,
    CheckinReply,
    ConsumeReply,
    HelloReply,
    LeaseReply,
    QueueUpdate,
    parse_reply,
)
from licd_client.wire import REPLY_LIMITS, decode_body

from .frame_vectors import SECRET
from .notation import DROP, Disagreement, changed, packed, tagged

RESULT, VIOLATION = "result", "violation"


@dataclass(frozen=True)
class Case:
    name: str
    op: str  # the op answered
    description: str
    value: dict[str, Any]
    verdict: str  # RESULT, VIOLATION or the error code


PAYLOAD = packed({"typ": "lease"})  # a token's shape; not verified here
TOKEN = bytes(range(64)) + PAYLOAD
LEASE = LeaseReply(
    7,
    handle="k3v9p2m7q4xa",
    token=TOKEN,
    chain=[],
    expires=1767225690.0,
    ttl=90.0,
    renew_in=30.0,
    seats=1,
    features={"tier": "pro", "max_studies": 500, "ocr": True, "ratio": 0.5},
    lease=SECRET,
).to_wire()
REPLIES: dict[str, dict[str, Any]] = {
    "hello": HelloReply(
        1,
        protocol=1,
        server="licd/0.1.0",
        site="hq",
        key=bytes(range(32)),
        chain=[],
        time=1767225600.5,
    ).to_wire(),
    "checkout": LEASE,
    "heartbeat": changed(LEASE, lease=DROP),
    "checkin": CheckinReply(8, released=True).to_wire(),
    "available": AvailableReply(9, total=3, in_use=1, available=1, reserved=1).to_wire(),
    "consume": ConsumeReply(
        10, counter="studies", used=12, limit=100, remaining=88, counted=True
    ).to_wire(),
}


UPDATE = QueueUpdate(2, position=2, waiting=3, update_in=30.0, wait=45.0).to_wire()
#: A batch proof's shape (protocol 2); not verified here (chains.json judges proofs).
BATCH = BatchProof(sig=bytes(range(64)), size=5, index=4, path=[bytes(range(32, 64))]).to_wire()


def error(rid: int | None, code: Any, message: str, **extra: Any) -> dict[str, Any]:
    return {"id": rid, "ok": False, "error": code, "message": message, **extra}


def _reply_cases() -> list[Case]:
    hello, checkout = REPLIES["hello"], REPLIES["checkout"]
    heartbeat, checkin = REPLIES["heartbeat"], REPLIES["checkin"]

    c = Case
    return [
        *(c(op, op, f"A {op} result.", value, RESULT) for op, value in REPLIES.items()),
        c(
            "hello_chain",
            "hello",
            "A hello result whose key is linked to an anchor by a chain.",
            changed(hello, chain=[TOKEN]),
            RESULT,
        ),
        c(
            "hello_protocol_2",
            "hello",
            "A hello result settling on protocol 2: lease replies may be batched.",
            changed(hello, protocol=2),
            RESULT,
        ),
        c(
            "checkout_batched",
            "checkout",
            "A protocol-2 lease whose token is a payload signed in a batch (its proof).",
            changed(checkout, token=PAYLOAD, batch=BATCH),
            RESULT,
        ),
        c(
            "heartbeat_batched",
            "heartbeat",
            "A protocol-2 renewal signed in a batch.",
            changed(heartbeat, token=PAYLOAD, batch=BATCH),
            RESULT,
        ),
        c(
            "overdraft",
            "checkout",
            "A lease granted in overdraft says so.",
            changed(checkout, overdraft=True),
            RESULT,
        ),
        c(
            "overdraft_false",
            "checkout",
            "overdraft false means the same as no overdraft.",
            changed(checkout, overdraft=False),
            RESULT,
        ),
        c(
            "integer_times",
            "heartbeat",
            "Float results given as integers are numbers too.",
            changed(heartbeat, expires=1767225690, ttl=90, renew_in=30),
            RESULT,
        ),
        c(
            "unknown_keys",
            "checkout",
            "Keys the client does not know are ignored.",
            changed(checkout, queue_position=0, note="from a later revision"),
            RESULT,
        ),
        c(
            "queue_update",
            "checkout",
            "A queued checkout's update: second of three waiting, a seat expected in 45 s.",
            UPDATE,
            RESULT,
        ),
        c(
            "queue_update_without_wait",
            "checkout",
            "An update without an estimate of the wait, its update_in an integer.",
            changed(UPDATE, wait=DROP, update_in=30),
            RESULT,
        ),
        c(
            "idle_reclaim_in",
            "heartbeat",
            "A renewal that warns: the lease is reclaimed as idle in 600 s unless used.",
            changed(heartbeat, idle_reclaim_in=600.0),
            RESULT,
        ),
        c(
            "seats_exhausted",
            "checkout",
            "An error reply with its detail, naming the rule that refused.",
            error(
                2,
                "seats_exhausted",
                "maximum allowed concurrent licences reached",
                detail={"in_use": 3, "total": 3, "rule": "seats"},
            ),
            "seats_exhausted",
        ),
        c(
            "rate_limited",
            "heartbeat",
            "An error reply with retry_after.",
            error(3, "rate_limited", "too many renewals", retry_after=2.5),
            "rate_limited",
        ),
        c(
            "retry_after_integer",
            "checkout",
            "retry_after as an integer is a number too.",
            error(2, "rate_limited", "too many checkouts", retry_after=3),
            "rate_limited",
        ),
        c(
            "error_id_nil",
            "checkout",
            "An error whose request id could not be read.",
            error(None, "bad_request", "request: 'id' is required"),
            "bad_request",
        ),
        c(
            "unavailable_leader",
            "checkout",
            "A standby of a cluster: unavailable, naming the leader to send the request to.",
            error(
                2,
                "unavailable",
                "this licd is a standby of a cluster; the leader is at 10.0.0.7:27500",
                retry_after=2.0,
                detail={"reason": "standby", "leader": "10.0.0.7:27500"},
            ),
            "unavailable",
        ),
        c(
            "unavailable_clock_rollback",
            "checkout",
            "A vendor licence held while the daemon's clock is behind.",
            error(
                2,
                "unavailable",
                "licence 'cad': the server's clock is 86400 s behind ...",
                retry_after=60.0,
                detail={"reason": "clock_rollback"},
            ),
            "unavailable",
        ),
        c(
            "lease_unknown",
            "heartbeat",
            "The lease is gone.",
            error(3, "lease_unknown", "no such lease"),
            "lease_unknown",
        ),
        c(
            "lease_revoked",
            "heartbeat",
            "The lease was revoked; detail says why.",
            error(
                3,
                "lease_unknown",
                "revoked by the administrator: seat needed",
                detail={"revoked": True, "reason": "seat needed"},
            ),
            "lease_unknown",
        ),
        c(
            "lease_reclaimed_idle",
            "heartbeat",
            "The lease was reclaimed because it was idle.",
            error(
                3,
                "lease_unknown",
                "the lease was reclaimed: idle for longer than the licence allows",
                detail={"reclaimed": True, "idle": True},
            ),
            "lease_unknown",
        ),
        c(
            "queue_full",
            "checkout",
            "A queued checkout refused: the licence's queue is full.",
            error(
                2,
                "seats_exhausted",
                "maximum allowed concurrent licences reached",
                detail={"in_use": 3, "total": 3, "rule": "queue", "waiting": 64},
            ),
            "seats_exhausted",
        ),
        c(
            "queue_requeued",
            "checkout",
            "A queued checkout taken over by the same request sent on another connection.",
            error(
                2,
                "unavailable",
                "the checkout was sent again on another connection",
                detail={"reason": "requeued"},
            ),
            "unavailable",
        ),
        c(
            "available_without_reserved",
            "available",
            "A daemon that does not send reserved: it reads as 0.",
            changed(REPLIES["available"], reserved=DROP, available=2),
            RESULT,
        ),
        c(
            "unsupported_protocol",
            "hello",
            "The daemon lists the versions it serves.",
            error(
                1, "unsupported_protocol", "protocol 2 is not supported", detail={"supported": [1]}
            ),
            "unsupported_protocol",
        ),
        # --------------------------------------------------------- violations
        c("ok_missing", "checkin", "A reply without ok.", changed(checkin, ok=DROP), VIOLATION),
        c("ok_not_bool", "checkin", "ok as an integer.", changed(checkin, ok=1), VIOLATION),
        c(
            "error_without_message",
            "checkout",
            "An error reply without message.",
            changed(error(2, "denied", "x"), message=DROP),
            VIOLATION,
        ),
        c(
            "error_code_not_str",
            "checkout",
            "An error reply whose error is not a string.",
            error(2, 7, "x"),
            VIOLATION,
        ),
        c(
            "token_missing",
            "checkout",
            "A lease result without its token.",
            changed(checkout, token=DROP),
            VIOLATION,
        ),
        c(
            "token_str",
            "heartbeat",
            "A token as a string.",
            changed(heartbeat, token=TOKEN.hex()),
            VIOLATION,
        ),
        c(
            "chain_not_bins",
            "checkout",
            "A chain holding a string.",
            changed(checkout, chain=["link"]),
            VIOLATION,
        ),
        c("seats_negative", "heartbeat", "seats -1.", changed(heartbeat, seats=-1), VIOLATION),
        c(
            "features_nested",
            "checkout",
            "A feature whose value is a map.",
            changed(checkout, features={"tier": {"name": "pro"}}),
            VIOLATION,
        ),
        *(
            c(
                f"batch_{name}",
                "checkout",
                f"A batch proof {description}.",
                changed(checkout, token=PAYLOAD, batch=batch),
                VIOLATION,
            )
            for name, description, batch in (
                ("not_map", "that is not a map", [BATCH["sig"], 5, 4, BATCH["path"]]),
                (
                    "size_1",
                    "of a tree of one leaf (a lone token is signed whole)",
                    changed(BATCH, size=1, index=0, path=[]),
                ),
                ("sig_63", "whose signature has 63 bytes", changed(BATCH, sig=bytes(63))),
                ("index_missing", "without index", changed(BATCH, index=DROP)),
                ("path_not_bins", "whose path holds a string", changed(BATCH, path=["00" * 32])),
            )
        ),
        c("key_31", "hello", "A hello key of 31 bytes.", changed(hello, key=bytes(31)), VIOLATION),
        c("time_str", "hello", "time as a string.", changed(hello, time="now"), VIOLATION),
        c(
            "released_missing",
            "checkin",
            "checkin without released.",
            changed(checkin, released=DROP),
            VIOLATION,
        ),
        c(
            "available_negative",
            "available",
            "in_use -1.",
            changed(REPLIES["available"], in_use=-1),
            VIOLATION,
        ),
        c(
            "queue_update_position_missing",
            "checkout",
            "A queue update without position.",
            changed(UPDATE, position=DROP),
            VIOLATION,
        ),
        c(
            "queue_update_position_0",
            "checkout",
            "A queue update at position 0: the head of the queue is 1.",
            changed(UPDATE, position=0),
            VIOLATION,
        ),
        c(
            "queue_update_waiting_0",
            "checkout",
            "A queue update with nobody waiting.",
            changed(UPDATE, waiting=0),
            VIOLATION,
        ),
        c(
            "queue_update_behind_the_queue",
            "checkout",
            "A queue update placing the checkout after the last of those waiting.",
            changed(UPDATE, position=3, waiting=2),
            VIOLATION,
        ),
        c(
            "queue_update_update_in_0",
            "checkout",
            "A queue update whose next update is due at once (update_in must be positive).",
            changed(UPDATE, update_in=0.0),
            VIOLATION,
        ),
        c(
            "queue_update_update_in_missing",
            "checkout",
            "A queue update that does not say when the next comes.",
            changed(UPDATE, update_in=DROP),
            VIOLATION,
        ),
        c(
            "queue_update_queued_false",
            "checkout",
            "queued false is no update: read as the checkout's reply, it has no lease.",
            changed(UPDATE, queued=False),
            VIOLATION,
        ),
        c(
            "queue_update_queued_int",
            "checkout",
            "queued 1: only the boolean true makes an update.",
            changed(UPDATE, queued=1),
            VIOLATION,
        ),
        c(
            "queue_update_to_heartbeat",
            "heartbeat",
            "Only a checkout is queued: to a heartbeat, this is no lease reply.",
            changed(UPDATE, id=3),
            VIOLATION,
        ),
        c(
            "idle_reclaim_in_str",
            "heartbeat",
            "idle_reclaim_in as a string.",
            changed(heartbeat, idle_reclaim_in="600"),
            VIOLATION,
        ),
        c(
            "counted_int",
            "consume",
            "counted as an integer.",
            changed(REPLIES["consume"], counted=1),
            VIOLATION,
        ),
    ]


def _reply_verdict(op: str, data: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """What licd_client makes of one reply: its verdict, and what the vector records."""
    try:
        reply = parse_reply(op, data)
    except ProtocolViolation:
        return VIOLATION, {"verdict": VIOLATION}
    except LicdError as exc:
        detail = None if exc.detail is None else tagged(exc.detail)
        return exc.code, {
            "verdict": "error",
            "error": exc.code,
            "retry_after": exc.retry_after,
            "detail": detail,
        }
    return RESULT, {"verdict": RESULT, "reply": tagged(reply.to_wire())}


def build() -> list[dict[str, Any]]:
    vectors: list[dict[str, Any]] = []
    for case in _reply_cases():
        body = packed(case.value)
        verdict, outcome = _reply_verdict(case.op, decode_body(body, REPLY_LIMITS))
        if verdict != case.verdict:
            raise Disagreement(f"replies/{case.name}: licd_client says {verdict}")
        vectors.append(
            {
                "name": case.name,
                "description": case.description,
                "op": case.op,
                "body": body.hex(),
                "value": tagged(case.value),
                **outcome,
            }
        )
    return vectors
