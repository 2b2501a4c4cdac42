"""Unit tests of licd_client.wire: sans-I/O framing, decode limits, no resynchronisation.

No sockets: bytes go into a FrameDecoder and maps come out (docs/protocol.md section 1,
ARCHITECTURE lesson 1).
"""

from __future__ import annotations

import struct
import time
import tracemalloc
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from licd_client.errors import BadRequest, FrameTooLarge, LicdError
from licd_client.wire import (
    MAX_FRAME_ADMIN,
    MAX_FRAME_AFTER_HELLO,
    MAX_FRAME_BEFORE_HELLO,
    REPLY_LIMITS,
    REQUEST_LIMITS,
    DecodeLimits,
    FrameDecoder,
    decode_body,
    encode,
)

MiB = 1024 * 1024


def frame(body: bytes) -> bytes:
    """A frame by hand: big-endian u32 length, then the body as given."""
    return struct.pack(">I", len(body)) + body


def packed(value: Any) -> bytes:
    body: bytes = msgpack.packb(value, use_bin_type=True)
    return body


def drain(decoder: FrameDecoder) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    while (item := decoder.next_frame()) is not None:
        frames.append(item)
    return frames


def decode_one(body: bytes, max_frame: int = MAX_FRAME_AFTER_HELLO) -> dict[str, Any]:
    """Push one hand-made frame through a fresh decoder and return its map."""
    decoder = FrameDecoder(max_frame)
    decoder.feed(frame(body))
    item = decoder.next_frame()
    assert item is not None
    return item


# ------------------------------------------------------------------------ framing


MSGS: list[dict[str, Any]] = [
    {"op": "hello", "id": 1, "protocol": 1, "client": "myapp/2.1"},
    {"op": "checkin", "id": 2, "lease": "x" * 40},
    {"op": "heartbeat", "id": 3, "lease": "abc", "nonce": bytes(range(16))},
    {"id": 4, "ok": True, "nested": {"a": [1, 2.5, None, True, "é"]}},
]


def test_encode_is_a_big_endian_length_then_the_msgpack_body() -> None:
    data = encode(MSGS[0])
    (length,) = struct.unpack(">I", data[:4])
    assert length == len(data) - 4
    assert msgpack.unpackb(data[4:], raw=False) == MSGS[0]


@pytest.mark.parametrize("msg", MSGS)
def test_encode_round_trips_through_the_decoder(msg: dict[str, Any]) -> None:
    decoder = FrameDecoder(MAX_FRAME_AFTER_HELLO)
    decoder.feed(encode(msg))
    assert decoder.next_frame() == msg
    assert decoder.next_frame() is None
    assert decoder.buffered == 0
    assert not decoder.failed
    assert decode_body(encode(msg)[4:]) == msg


def test_encode_keeps_bytes_and_str_apart() -> None:
    msg = {"s": "abc", "b": b"abc"}
    out = decode_one(encode(msg)[4:])
    assert out == msg
    assert isinstance(out["s"], str)
    assert isinstance(out["b"], bytes)


def test_whole_input_at_once() -> None:
    decoder = FrameDecoder(MAX_FRAME_AFTER_HELLO)
    assert decoder.next_frame() is None  # nothing fed yet
    decoder.feed(encode(MSGS[1]))
    assert decoder.next_frame() == MSGS[1]
    assert decoder.next_frame() is None


def test_one_byte_at_a_time() -> None:
    data = b"".join(encode(m) for m in MSGS)
    decoder = FrameDecoder(MAX_FRAME_AFTER_HELLO)
    out: list[dict[str, Any]] = []
    ends: list[int] = []
    for i in range(len(data)):
        decoder.feed(data[i : i + 1])
        got = drain(decoder)
        if got:
            ends.append(i + 1)
        out.extend(got)
    assert out == MSGS
    # Each frame comes out exactly when its last byte arrives, not before.
    sizes = [len(encode(m)) for m in MSGS]
    assert ends == [sum(sizes[: k + 1]) for k in range(len(sizes))]
    assert decoder.buffered == 0


def test_buffered_counts_the_partial_frame() -> None:
    data = encode(MSGS[0])
    decoder = FrameDecoder(MAX_FRAME_AFTER_HELLO)
    decoder.feed(data[:2])
    assert decoder.next_frame() is None
    assert decoder.buffered == 2
    decoder.feed(data[2:7])
    assert decoder.next_frame() is None
    assert decoder.buffered == 7
    decoder.feed(data[7:])
    assert decoder.next_frame() == MSGS[0]
    assert decoder.buffered == 0


def test_several_frames_in_one_feed() -> None:
    decoder = FrameDecoder(MAX_FRAME_AFTER_HELLO)
    decoder.feed(b"".join(encode(m) for m in MSGS))
    assert drain(decoder) == MSGS
    assert decoder.buffered == 0


def test_several_frames_and_a_partial_one() -> None:
    last = encode(MSGS[3])
    decoder = FrameDecoder(MAX_FRAME_AFTER_HELLO)
    decoder.feed(encode(MSGS[0]) + encode(MSGS[1]) + last[:5])
    assert drain(decoder) == MSGS[:2]
    decoder.feed(last[5:])
    assert drain(decoder) == [MSGS[3]]


def test_a_frame_of_exactly_the_maximum_length_is_accepted() -> None:
    # fixmap(1), fixstr "p", str16 header (3 bytes): 6 bytes of overhead.
    value = {"p": "x" * (MAX_FRAME_BEFORE_HELLO - 6)}
    body = packed(value)
    assert len(body) == MAX_FRAME_BEFORE_HELLO
    assert decode_one(body, MAX_FRAME_BEFORE_HELLO) == value


# Simple msgpack values that round-trip exactly.
SIMPLE = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.binary(max_size=40)
)
MAPS = st.dictionaries(st.text(max_size=16), SIMPLE | st.lists(SIMPLE, max_size=5), max_size=12)


@settings(max_examples=200, deadline=None)
@given(msgs=st.lists(MAPS, min_size=1, max_size=6), data=st.data())
def test_split_the_stream_anywhere_same_frames_out(
    msgs: list[dict[str, Any]], data: st.DataObject
) -> None:
    stream = b"".join(encode(m) for m in msgs)
    cuts = data.draw(
        st.lists(st.integers(min_value=0, max_value=len(stream)), max_size=20).map(sorted),
        label="cuts",
    )
    bounds = [0, *cuts, len(stream)]
    decoder = FrameDecoder(MAX_FRAME_AFTER_HELLO)
    out: list[dict[str, Any]] = []
    for start, end in zip(bounds, bounds[1:], strict=False):
        decoder.feed(stream[start:end])
        out.extend(drain(decoder))
    assert out == msgs
    assert decoder.buffered == 0
    assert not decoder.failed


# ------------------------------------------------------------ the length prefix


@pytest.mark.parametrize(
    ("max_frame", "length"),
    [
        (MAX_FRAME_BEFORE_HELLO, 0),
        (MAX_FRAME_BEFORE_HELLO, MAX_FRAME_BEFORE_HELLO + 1),
        (MAX_FRAME_AFTER_HELLO, 0),
        (MAX_FRAME_AFTER_HELLO, MAX_FRAME_AFTER_HELLO + 1),
        (MAX_FRAME_AFTER_HELLO, 2**32 - 1),
    ],
)
def test_length_out_of_range_is_rejected_on_the_prefix_alone(max_frame: int, length: int) -> None:
    decoder = FrameDecoder(max_frame)
    prefix = struct.pack(">I", length)
    for byte in prefix[:3]:
        decoder.feed(bytes([byte]))
        assert decoder.next_frame() is None
    decoder.feed(prefix[3:])  # the 4th prefix byte; not one body byte was fed
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()
    assert decoder.failed
    assert decoder.buffered == 0


def test_length_at_the_limit_waits_for_the_body() -> None:
    decoder = FrameDecoder(MAX_FRAME_BEFORE_HELLO)
    decoder.feed(struct.pack(">I", MAX_FRAME_BEFORE_HELLO))
    assert decoder.next_frame() is None
    assert not decoder.failed


def test_a_frame_valid_after_hello_is_too_large_before_it() -> None:
    body = packed({"blob": b"x" * 1000, "more": b"y" * 100})
    assert MAX_FRAME_BEFORE_HELLO < len(body) <= MAX_FRAME_AFTER_HELLO
    assert decode_one(body, MAX_FRAME_AFTER_HELLO)["more"] == b"y" * 100
    decoder = FrameDecoder(MAX_FRAME_BEFORE_HELLO)
    decoder.feed(frame(body))
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()


def test_a_good_frame_before_an_oversized_one_is_still_delivered() -> None:
    decoder = FrameDecoder(MAX_FRAME_BEFORE_HELLO)
    decoder.feed(encode(MSGS[0]) + struct.pack(">I", 5000))
    assert decoder.next_frame() == MSGS[0]
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()


# ---------------------------------------------------------- dead after an error


def _fail_with_too_large(decoder: FrameDecoder) -> LicdError:
    decoder.feed(struct.pack(">I", 0))
    with pytest.raises(FrameTooLarge) as info:
        decoder.next_frame()
    return info.value


def _fail_with_garbage(decoder: FrameDecoder) -> LicdError:
    decoder.feed(frame(b"\xc1"))
    with pytest.raises(BadRequest) as info:
        decoder.next_frame()
    return info.value


@pytest.mark.parametrize("fail", [_fail_with_too_large, _fail_with_garbage])
def test_the_decoder_is_dead_after_an_error(fail: Any) -> None:
    decoder = FrameDecoder(MAX_FRAME_AFTER_HELLO)
    first: LicdError = fail(decoder)
    assert decoder.failed
    for _ in range(3):
        with pytest.raises(type(first)) as info:
            decoder.next_frame()
        assert info.value is first
        # A perfectly good frame afterwards does not revive it: no resynchronisation.
        with pytest.raises(type(first)) as info:
            decoder.feed(encode(MSGS[0]))
        assert info.value is first


def test_frames_queued_behind_a_bad_one_are_never_delivered() -> None:
    decoder = FrameDecoder(MAX_FRAME_AFTER_HELLO)
    decoder.feed(encode(MSGS[0]) + frame(b"\xc1") + encode(MSGS[1]) + encode(MSGS[2]))
    assert decoder.next_frame() == MSGS[0]
    with pytest.raises(BadRequest) as info:
        decoder.next_frame()
    for _ in range(3):
        with pytest.raises(BadRequest) as again:
            decoder.next_frame()
        assert again.value is info.value
    assert decoder.buffered == 0  # nothing kept for a later resync


# ------------------------------------------------------------- malformed bodies


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"\xc1", id="never-used-byte"),
        pytest.param(b"\x82\xa1a\x01", id="truncated-map"),
        pytest.param(b"\x81\xa1a\xdb\x00\x00\x01\x00", id="truncated-str32"),
        pytest.param(b"\x81\xa2\xff\xfe\x01", id="invalid-utf8-key"),
        pytest.param(b"\x81\xa1a\xa2\xc3\x28", id="invalid-utf8-value"),
        pytest.param(bytes(range(256))[::-1][:200], id="noise"),
    ],
)
def test_garbage_body_is_bad_request(body: bytes) -> None:
    with pytest.raises(BadRequest):
        decode_one(body)
    with pytest.raises(BadRequest):
        decode_body(body)


@pytest.mark.parametrize(
    "value",
    [[1, 2, 3], [], 5, -1, "hello", b"bytes", None, True, 1.5],
    ids=repr,
)
def test_body_that_is_not_a_map_is_bad_request(value: Any) -> None:
    with pytest.raises(BadRequest, match="map"):
        decode_one(packed(value))


@pytest.mark.parametrize("trailer", [b"\x00", b"\xc0", packed({"b": 2})])
def test_trailing_bytes_are_bad_request(trailer: bytes) -> None:
    with pytest.raises(BadRequest, match="trailing"):
        decode_one(packed({"a": 1}) + trailer)


@pytest.mark.parametrize(
    "value",
    [{1: "a"}, {b"op": "hello"}, {"ok": 1, 2: 3}, {1.5: 1}, {True: 1}, {None: 1}],
    ids=repr,
)
def test_non_string_map_keys_are_bad_request(value: dict[Any, Any]) -> None:
    with pytest.raises(BadRequest):
        decode_one(packed(value))


# ---------------------------------------------------------------- decode limits


@pytest.mark.parametrize(
    ("accepted", "rejected"),
    [
        pytest.param({"s": "x" * 1024}, {"s": "x" * 1025}, id="str"),
        pytest.param({"s": "é" * 512}, {"s": "é" * 513}, id="str-counts-bytes"),
        pytest.param({"b": b"x" * 1024}, {"b": b"x" * 1025}, id="bin"),
        pytest.param({"a": list(range(64))}, {"a": list(range(65))}, id="array"),
        pytest.param({"a": [[0] * 64]}, {"a": [[0] * 65]}, id="nested-array"),
        pytest.param({f"k{i}": i for i in range(32)}, {f"k{i}": i for i in range(33)}, id="map"),
        pytest.param(
            {"m": {f"k{i}": i for i in range(32)}},
            {"m": {f"k{i}": i for i in range(33)}},
            id="nested-map",
        ),
        pytest.param({"x" * 1024: 1}, {"x" * 1025: 1}, id="key-length"),
    ],
)
def test_decode_limits(accepted: dict[str, Any], rejected: dict[str, Any]) -> None:
    assert decode_one(packed(accepted)) == accepted
    with pytest.raises(BadRequest):
        decode_one(packed(rejected))


def test_request_limits_are_those_of_the_protocol() -> None:
    limits = REQUEST_LIMITS
    assert (limits.max_str_len, limits.max_bin_len) == (1024, 1024)
    assert (limits.max_array_len, limits.max_map_len) == (64, 32)
    assert (MAX_FRAME_BEFORE_HELLO, MAX_FRAME_AFTER_HELLO) == (1024, 16384)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(packed({"e": msgpack.ExtType(5, b"abc")}), id="ext"),
        pytest.param(packed({"t": msgpack.Timestamp(1_700_000_000, 5)}), id="timestamp32+"),
        pytest.param(packed({"t": msgpack.Timestamp(1, 0)}), id="timestamp32"),
        pytest.param(packed({"t": [msgpack.Timestamp(2**40, 1)]}), id="timestamp96-nested"),
        pytest.param(b"\x81\xa1e\xc7\x00\x05", id="ext8-empty"),
        pytest.param(b"\x81\xa1e\xd4\x01\x00", id="fixext1"),
        pytest.param(packed(msgpack.ExtType(1, b"")), id="top-level-ext"),
    ],
)
@pytest.mark.parametrize("limits", [REQUEST_LIMITS, REPLY_LIMITS], ids=["request", "reply"])
def test_ext_types_are_bad_request(body: bytes, limits: DecodeLimits) -> None:
    with pytest.raises(BadRequest):
        decode_body(body, limits)
    decoder = FrameDecoder(MAX_FRAME_AFTER_HELLO, limits)
    decoder.feed(frame(body))
    with pytest.raises(BadRequest):
        decoder.next_frame()


# ---------------------------------------------------------------- msgpack bombs

BOMBS = [
    pytest.param(b"\x91" * 16000 + b"\xc0", id="fixarray1-x16000"),
    pytest.param(b"\xdc\xff\xff" * 5461 + b"\xc0", id="array16-65535"),
    pytest.param(b"\xdc\x00\x40" * 5461 + b"\xc0", id="array16-64-deep"),
    pytest.param(b"\xdd\xff\xff\xff\xff" * 3276 + b"\xc0", id="array32-max"),
    pytest.param(b"\xdf\xff\xff\xff\xff" * 3276 + b"\xc0", id="map32-max"),
    pytest.param(b"\x81\xa1a" * 5461 + b"\xc0", id="nested-fixmap"),
    pytest.param(b"\xdb\xff\xff\xff\xff" + b"x" * 16000, id="str32-max"),
    pytest.param(b"\xc6\x7f\xff\xff\xff" + b"x" * 16000, id="bin32-2GiB"),
]


@pytest.mark.parametrize("body", BOMBS)
def test_msgpack_bomb_is_rejected_quickly_in_bounded_memory(body: bytes) -> None:
    assert len(body) <= MAX_FRAME_AFTER_HELLO
    data = frame(body)
    decoder = FrameDecoder(MAX_FRAME_AFTER_HELLO)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        started = time.perf_counter()
        decoder.feed(data)
        with pytest.raises(BadRequest):
            decoder.next_frame()
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * MiB, f"decoding a {len(body)}-byte bomb peaked at {peak} bytes"
    assert elapsed < 1.0, f"decoding a {len(body)}-byte bomb took {elapsed:.3f} s"


def test_the_bomb_measurement_can_see_an_expensive_decode() -> None:
    """Control: the same kind of body under loose limits does cost memory, so the
    bounded-memory test above measures something real."""
    body = b"\xdc\xff\xff" * 100 + b"\xc0"
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        with pytest.raises(ValueError):
            msgpack.unpackb(body, max_array_len=65535)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak > 4 * MiB


# ----------------------------------------------------------------- reply limits


def test_reply_limits_allow_large_binaries_and_long_chains() -> None:
    reply = {
        "id": 1,
        "ok": True,
        "token": b"t" * 100_000,
        "chain": [b"c" * 200 for _ in range(300)],
        "message": "m" * 5000,
        "features": {f"f{i}": i for i in range(100)},
    }
    body = packed(reply)
    assert decode_body(body, REPLY_LIMITS) == reply
    with pytest.raises(BadRequest):
        decode_body(body, REQUEST_LIMITS)
    decoder = FrameDecoder(MAX_FRAME_ADMIN, REPLY_LIMITS)
    decoder.feed(encode(reply))
    assert decoder.next_frame() == reply


def test_reply_limits_still_bound_the_frame_and_keys() -> None:
    decoder = FrameDecoder(MAX_FRAME_ADMIN, REPLY_LIMITS)
    decoder.feed(struct.pack(">I", MAX_FRAME_ADMIN + 1))
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()
    with pytest.raises(BadRequest):
        decode_body(packed({1: 2}), REPLY_LIMITS)
