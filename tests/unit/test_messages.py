"""Unit tests of licd_client.messages: strict request schemas, envelopes, typed replies.

Requests are held to docs/protocol.md sections 2 and 3 exactly (every problem is a
BadRequest naming the key); replies are parsed leniently about new keys but strictly
about the ones they carry.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from licd_client.errors import (
    REGISTRY,
    BadRequest,
    Internal,
    LicdError,
    ProtocolViolation,
    RateLimited,
    SeatsExhausted,
    UnsupportedProtocol,
)
from licd_client.messages import (
    MAX_MESSAGE,
    MAX_UINT,
    MIN_TTL,
    Available,
    AvailableReply,
    Checkin,
    CheckinReply,
    Checkout,
    Fields,
    Heartbeat,
    Hello,
    HelloReply,
    Holder,
    LeaseReply,
    Reply,
    Request,
    _read_request,
    error_frame,
    lean_checkin,
    lean_heartbeat,
    parse_reply,
    parse_request,
    request_id,
)
from licd_client.wire import REPLY_LIMITS, REQUEST_LIMITS, decode_body, encode

NONCE = bytes(range(16))
DELEGATE = bytes(range(32))
HOLDER: dict[str, Any] = {"host": "machine-a", "hostid": "id-a", "user": "alice", "pid": 4242}

_VALID: dict[str, dict[str, Any]] = {
    "hello": {"op": "hello", "id": 1, "protocol": 1, "client": "myapp/2.1"},
    "checkout": {
        "op": "checkout",
        "id": 2,
        "key": "XXXX-YYYY-ZZZZ",
        "holder": HOLDER,
        "request": "req-1-" + "0" * 17,
        "nonce": NONCE,
    },
    "heartbeat": {"op": "heartbeat", "id": 3, "lease": "L" * 32, "nonce": NONCE},
    "checkin": {"op": "checkin", "id": 4, "lease": "L" * 32},
    "available": {"op": "available", "id": 5, "key": "XXXX-YYYY-ZZZZ"},
}
OPS = list(_VALID)


def valid(which: str, /, **changes: Any) -> dict[str, Any]:
    """A fresh valid request map for op `which`, with `changes` applied."""
    data = copy.deepcopy(_VALID[which])
    data.update(changes)
    return data


def without(op: str, key: str) -> dict[str, Any]:
    data = valid(op)
    del data[key]
    return data


def with_holder(**changes: Any) -> dict[str, Any]:
    holder = dict(HOLDER)
    holder.update(changes)
    return valid("checkout", holder=holder)


def holder_without(key: str) -> dict[str, Any]:
    holder = dict(HOLDER)
    del holder[key]
    return valid("checkout", holder=holder)


def bad(data: dict[str, Any], name: str) -> None:
    """`data` is a BadRequest whose message names `name`."""
    with pytest.raises(BadRequest) as info:
        parse_request(data)
    assert f"'{name}'" in info.value.message, info.value.message
    assert info.value.code == "bad_request"


# ------------------------------------------------------------- valid requests


def test_parse_hello() -> None:
    assert parse_request(valid("hello")) == Hello(1, protocol=1, client="myapp/2.1")


def test_parse_checkout_with_defaults() -> None:
    request = parse_request(valid("checkout"))
    assert request == Checkout(
        2,
        key="XXXX-YYYY-ZZZZ",
        holder=Holder(host="machine-a", hostid="id-a", user="alice", pid=4242),
        request="req-1-" + "0" * 17,
        nonce=NONCE,
    )
    assert isinstance(request, Checkout)
    assert request.seats == 1
    assert request.ttl is None
    assert request.delegate is None


def test_parse_checkout_with_every_option() -> None:
    holder = {**HOLDER, "app": "viewer", "instance": "ward-3"}
    request = parse_request(
        valid("checkout", holder=holder, seats=4, ttl=30, delegate=DELEGATE, request="r" * 64)
    )
    assert request == Checkout(
        2,
        key="XXXX-YYYY-ZZZZ",
        holder=Holder("machine-a", "id-a", "alice", 4242, app="viewer", instance="ward-3"),
        request="r" * 64,
        nonce=NONCE,
        seats=4,
        ttl=30.0,
        delegate=DELEGATE,
    )
    assert isinstance(request, Checkout)
    assert isinstance(request.ttl, float)


def test_parse_heartbeat() -> None:
    assert parse_request(valid("heartbeat")) == Heartbeat(3, lease="L" * 32, nonce=NONCE)


def test_parse_checkin() -> None:
    assert parse_request(valid("checkin")) == Checkin(4, lease="L" * 32)


def test_parse_available() -> None:
    assert parse_request(valid("available")) == Available(5, key="XXXX-YYYY-ZZZZ")


def test_parse_accepts_boundary_values() -> None:
    assert parse_request(valid("hello", id=0)).id == 0
    assert parse_request(valid("hello", id=MAX_UINT)).id == MAX_UINT
    assert parse_request(with_holder(user="")) is not None  # user may be empty
    assert parse_request(valid("checkout", ttl=MIN_TTL)) is not None
    with pytest.raises(BadRequest, match="'ttl' must be at least 1"):
        parse_request(valid("checkout", ttl=0.999))


REQUESTS: list[Request] = [
    Hello(0, protocol=1, client="licd-client/0.1"),
    Checkout(
        7,
        key="K-1",
        holder=Holder("h", "hid", "u", 1),
        request="r" * 22,
        nonce=NONCE,
    ),
    Checkout(
        MAX_UINT,
        key="K-2",
        holder=Holder("h", "hid", "", 0, app="a", instance="i"),
        request="r" * 64,
        nonce=NONCE,
        seats=12,
        ttl=2.5,
        delegate=DELEGATE,
    ),
    Heartbeat(8, lease="secret", nonce=NONCE),
    Checkin(9, lease="secret"),
    Available(10, key="K-1"),
]


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: type(r).__name__)
def test_to_wire_then_parse_round_trips(request_: Request) -> None:
    wire = request_.to_wire()
    assert wire["op"] == request_.op
    assert wire["id"] == request_.id
    assert parse_request(wire) == request_
    # ...and through real framing under the request decode limits.
    assert parse_request(decode_body(encode(wire)[4:], REQUEST_LIMITS)) == request_


def test_to_wire_omits_unset_options() -> None:
    wire = REQUESTS[1].to_wire()
    assert set(wire) == {"op", "id", "key", "holder", "seats", "request", "nonce"}
    assert set(wire["holder"]) == {"host", "hostid", "user", "pid"}


def test_parse_does_not_modify_its_input() -> None:
    data = valid("checkout", seats=2)
    snapshot = copy.deepcopy(data)
    parse_request(data)
    assert data == snapshot


# --------------------------------------------------------------- missing keys

REQUIRED = [(op, key) for op in OPS for key in _VALID[op]]


@pytest.mark.parametrize(("op", "key"), REQUIRED)
def test_missing_required_key_is_bad_request(op: str, key: str) -> None:
    bad(without(op, key), key)


@pytest.mark.parametrize("key", ["host", "hostid", "user", "pid"])
def test_holder_missing_key_is_bad_request(key: str) -> None:
    bad(holder_without(key), key)


# ----------------------------------------------------------------- extra keys


@pytest.mark.parametrize("op", OPS)
def test_unknown_extra_key_is_bad_request(op: str) -> None:
    bad(valid(op, bogus=1), "bogus")


@pytest.mark.parametrize("op", ["hello", "heartbeat", "checkin", "available"])
def test_options_of_another_op_are_unknown_keys(op: str) -> None:
    bad(valid(op, seats=1), "seats")


def test_holder_with_unknown_key_is_bad_request() -> None:
    bad(with_holder(uid=1000), "uid")


def test_unknown_keys_are_named_briefly_whatever_the_request_carried() -> None:
    # 15 keys of 1,004 characters, mostly NULs (each escaped to 4 characters by repr).
    data = valid("available", **{f"k{n:02d}" + "\x00" * 1000: 1 for n in range(15)})
    with pytest.raises(BadRequest) as caught:
        parse_request(data)
    message = caught.value.message
    assert message.startswith("available: unknown keys 'k00\\x00")
    assert message.endswith("… and 10 more")
    assert message.count("…") == 5 and len(message) < 300
    few = valid("available", b=1, a=2)
    with pytest.raises(BadRequest, match=r"^available: unknown keys 'a', 'b'$"):
        parse_request(few)


# ---------------------------------------------------------------- wrong types

WRONG: list[Any] = [
    # the envelope, for every op
    *[pytest.param(op, "id", v, id=f"{op}-id-{v!r}") for op in OPS for v in (True, -1, 1.0)],
    pytest.param("hello", "id", "1", id="id-str"),
    pytest.param("hello", "id", None, id="id-nil"),
    pytest.param("hello", "id", MAX_UINT + 1, id="id-over-uint64"),
    pytest.param("hello", "op", 5, id="op-int"),
    pytest.param("hello", "op", b"hello", id="op-bin"),
    # hello
    pytest.param("hello", "protocol", True, id="protocol-bool"),
    pytest.param("hello", "protocol", -1, id="protocol-negative"),
    pytest.param("hello", "protocol", 1.0, id="protocol-float"),
    pytest.param("hello", "protocol", "1", id="protocol-str"),
    pytest.param("hello", "client", 5, id="client-int"),
    pytest.param("hello", "client", "c" * 256, id="client-too-long"),
    # checkout
    pytest.param("checkout", "key", "", id="key-empty"),
    pytest.param("checkout", "key", "k" * 256, id="key-too-long"),
    pytest.param("checkout", "key", b"XXXX", id="key-bin"),
    pytest.param("checkout", "holder", "machine-a", id="holder-str"),
    pytest.param("checkout", "holder", [HOLDER], id="holder-array"),
    pytest.param("checkout", "seats", 0, id="seats-0"),
    pytest.param("checkout", "seats", -1, id="seats-negative"),
    pytest.param("checkout", "seats", True, id="seats-bool"),
    pytest.param("checkout", "seats", 2.0, id="seats-float"),
    pytest.param("checkout", "request", "", id="request-empty"),
    pytest.param("checkout", "request", "r" * 65, id="request-too-long"),
    # under 128 bits: guessable, so another holder's checkout could be joined
    pytest.param("checkout", "request", "r" * 21, id="request-too-short"),
    pytest.param("checkout", "request", "0123456789abcdef", id="request-64-bits"),
    pytest.param("checkout", "request", 17, id="request-int"),
    pytest.param("checkout", "nonce", NONCE[:15], id="nonce-15"),
    pytest.param("checkout", "nonce", NONCE + b"\x00", id="nonce-17"),
    pytest.param("checkout", "nonce", b"", id="nonce-empty"),
    pytest.param("checkout", "nonce", "n" * 16, id="nonce-str"),
    pytest.param("checkout", "ttl", float("nan"), id="ttl-nan"),
    pytest.param("checkout", "ttl", float("inf"), id="ttl-inf"),
    pytest.param("checkout", "ttl", float("-inf"), id="ttl-minus-inf"),
    pytest.param("checkout", "ttl", 0, id="ttl-0"),
    pytest.param("checkout", "ttl", 0.0, id="ttl-0.0"),
    pytest.param("checkout", "ttl", -5.0, id="ttl-negative"),
    pytest.param("checkout", "ttl", True, id="ttl-bool"),
    pytest.param("checkout", "ttl", "30", id="ttl-str"),
    pytest.param("checkout", "delegate", DELEGATE[:31], id="delegate-31"),
    pytest.param("checkout", "delegate", DELEGATE.hex(), id="delegate-hex-str"),
    # heartbeat
    pytest.param("heartbeat", "lease", "", id="hb-lease-empty"),
    pytest.param("heartbeat", "lease", 5, id="hb-lease-int"),
    pytest.param("heartbeat", "lease", "l" * 256, id="hb-lease-too-long"),
    pytest.param("heartbeat", "nonce", NONCE * 2, id="hb-nonce-32"),
    pytest.param("heartbeat", "nonce", None, id="hb-nonce-nil"),
    # checkin
    pytest.param("checkin", "lease", "", id="ci-lease-empty"),
    pytest.param("checkin", "lease", None, id="ci-lease-nil"),
    pytest.param("checkin", "lease", b"L" * 32, id="ci-lease-bin"),
    # available
    pytest.param("available", "key", "", id="av-key-empty"),
    pytest.param("available", "key", ["XXXX"], id="av-key-array"),
]


@pytest.mark.parametrize(("op", "key", "value"), WRONG)
def test_wrong_type_or_range_is_bad_request_naming_the_key(op: str, key: str, value: Any) -> None:
    bad(valid(op, **{key: value}), key)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("host", ""),
        ("host", 5),
        ("hostid", ""),
        ("hostid", None),
        ("hostid", "h" * 256),
        ("user", 1000),
        ("pid", -1),
        ("pid", True),
        ("pid", 1.0),
        ("pid", "4242"),
        ("app", 3),
        ("instance", b"x"),
    ],
)
def test_holder_wrong_type_is_bad_request_naming_the_key(key: str, value: Any) -> None:
    bad(with_holder(**{key: value}), key)


@pytest.mark.parametrize("op", ["launch", "", "HELLO", "consume_all"])
def test_unknown_op_is_bad_request(op: str) -> None:
    with pytest.raises(BadRequest, match="unknown op"):
        parse_request({"op": op, "id": 1})


def test_an_empty_map_is_bad_request() -> None:
    with pytest.raises(BadRequest):
        parse_request({})


#: A reader's refusals, word for word: (map, reader, its arguments, the error's text).
FIELD_REFUSALS: list[Any] = [
    ({}, "text", {}, "'a' is required"),
    ({"a": None}, "text", {"required": False}, "'a' must not be nil"),
    ({"a": b"x"}, "text", {}, "'a' must be a string"),
    ({"a": "xyz"}, "text", {"max_len": 2}, "'a' must be at most 2 characters"),
    ({}, "nonempty_str", {}, "'a' is required"),
    ({"a": None}, "nonempty_str", {}, "'a' must not be nil"),
    ({"a": 1}, "nonempty_str", {}, "'a' must be a string"),
    ({"a": "xyz"}, "nonempty_str", {"max_len": 2}, "'a' must be at most 2 characters"),
    ({"a": ""}, "nonempty_str", {"min_len": 3}, "'a' must not be empty"),
    ({"a": "xy"}, "nonempty_str", {"min_len": 3}, "'a' must be at least 3 characters"),
    ({}, "uint", {}, "'a' is required"),
    ({"a": None}, "uint", {"required": False}, "'a' must not be nil"),
    ({"a": True}, "uint", {}, "'a' must be an unsigned integer"),
    ({"a": 1.0}, "uint", {}, "'a' must be an unsigned integer"),
    ({"a": -1}, "uint", {}, "'a' must be an unsigned integer"),
    ({"a": MAX_UINT + 1}, "uint", {"maximum": 2**65}, "'a' must be an unsigned integer"),
    ({"a": 1}, "uint", {"minimum": 2}, "'a' must be at least 2"),
    ({"a": 3}, "uint", {"maximum": 2}, "'a' must be at most 2"),
    ({}, "number", {}, "'a' is required"),
    ({"a": None}, "number", {"required": False}, "'a' must not be nil"),
    ({"a": False}, "number", {}, "'a' must be a number"),
    ({"a": "1"}, "number", {}, "'a' must be a number"),
    ({"a": float("nan")}, "number", {}, "'a' must be a finite number"),
    ({"a": float("-inf")}, "number", {}, "'a' must be a finite number"),
    ({"a": 0}, "number", {"positive": True}, "'a' must be positive"),
    ({"a": 0.5}, "number", {"minimum": 1.0}, "'a' must be at least 1"),
    ({}, "binary", {}, "'a' is required"),
    ({"a": None}, "binary", {"required": False}, "'a' must not be nil"),
    ({"a": "x"}, "binary", {}, "'a' must be binary"),
    ({"a": b"x"}, "binary", {"length": 2}, "'a' must be 2 bytes of binary"),
    ({"a": b""}, "binary", {"max_len": 2}, "'a' must be 1 to 2 bytes of binary"),
    ({}, "flag", {}, "'a' is required"),
    ({"a": None}, "flag", {"default": False}, "'a' must not be nil"),
    ({"a": 1}, "flag", {}, "'a' must be a boolean"),
    ({}, "mapping", {}, "'a' is required"),
    ({"a": None}, "mapping", {"required": False}, "'a' must not be nil"),
    ({"a": []}, "mapping", {}, "'a' must be a map"),
    ({"a": None}, "strings", {}, "'a' must not be nil"),
    ({"a": [""]}, "strings", {}, "'a' must be an array of non-empty strings"),
    ({}, "bins", {}, "'a' is required"),
    ({"a": ["x"]}, "bins", {}, "'a' must be an array of binaries"),
    ({"a": None}, "array", {"required": False}, "'a' must not be nil"),
    ({"a": {}}, "array", {}, "'a' must be an array"),
]


@pytest.mark.parametrize(("data", "reader", "args", "message"), FIELD_REFUSALS)
def test_each_field_reader_refuses_in_its_own_words(
    data: dict[str, Any], reader: str, args: dict[str, Any], message: str
) -> None:
    with pytest.raises(BadRequest) as info:
        getattr(Fields(data, "m", BadRequest), reader)("a", **args)
    assert info.value.message == f"m: {message}"


@pytest.mark.parametrize(
    ("reader", "args"),
    [
        ("text", {"required": False}),
        ("uint", {"required": False}),
        ("number", {"required": False}),
        ("binary", {"required": False}),
        ("mapping", {"required": False}),
    ],
)
def test_an_absent_optional_field_reads_as_none(reader: str, args: dict[str, Any]) -> None:
    assert getattr(Fields({}, "m", BadRequest), reader)("a", **args) is None


# ----------------------------------------------------------------- request_id


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"op": "hello", "id": 7}, 7),
        ({"id": 0}, 0),
        ({"id": MAX_UINT}, MAX_UINT),
        ({"id": MAX_UINT + 1}, None),
        ({"id": -1}, None),
        ({"id": True}, None),
        ({"id": False}, None),
        ({"id": 7.0}, None),
        ({"id": "7"}, None),
        ({"id": None}, None),
        ({"op": "hello"}, None),
        ({}, None),
    ],
    ids=repr,
)
def test_request_id_only_for_a_valid_uint(data: dict[str, Any], expected: int | None) -> None:
    assert request_id(data) == expected
    if expected is not None:
        assert type(request_id(data)) is int


# ---------------------------------------------------------------- error_frame


def test_error_frame_minimal_shape() -> None:
    assert error_frame(7, BadRequest("checkout: 'key' is required")) == {
        "id": 7,
        "ok": False,
        "error": "bad_request",
        "message": "checkout: 'key' is required",
    }


def test_error_frame_with_null_id_and_default_message() -> None:
    frame = error_frame(None, SeatsExhausted(detail={"in_use": 3, "total": 3}))
    assert frame == {
        "id": None,
        "ok": False,
        "error": "seats_exhausted",
        "message": "maximum allowed concurrent licences reached",
        "detail": {"in_use": 3, "total": 3},
    }


def test_error_frame_cuts_a_long_message() -> None:
    assert error_frame(1, BadRequest("x" * 5000))["message"] == "x" * (MAX_MESSAGE - 1) + "…"
    assert error_frame(1, BadRequest("x" * MAX_MESSAGE))["message"] == "x" * MAX_MESSAGE


def test_error_frame_retry_after_is_a_float() -> None:
    frame = error_frame(3, RateLimited(retry_after=2))
    assert frame["retry_after"] == 2.0
    assert type(frame["retry_after"]) is float
    assert "detail" not in frame


@pytest.mark.parametrize("cls", list(REGISTRY.values()), ids=lambda c: c.code)
def test_error_frame_round_trips_through_parse_reply(cls: type[LicdError]) -> None:
    exc = cls("a sentence", retry_after=1.5, detail={"supported": [1]})
    data = decode_body(encode(error_frame(11, exc))[4:], REPLY_LIMITS)
    with pytest.raises(cls) as info:
        parse_reply("checkout", data)
    assert type(info.value) is cls
    assert info.value.message == "a sentence"
    assert info.value.retry_after == 1.5
    assert info.value.detail == {"supported": [1]}


# ----------------------------------------------------------------- parse_reply

TOKEN = b"\x01" * 200
CHAIN = [b"\x02" * 150, b"\x03" * 150]
REPLIES: list[tuple[str, Reply]] = [
    (
        "hello",
        HelloReply(
            1, protocol=1, server="licd/0.1.0", site="hq", key=DELEGATE, chain=[], time=1.7e9
        ),
    ),
    (
        "hello",
        HelloReply(
            1, protocol=1, server="licd/0.1.0", site="hq", key=DELEGATE, chain=CHAIN, time=2.0
        ),
    ),
    (
        "checkout",
        LeaseReply(
            2,
            handle="h-1",
            token=TOKEN,
            chain=CHAIN,
            expires=1.7e9 + 90,
            ttl=90.0,
            renew_in=30.0,
            seats=1,
            features={"tier": "pro", "max": 3, "beta": False, "ratio": 0.5},
            lease="secret-lease",
        ),
    ),
    (
        "heartbeat",
        LeaseReply(
            3,
            handle="h-1",
            token=TOKEN,
            chain=[],
            expires=1.7e9 + 180,
            ttl=90.0,
            renew_in=30.0,
            seats=2,
        ),
    ),
    ("checkin", CheckinReply(4, released=True)),
    ("checkin", CheckinReply(4, released=False)),
    ("available", AvailableReply(5, total=3, in_use=1, available=2)),
]


@pytest.mark.parametrize(("op", "reply"), REPLIES, ids=lambda x: x if isinstance(x, str) else "")
def test_parse_reply_round_trips(op: str, reply: Reply) -> None:
    wire = reply.to_wire()
    assert wire["ok"] is True
    assert wire["id"] == reply.id
    assert parse_reply(op, wire) == reply
    assert parse_reply(op, decode_body(encode(wire)[4:], REPLY_LIMITS)) == reply


def test_heartbeat_reply_carries_no_lease() -> None:
    wire = REPLIES[3][1].to_wire()
    assert "lease" not in wire
    reply = parse_reply("heartbeat", wire)
    assert isinstance(reply, LeaseReply)
    assert reply.lease is None


def test_parse_reply_reads_ints_as_float_times() -> None:
    wire = {**REPLIES[0][1].to_wire(), "time": 1_700_000_000}
    reply = parse_reply("hello", wire)
    assert isinstance(reply, HelloReply)
    assert reply.time == 1.7e9
    assert type(reply.time) is float


@pytest.mark.parametrize(("op", "reply"), REPLIES, ids=lambda x: x if isinstance(x, str) else "")
def test_extra_unknown_keys_in_replies_are_ignored(op: str, reply: Reply) -> None:
    wire = {**reply.to_wire(), "future": {"x": 1}, "another": [1, 2]}
    assert parse_reply(op, wire) == reply


@pytest.mark.parametrize("code", sorted(REGISTRY))
def test_error_reply_raises_the_mapped_class(code: str) -> None:
    data = {
        "id": 9,
        "ok": False,
        "error": code,
        "message": "said the daemon",
        "retry_after": 4,
        "detail": {"in_use": 3, "total": 3},
    }
    with pytest.raises(LicdError) as info:
        parse_reply("checkout", data)
    assert type(info.value) is REGISTRY[code]
    assert info.value.code == code
    assert info.value.message == "said the daemon"
    assert info.value.retry_after == 4.0
    assert info.value.detail == {"in_use": 3, "total": 3}


def test_error_reply_without_optional_keys() -> None:
    with pytest.raises(UnsupportedProtocol) as info:
        parse_reply(
            "hello", {"id": 1, "ok": False, "error": "unsupported_protocol", "message": "m"}
        )
    assert info.value.retry_after is None
    assert info.value.detail is None


def test_error_reply_with_an_unknown_code_is_internal() -> None:
    data = {
        "id": None,
        "ok": False,
        "error": "disk_on_fire",
        "message": "smoke",
        "detail": {"a": 1},
    }
    with pytest.raises(Internal) as info:
        parse_reply("checkout", data)
    assert type(info.value) is Internal
    assert info.value.message == "smoke"
    assert info.value.detail is not None
    assert info.value.detail["code"] == "disk_on_fire"
    assert info.value.detail["a"] == 1


@pytest.mark.parametrize(
    "data",
    [
        {"id": 1, "protocol": 1},
        {"id": 1, "ok": None},
        {"id": 1, "ok": 1},
        {"id": 1, "ok": "true"},
        {},
    ],
    ids=repr,
)
def test_reply_without_a_boolean_ok_is_a_protocol_violation(data: dict[str, Any]) -> None:
    with pytest.raises(ProtocolViolation):
        parse_reply("hello", data)


@pytest.mark.parametrize(
    "data",
    [
        {"id": 1, "ok": False, "message": "no code"},
        {"id": 1, "ok": False, "error": "denied"},
        {"id": 1, "ok": False, "error": 5, "message": "m"},
    ],
    ids=repr,
)
def test_error_reply_without_error_and_message_is_a_protocol_violation(
    data: dict[str, Any],
) -> None:
    with pytest.raises(ProtocolViolation):
        parse_reply("checkout", data)


@pytest.mark.parametrize(
    ("op", "changes", "name"),
    [
        ("hello", {"key": b"k" * 31}, "key"),
        ("hello", {"chain": [b"ok", "not-bin"]}, "chain"),
        ("hello", {"time": "now"}, "time"),
        ("checkout", {"token": "not-bin"}, "token"),
        ("checkout", {"seats": -1}, "seats"),
        ("checkout", {"features": {"tier": [1]}}, "features"),
        ("checkout", {"ttl": True}, "ttl"),
        ("checkin", {"released": 1}, "released"),
        ("available", {"in_use": 1.0}, "in_use"),
        ("available", {"id": -1}, "id"),
    ],
)
def test_a_malformed_success_reply_is_a_protocol_violation(
    op: str, changes: dict[str, Any], name: str
) -> None:
    reply = next(r for o, r in REPLIES if o == op)
    with pytest.raises(ProtocolViolation, match=f"'{name}'"):
        parse_reply(op, {**reply.to_wire(), **changes})


@pytest.mark.parametrize("name", ["id", "handle", "token", "chain", "expires", "seats"])
def test_a_success_reply_missing_a_key_is_a_protocol_violation(name: str) -> None:
    wire = REPLIES[2][1].to_wire()
    del wire[name]
    with pytest.raises(ProtocolViolation, match=f"'{name}'"):
        parse_reply("checkout", wire)


@pytest.mark.parametrize("name", ["ttl", "delegate", "seats"])
def test_explicit_nil_for_an_optional_key_is_refused(name: str) -> None:
    with pytest.raises(BadRequest, match=name):
        parse_request(valid("checkout", **{name: None}))


def test_an_available_reply_without_reserved_reads_as_none_reserved() -> None:
    # A daemon of an earlier revision (a router's upstream, say) does not send it.
    wire = {"id": 5, "ok": True, "total": 3, "in_use": 1, "available": 2}
    assert parse_reply("available", wire) == AvailableReply(5, 3, 1, 2, reserved=0)
    with pytest.raises(ProtocolViolation, match="'reserved' must be an unsigned integer"):
        parse_reply("available", {**wire, "reserved": -1})


# ------------------------------------------------------------- the lean readers


_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=300),
    st.binary(max_size=40),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
_HEARTBEAT_KEYS = st.sampled_from(["op", "id", "lease", "nonce", "idle_for", "usage", "extra"])


@given(
    base=st.fixed_dictionaries(
        {
            "id": st.integers(min_value=0, max_value=2**32),
            "lease": st.text(min_size=1, max_size=255),
            "nonce": st.binary(min_size=16, max_size=16),
        },
        optional={"idle_for": st.floats(min_value=0, allow_infinity=False)},
    ),
    changes=st.dictionaries(_HEARTBEAT_KEYS, _VALUES, max_size=3),
    dropped=st.sets(_HEARTBEAT_KEYS, max_size=2),
)
def test_the_lean_heartbeat_reads_only_what_the_full_reader_accepts_and_the_same(
    base: dict[str, Any], changes: dict[str, Any], dropped: set[str]
) -> None:
    """The daemon's hot path (`lean_heartbeat`) never accepts a request the full reader
    refuses, and reads every one it accepts exactly as the full reader does."""
    data = {"op": "heartbeat", **base, **changes}
    for name in dropped:
        data.pop(name, None)
    _agrees_with_the_full_reader(lean_heartbeat, data, takes_every_one=False)


def _agrees_with_the_full_reader(
    lean_reader: Callable[[dict[str, Any]], Request | None],
    data: dict[str, Any],
    *,
    takes_every_one: bool,
) -> None:
    """A lean reader never takes a request the full reader refuses, reads each one it
    takes as the full reader does, and (`takes_every_one`) takes each one it accepts.
    It is asked of its own op only, as `parse_request` asks it."""
    if data.get("op") != lean_reader.__name__.removeprefix("lean_"):
        return
    lean = lean_reader(data)
    try:
        full = _read_request(data)
    except BadRequest:
        assert lean is None, data
        return
    if takes_every_one or lean is not None:
        assert lean == full, data


def test_the_lean_heartbeat_takes_the_common_shapes() -> None:
    beat = {"op": "heartbeat", "id": 7, "lease": "s" * 32, "nonce": bytes(16)}
    assert lean_heartbeat(beat) == _read_request(beat)
    idle = {**beat, "idle_for": 12}
    read = lean_heartbeat(idle)
    assert read == _read_request(idle) and read is not None and read.idle_for == 12.0
    assert lean_heartbeat({**beat, "usage": b"x"}) is None  # a router's: the full reader


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("nonce", bytes(15)),
        ("nonce", bytes(17)),
        ("nonce", "x" * 16),
        ("lease", ""),
        ("lease", "s" * 256),
        ("lease", b"s"),
        ("id", -1),
        ("id", True),
        ("id", 2**64),
        ("id", 1.0),
        ("idle_for", -1.0),
        ("idle_for", float("nan")),
        ("idle_for", float("inf")),
        ("idle_for", None),
        ("idle_for", "1"),
        ("idle_for", True),
    ],
)
def test_the_lean_heartbeat_leaves_every_near_miss_to_the_full_reader(
    name: str, value: Any
) -> None:
    beat = {"op": "heartbeat", "id": 7, "lease": "s" * 32, "nonce": bytes(16), name: value}
    assert lean_heartbeat(beat) is None
    with pytest.raises(BadRequest):
        _read_request(beat)


_CHECKIN_KEYS = st.sampled_from(["op", "id", "lease", "nonce", "extra"])


@given(
    # each near its bounds and of other types, as well as anywhere
    rid=st.one_of(
        st.sampled_from([0, MAX_UINT, MAX_UINT + 1, -1, True, False, 1.0, None, "1"]),
        st.integers(min_value=0),
    ),
    lease=st.one_of(
        st.sampled_from(["", "s", "s" * 255, "s" * 256, None, b"s", 5]), st.text(max_size=300)
    ),
    changes=st.dictionaries(_CHECKIN_KEYS, _VALUES, max_size=2),
    dropped=st.sets(_CHECKIN_KEYS, max_size=2),
)
def test_the_lean_checkin_reads_exactly_what_the_full_reader_accepts_and_the_same(
    rid: Any, lease: Any, changes: dict[str, Any], dropped: set[str]
) -> None:
    """`parse_request` reads a checkin with `lean_checkin` first: it accepts every checkin
    the full reader accepts and no other, and reads each one the same."""
    data = {"op": "checkin", "id": rid, "lease": lease, **changes}
    for name in dropped:
        data.pop(name, None)
    _agrees_with_the_full_reader(lean_checkin, data, takes_every_one=True)


@pytest.mark.parametrize(
    ("name", "value"),
    [("lease", ""), ("lease", "s" * 256), ("lease", None), ("id", True), ("id", 2**64)],
)
def test_the_lean_checkin_leaves_every_near_miss_to_the_full_reader(name: str, value: Any) -> None:
    checkin = valid("checkin", **{name: value})
    assert lean_checkin(checkin) is None
    with pytest.raises(BadRequest, match=f"^(checkin|request): '{name}' "):
        parse_request(checkin)
