"""Framing of docs/protocol.md section 1, with no I/O: bytes in, msgpack maps out, and back.

Theory of operation: a frame is a 4-byte big-endian length N and N bytes holding one
msgpack map with string keys. `FrameDecoder.feed()` buffers bytes; `next_frame()` returns
the next complete map or None. `next_frame()` checks the length against the limit as
soon as the 4 prefix bytes are in, before waiting for the body: a reader that calls it
after each chunk it feeds never buffers more than one chunk of an oversized frame. After
any error the decoder is dead: every later call raises the same error, because the
stream cannot be resynchronised. The decoder never reads sockets, never sleeps, never logs.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from .errors import BadRequest, FrameTooLarge, LicdError

PREFIX = struct.Struct(">I")

#: Frame limits of docs/protocol.md section 1.
MAX_FRAME_BEFORE_HELLO = 1024
MAX_FRAME_AFTER_HELLO = 16384
#: Admin frames on the Unix socket (docs/protocol.md section 8).
MAX_FRAME_ADMIN = 1024 * 1024


@dataclass(frozen=True)
class DecodeLimits:
    """Explicit msgpack limits: no value may allocate more than these allow."""

    max_str_len: int = 1024
    max_bin_len: int = 1024
    max_array_len: int = 64
    max_map_len: int = 32


#: What the daemon accepts from clients (docs/protocol.md section 1).
REQUEST_LIMITS = DecodeLimits()
#: What a client accepts from the daemon: replies carry tokens and chains larger than
#: any request field, but are still bounded by the frame length.
REPLY_LIMITS = DecodeLimits(
    max_str_len=MAX_FRAME_ADMIN,
    max_bin_len=MAX_FRAME_ADMIN,
    max_array_len=65536,
    max_map_len=65536,
)


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError("msgpack ext types are not allowed")


def encode(value: dict[str, Any]) -> bytes:
    """One frame: the length prefix and the msgpack body."""
    body: bytes = msgpack.packb(value, use_bin_type=True)
    return PREFIX.pack(len(body)) + body


def decode_body(body: bytes, limits: DecodeLimits = REQUEST_LIMITS) -> dict[str, Any]:
    """Decode one frame body to a map with string keys, or raise BadRequest."""
    try:
        value = msgpack.unpackb(
            body,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=limits.max_str_len,
            max_bin_len=limits.max_bin_len,
            max_array_len=limits.max_array_len,
            max_map_len=limits.max_map_len,
            max_ext_len=0,
            ext_hook=_no_ext,
        )
    except msgpack.ExtraData:
        raise BadRequest("trailing bytes after the msgpack value") from None
    except Exception:
        # ValueError, StackError (too deeply nested), UnicodeDecodeError, FormatError...
        raise BadRequest("the frame body is not valid msgpack within the limits") from None
    if not isinstance(value, dict):
        raise BadRequest("the frame body must be a msgpack map")
    for key in value:
        if not isinstance(key, str):
            raise BadRequest("map keys must be strings")
    return value


class FrameDecoder:
    """Incremental decoder: `feed()` bytes, then pull maps with `next_frame()`."""

    def __init__(self, max_frame: int, limits: DecodeLimits = REQUEST_LIMITS) -> None:
        self.max_frame = max_frame
        self.limits = limits
        self._buf = bytearray()
        self._need: int | None = None  # body length once the prefix is read
        self._error: LicdError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for a frame not yet complete (0 between frames)."""
        return len(self._buf) + (PREFIX.size if self._need is not None else 0)

    @property
    def failed(self) -> bool:
        return self._error is not None

    def feed(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._buf += data

    def next_frame(self) -> dict[str, Any] | None:
        """The next complete map, or None until more bytes arrive."""
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except LicdError as exc:
            self._error = exc
            self._buf.clear()
            raise

    def _next(self) -> dict[str, Any] | None:
        if self._need is None:
            if len(self._buf) < PREFIX.size:
                return None
            (length,) = PREFIX.unpack_from(self._buf)
            if not 1 <= length <= self.max_frame:
                raise FrameTooLarge(
                    f"frame length {length} is outside 1..{self.max_frame}",
                )
            del self._buf[: PREFIX.size]
            self._need = length
        if len(self._buf) < self._need:
            return None
        body = bytes(self._buf[: self._need])
        del self._buf[: self._need]
        self._need = None
        return decode_body(body, self.limits)
