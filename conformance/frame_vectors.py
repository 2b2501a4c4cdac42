"""frames.json: byte streams a decoder is fed, and what it must make of them (section 1).

Each case names its bytes and the outcome it was written for; `build()` runs the bytes
through licd_client's real `FrameDecoder` with the daemon's request limits and refuses
to write a case whose outcome differs. Valid bodies are encoded by `licd_client.wire`;
invalid ones are made by hand, byte by byte.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from licd_client.errors import LicdError
from licd_client.messages import Checkin, Checkout, Heartbeat, Hello, Holder
from licd_client.wire import (
    MAX_FRAME_AFTER_HELLO,
    MAX_FRAME_BEFORE_HELLO,
    PREFIX,
    REQUEST_LIMITS,
    FrameDecoder,
    encode,
)

from .notation import Disagreement, packed, tagged

BEFORE, AFTER = "before_hello", "after_hello"
MAX_FRAME = {BEFORE: MAX_FRAME_BEFORE_HELLO, AFTER: MAX_FRAME_AFTER_HELLO}
#: Outcomes other than an error code: every byte made frames, or some wait for more.
COMPLETE, INCOMPLETE = "complete", "incomplete"

NONCE = bytes(range(16))
SECRET = "q7Yx2mK9vR4tLw8nB3cF6hJ1sD5gA0eZ"  # a lease secret's shape: 32 URL-safe characters
HOLDER = Holder(host="machine-a", hostid="id-machine-a", user="alice", pid=4242)


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    phase: str
    stream: bytes
    outcome: str  # COMPLETE, INCOMPLETE, or the error code
    frames: int = 0  # maps decoded before the outcome


def frame(body: bytes) -> bytes:
    """A frame by hand: the body as given, behind its length."""
    return PREFIX.pack(len(body)) + body


def padded(size: int) -> bytes:
    """A map body of exactly `size` bytes: string values of at most 1,024 bytes each."""
    value: dict[str, str] = {}
    while (room := size - len(packed(value))) > 0:
        key = f"k{len(value):02d}"
        value[key] = "x" * min(1024, room)  # too long by the entry's own header: trimmed
        while len(packed(value)) > size and value[key]:
            value[key] = value[key][:-1]
    body = packed(value)
    if len(body) != size:
        raise Disagreement(f"no map body of exactly {size} bytes")
    return body


def nested(depth: int) -> bytes:
    """{"a": [[[...nil...]]]}: a map holding `depth` arrays inside each other."""
    return b"\x81\xa1a" + b"\x91" * depth + b"\xc0"


def _cases() -> list[Case]:
    hello = encode(Hello(1, protocol=1, client="myapp/2.1").to_wire())
    checkout = encode(
        Checkout(
            2,
            key="XXXX-YYYY-ZZZZ",
            holder=HOLDER,
            request="0123456789abcdef0123456789abcdef",
            nonce=NONCE,
        ).to_wire()
    )
    heartbeat = encode(Heartbeat(3, lease=SECRET, nonce=NONCE).to_wire())
    checkin = encode(Checkin(4, lease=SECRET).to_wire())
    # Every msgpack type a body may hold, in encodings licd_client never writes itself:
    # a float32, integers wider than needed, a str8 header for a short string.
    every_type = (
        b"\x8a"
        + b"\xa3nil\xc0"
        + b"\xa4true\xc3"
        + b"\xa5false\xc2"
        + b"\xa3neg\xd0\x80"  # int8 -128
        + b"\xa4wide\xcd\x00\x01"  # uint16 holding 1
        + b"\xa4u64m\xcf\xff\xff\xff\xff\xff\xff\xff\xff"  # 2**64 - 1
        + b"\xa3f32\xca\x3f\xc0\x00\x00"  # float32 1.5
        + b"\xa3f64\xcb"
        + struct.pack(">d", 1767225600.25)
        + b"\xa4str8\xd9\x02\xc3\xa9"  # "é" behind a str8 header
        + b"\xa3bin\xc4\x03\x00\x01\xff"
    )
    a_map_in_an_array = packed({"list": [1, "two", {"three": [3.0]}, b"\x04"]})
    eight_deep = packed({"a": [[[[[[[{"b": None}]]]]]]]})
    return [
        # ----------------------------------------------------------------- valid
        Case("hello", "A hello request, before hello.", BEFORE, hello, COMPLETE, 1),
        Case("checkout", "A checkout request with its binary nonce.", AFTER, checkout, COMPLETE, 1),
        Case(
            "pipelined",
            "Two frames back to back in one read: both decode, in order.",
            AFTER,
            heartbeat + checkin,
            COMPLETE,
            2,
        ),
        Case(
            "every_type",
            "nil, booleans, int8, a uint16 holding 1, 2**64-1, float32, float64, a str8 "
            "header on a one-character string and a binary: any valid msgpack encoding is "
            "accepted, not only the shortest.",
            AFTER,
            frame(every_type),
            COMPLETE,
            1,
        ),
        Case(
            "containers",
            "Arrays and maps inside the top-level map, mixed.",
            AFTER,
            frame(a_map_in_an_array),
            COMPLETE,
            1,
        ),
        Case(
            "nested_8",
            "Eight levels of containers below the top-level map: well within the limit.",
            AFTER,
            frame(eight_deep),
            COMPLETE,
            1,
        ),
        Case(
            "length_1024_before_hello",
            "The largest frame before hello: N = 1,024.",
            BEFORE,
            frame(padded(MAX_FRAME_BEFORE_HELLO)),
            COMPLETE,
            1,
        ),
        Case(
            "length_16384_after_hello",
            "The largest frame after hello: N = 16,384.",
            AFTER,
            frame(padded(MAX_FRAME_AFTER_HELLO)),
            COMPLETE,
            1,
        ),
        Case(
            "str_1024_bytes",
            "A string of 1,024 bytes (512 two-byte characters): the limit counts bytes.",
            AFTER,
            frame(packed({"s": "\u00e9" * 512})),
            COMPLETE,
            1,
        ),
        Case(
            "bin_1024",
            "A binary of 1,024 bytes.",
            AFTER,
            frame(packed({"b": bytes(1024)})),
            COMPLETE,
            1,
        ),
        Case(
            "array_64",
            "An array of 64 items.",
            AFTER,
            frame(packed({"a": list(range(64))})),
            COMPLETE,
            1,
        ),
        Case(
            "map_32",
            "A top-level map of 32 keys.",
            AFTER,
            frame(packed({f"k{i:02d}": i for i in range(32)})),
            COMPLETE,
            1,
        ),
        Case(
            "prefix_only",
            "A length prefix in range and no body yet: wait for more bytes.",
            BEFORE,
            hello[:4],
            INCOMPLETE,
        ),
        Case(
            "partial_body",
            "A frame cut halfway through its body: wait for more bytes.",
            BEFORE,
            hello[: len(hello) // 2],
            INCOMPLETE,
        ),
        Case(
            "one_and_a_half",
            "A whole frame, then the first bytes of the next: one map, then wait.",
            AFTER,
            heartbeat + checkin[:3],
            INCOMPLETE,
            1,
        ),
        # ----------------------------------------------------- the length prefix
        Case(
            "length_0",
            "N = 0 is out of range (1..1,024): frame_too_large, judged on the prefix alone.",
            BEFORE,
            PREFIX.pack(0),
            "frame_too_large",
        ),
        Case(
            "length_1025_before_hello",
            "N = 1,025 before hello: frame_too_large from the 4 prefix bytes, before any "
            "body arrives.",
            BEFORE,
            PREFIX.pack(MAX_FRAME_BEFORE_HELLO + 1),
            "frame_too_large",
        ),
        Case(
            "length_16385_after_hello",
            "N = 16,385 after hello: frame_too_large from the prefix alone.",
            AFTER,
            PREFIX.pack(MAX_FRAME_AFTER_HELLO + 1),
            "frame_too_large",
        ),
        Case(
            "length_max",
            "N = 2**32 - 1: frame_too_large from the prefix alone.",
            AFTER,
            PREFIX.pack(2**32 - 1),
            "frame_too_large",
        ),
        Case(
            "good_then_too_large",
            "A good frame, then a prefix out of range: one map, then frame_too_large.",
            BEFORE,
            hello + PREFIX.pack(MAX_FRAME_BEFORE_HELLO + 1),
            "frame_too_large",
            1,
        ),
        # ------------------------------------------------------------- the body
        Case(
            "not_msgpack",
            "0xc1 is no msgpack value.",
            AFTER,
            frame(b"\xc1"),
            "bad_request",
        ),
        Case(
            "truncated_value",
            "The frame is complete but the msgpack map inside it is cut short.",
            AFTER,
            frame(b"\x82\xa1a\x01"),
            "bad_request",
        ),
        Case(
            "trailing_bytes",
            "A map followed by one more byte inside the same frame.",
            AFTER,
            frame(packed({"op": "hello"}) + b"\xc0"),
            "bad_request",
        ),
        Case(
            "two_values",
            "Two maps inside one frame.",
            AFTER,
            frame(packed({"a": 1}) + packed({"b": 2})),
            "bad_request",
        ),
        Case("body_array", "A body that is an array.", AFTER, frame(packed([1, 2])), "bad_request"),
        Case("body_int", "A body that is an integer.", AFTER, frame(packed(7)), "bad_request"),
        Case("body_str", "A body that is a string.", AFTER, frame(packed("op")), "bad_request"),
        Case("body_nil", "A body that is nil.", AFTER, frame(b"\xc0"), "bad_request"),
        Case(
            "int_key",
            "A top-level map with an integer key.",
            AFTER,
            frame(packed({1: "a"})),
            "bad_request",
        ),
        Case(
            "bin_key",
            "A top-level map with a binary key.",
            AFTER,
            frame(packed({b"op": "hello"})),
            "bad_request",
        ),
        Case(
            "invalid_utf8",
            "A string that is not UTF-8.",
            AFTER,
            frame(b"\x81\xa1a\xa2\xc3\x28"),
            "bad_request",
        ),
        Case(
            "str_1025_bytes",
            "A string of 1,026 bytes in 513 characters: the limit counts bytes.",
            AFTER,
            frame(packed({"s": "\u00e9" * 513})),
            "bad_request",
        ),
        Case(
            "bin_1025",
            "A binary of 1,025 bytes.",
            AFTER,
            frame(packed({"b": bytes(1025)})),
            "bad_request",
        ),
        Case(
            "array_65",
            "An array of 65 items.",
            AFTER,
            frame(packed({"a": list(range(65))})),
            "bad_request",
        ),
        Case(
            "map_33",
            "A top-level map of 33 keys.",
            AFTER,
            frame(packed({f"k{i:02d}": i for i in range(33)})),
            "bad_request",
        ),
        Case(
            "inner_map_33",
            "A map of 33 keys inside the top-level map: the limits hold at every level.",
            AFTER,
            frame(packed({"m": {f"k{i:02d}": i for i in range(33)}})),
            "bad_request",
        ),
        Case(
            "nested_2000",
            "2,000 arrays inside each other, far deeper than any decoder should allow.",
            AFTER,
            frame(nested(2000)),
            "bad_request",
        ),
        Case(
            "fixext",
            "An ext value (fixext 1, type 1).",
            AFTER,
            frame(b"\x81\xa1e\xd4\x01\x00"),
            "bad_request",
        ),
        Case(
            "ext8",
            "An ext value (ext 8, type 5, 3 bytes).",
            AFTER,
            frame(b"\x81\xa1e\xc7\x03\x05abc"),
            "bad_request",
        ),
        Case(
            "timestamp",
            "msgpack's timestamp (ext type -1) is an ext type too.",
            AFTER,
            frame(b"\x81\xa1t\xd6\xff\x69\x55\xb9\x00"),
            "bad_request",
        ),
        Case(
            "bad_then_good",
            "A bad frame, then a good one: the stream is dead after the first; the good "
            "frame is never decoded.",
            AFTER,
            frame(b"\xc1") + heartbeat,
            "bad_request",
        ),
    ]


def _outcome(case: Case) -> tuple[list[dict[str, Any]], str]:
    decoder = FrameDecoder(MAX_FRAME[case.phase], REQUEST_LIMITS)
    decoder.feed(case.stream)
    frames: list[dict[str, Any]] = []
    try:
        while (item := decoder.next_frame()) is not None:
            frames.append(item)
    except LicdError as exc:
        return frames, exc.code
    return frames, COMPLETE if decoder.buffered == 0 else INCOMPLETE


def build() -> list[dict[str, Any]]:
    vectors: list[dict[str, Any]] = []
    for case in _cases():
        frames, outcome = _outcome(case)
        if (outcome, len(frames)) != (case.outcome, case.frames):
            raise Disagreement(
                f"frames/{case.name}: the decoder gives {outcome} after {len(frames)} frames, "
                f"not {case.outcome} after {case.frames}"
            )
        vector: dict[str, Any] = {
            "name": case.name,
            "description": case.description,
            "phase": case.phase,
            "max_frame": MAX_FRAME[case.phase],
            "stream": case.stream.hex(),
            "frames": [tagged(f) for f in frames],
            "outcome": "error" if outcome not in (COMPLETE, INCOMPLETE) else outcome,
        }
        if vector["outcome"] == "error":
            vector["error"] = outcome
            vector["closes"] = True
        vectors.append(vector)
    return vectors
