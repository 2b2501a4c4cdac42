"""Unit tests of the errors: licd_client.errors, one class per wire code, and back; and
licd.core.errors, the daemon's one error map (what each exception is told as, to a
client and to an administrator, and whether the connection closes)."""

from __future__ import annotations

import ast
import inspect
import logging
import struct
from pathlib import Path
from typing import Any

import pytest

import licd
from licd.config.settings import ConfigError
from licd.core.errors import (
    ADMIN_UNAVAILABLE,
    Audience,
    closes,
    error_reply,
    store_failure_as_unavailable,
    wire_error,
)
from licd.store.base import StoreError
from licd_client import errors
from licd_client.errors import (
    REGISTRY,
    ClientError,
    ConnectionLost,
    Internal,
    LicdError,
    ProtocolViolation,
    RateLimited,
    SeatsExhausted,
    TokenInvalid,
    Unavailable,
    from_wire,
)
from licd_client.wire import FrameDecoder

LICD_DIR = Path(licd.__file__).resolve().parent

#: The codes of docs/protocol.md section 6, written out by hand on purpose.
PROTOCOL_CODES = [
    "bad_request",
    "frame_too_large",
    "hello_required",
    "unsupported_protocol",
    "unknown_licence",
    "licence_expired",
    "licence_not_yet_valid",
    "seats_exhausted",
    "lease_unknown",
    "denied",
    "quota_exhausted",
    "rate_limited",
    "too_many_connections",
    "shutting_down",
    "unavailable",
    "upstream_unavailable",
    "internal",
]


def wire_error_classes() -> list[type[LicdError]]:
    """Every concrete LicdError subclass the module defines."""
    return [
        obj
        for obj in vars(errors).values()
        if inspect.isclass(obj) and issubclass(obj, LicdError) and obj is not LicdError
    ]


def test_registry_covers_exactly_the_protocol_codes() -> None:
    assert len(PROTOCOL_CODES) == len(set(PROTOCOL_CODES)) == 17
    assert set(REGISTRY) == set(PROTOCOL_CODES)


def test_registry_is_one_to_one() -> None:
    classes = list(REGISTRY.values())
    assert len(set(classes)) == len(classes)
    for code, cls in REGISTRY.items():
        assert cls.code == code
        assert issubclass(cls, LicdError)


def test_every_error_class_has_a_unique_code_and_is_registered() -> None:
    classes = wire_error_classes()
    codes = [cls.code for cls in classes]
    assert len(codes) == len(set(codes)), sorted(codes)
    for cls in classes:
        assert REGISTRY[cls.code] is cls


@pytest.mark.parametrize("code", PROTOCOL_CODES)
def test_each_class_has_a_human_default_message(code: str) -> None:
    exc = REGISTRY[code]()
    assert exc.message == REGISTRY[code].default_message
    assert exc.message and exc.message[0].isalpha()
    assert str(exc) == exc.message
    assert exc.retry_after is None
    assert exc.detail is None


@pytest.mark.parametrize("code", PROTOCOL_CODES)
def test_from_wire_maps_each_code_to_its_class(code: str) -> None:
    detail: dict[str, Any] = {"in_use": 3, "total": 3}
    exc = from_wire(code, "from the daemon", retry_after=2.5, detail=detail)
    assert type(exc) is REGISTRY[code]
    assert exc.code == code
    assert exc.message == "from the daemon"
    assert str(exc) == "from the daemon"
    assert exc.retry_after == 2.5
    assert exc.detail == {"in_use": 3, "total": 3}


@pytest.mark.parametrize("code", PROTOCOL_CODES)
def test_from_wire_without_optional_fields(code: str) -> None:
    exc = from_wire(code, "m")
    assert type(exc) is REGISTRY[code]
    assert exc.retry_after is None
    assert exc.detail is None


@pytest.mark.parametrize("code", ["", "BAD_REQUEST", "disk_on_fire", "seats-exhausted"])
def test_from_wire_unknown_code_is_internal_and_keeps_the_code(code: str) -> None:
    exc = from_wire(code, "something new", retry_after=1.0, detail={"x": 1})
    assert type(exc) is Internal
    assert exc.message == "something new"
    assert exc.retry_after == 1.0
    assert exc.detail == {"x": 1, "code": code}


def test_from_wire_unknown_code_without_detail() -> None:
    exc = from_wire("brand_new", "m")
    assert type(exc) is Internal
    assert exc.detail == {"code": "brand_new"}


def test_seats_exhausted_message_is_the_protocols() -> None:
    assert SeatsExhausted().message == "maximum allowed concurrent licences reached"
    assert str(SeatsExhausted()) == "maximum allowed concurrent licences reached"
    assert SeatsExhausted("custom").message == "custom"


def test_repr_names_the_class_and_message() -> None:
    assert repr(SeatsExhausted()) == "SeatsExhausted('maximum allowed concurrent licences reached')"


@pytest.mark.parametrize("cls", [ClientError, TokenInvalid, ConnectionLost, ProtocolViolation])
def test_client_errors_have_no_wire_code(cls: type[ClientError]) -> None:
    assert issubclass(cls, ClientError)
    assert not issubclass(cls, LicdError)
    assert not hasattr(cls, "code")
    assert not hasattr(cls("x"), "code")
    registered: set[type] = set(REGISTRY.values())
    assert cls not in registered


def test_the_two_trees_are_disjoint() -> None:
    client_classes = [
        obj
        for obj in vars(errors).values()
        if inspect.isclass(obj) and issubclass(obj, ClientError)
    ]
    assert {TokenInvalid, ConnectionLost, ProtocolViolation} <= set(client_classes)
    assert not set(client_classes) & set(wire_error_classes())


# ------------------------------------------------------- licd.core.errors: the map

#: The codes after which the daemon closes the connection, written out by hand.
CLOSING_CODES = {"bad_request", "frame_too_large", "hello_required"}


@pytest.mark.parametrize("audience", list(Audience))
@pytest.mark.parametrize("code", PROTOCOL_CODES)
def test_a_licd_error_is_told_as_itself_to_either_audience(code: str, audience: Audience) -> None:
    error = REGISTRY[code]("said so", retry_after=1.5, detail={"n": 1})
    assert wire_error(error, audience) is error
    frame, close = error_reply(7, error, audience, "checkout")
    assert frame == {
        "id": 7,
        "ok": False,
        "error": code,
        "message": "said so",
        "retry_after": 1.5,
        "detail": {"n": 1},
    }
    assert close is (code in CLOSING_CODES) is closes(error)


@pytest.mark.parametrize(
    ("audience", "message"),
    [(Audience.CLIENT, Unavailable.default_message), (Audience.ADMIN, ADMIN_UNAVAILABLE)],
)
def test_a_store_error_is_unavailable_in_the_audiences_words(
    audience: Audience, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="licd.core.errors"):
        frame, close = error_reply(3, StoreError("/var/lib/licd/licd.db: disk I/O"), audience, "x")
    assert frame == {"id": 3, "ok": False, "error": "unavailable", "message": message}
    assert close is False
    assert "/var/lib" not in repr(frame)  # the database's words are logged, not told
    assert "event=store_error op='x'" in caplog.text and "/var/lib/licd" in caplog.text


@pytest.mark.parametrize("audience", list(Audience))
def test_a_config_error_is_a_bad_request_saying_what_is_wrong(audience: Audience) -> None:
    frame, close = error_reply(1, ConfigError("licence[0].seats: must be at least 1"), audience)
    assert (frame["error"], frame["message"]) == (
        "bad_request",
        "licence[0].seats: must be at least 1",
    )
    assert close is False  # an admin's bad edit breaks no stream


@pytest.mark.parametrize("audience", list(Audience))
def test_anything_else_is_internal_its_text_logged_never_told(
    audience: Audience, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="licd.core.errors"):
        frame, close = error_reply(None, KeyError("secret-of-the-daemon"), audience, "hello")
    assert frame == {
        "id": None,
        "ok": False,
        "error": "internal",
        "message": Internal.default_message,
    }
    assert close is False
    assert "event=internal_error op='hello'" in caplog.text
    assert "secret-of-the-daemon" in caplog.text  # the traceback is in the log


def test_a_retry_after_and_detail_are_told_as_given() -> None:
    frame, _ = error_reply(2, RateLimited(retry_after=4), Audience.CLIENT)
    assert frame["retry_after"] == 4.0 and isinstance(frame["retry_after"], float)
    assert "detail" not in frame


@pytest.mark.parametrize(
    "stream",
    [
        struct.pack(">I", 1 << 20) + b"x",  # a length out of range
        struct.pack(">I", 1) + b"\xc1",  # a byte msgpack never uses
        struct.pack(">I", 1) + b"\x01",  # not a map
    ],
)
def test_an_error_of_an_undecodable_stream_closes_the_connection(stream: bytes) -> None:
    """The servers stop reading a stream the decoder gave up on, and close it because
    the map says so for every error the decoder raises."""
    decoder = FrameDecoder(1024)
    decoder.feed(stream)
    with pytest.raises(LicdError) as failed:
        decoder.next_frame()
    assert closes(failed.value)


def test_a_store_failure_named_is_unavailable_saying_what_failed() -> None:
    with pytest.raises(Unavailable) as failed, store_failure_as_unavailable("not saved"):
        raise StoreError("disk full")
    assert failed.value.message == "not saved: disk full"
    assert failed.value.__cause__ is None and failed.value.__suppress_context__
    with pytest.raises(KeyError), store_failure_as_unavailable("not saved"):
        raise KeyError("a bug stays a bug")
    with store_failure_as_unavailable("not saved"):
        pass  # nothing failed: nothing raised


def _names(node: ast.expr | None) -> set[str]:
    """The names an except clause's type or a raise's exception mentions."""
    if node is None:
        return set()
    if isinstance(node, ast.Call):
        return _names(node.func)
    if isinstance(node, ast.Tuple):
        return set().union(*(_names(x) for x in node.elts))
    if isinstance(node, ast.Attribute):
        return {node.attr}
    return {node.id} if isinstance(node, ast.Name) else set()


def store_error_conversions(source: str) -> list[int]:
    """Lines where a handler of StoreError raises a LicdError (a conversion)."""
    licd_errors = {cls.__name__ for cls in REGISTRY.values()} | {"LicdError"}
    lines = []
    for handler in ast.walk(ast.parse(source)):
        if isinstance(handler, ast.ExceptHandler) and "StoreError" in _names(handler.type):
            for node in ast.walk(handler):
                if isinstance(node, ast.Raise) and _names(node.exc) & licd_errors:
                    lines.append(node.lineno)
    return lines


def test_only_the_error_map_turns_a_store_error_into_a_licd_error() -> None:
    """Everyone else lets a StoreError propagate (to the map), handles it (logs it,
    tries again, undoes), or names what failed with `store_failure_as_unavailable`."""
    found = {
        path.relative_to(LICD_DIR).as_posix(): lines
        for path in sorted(LICD_DIR.rglob("*.py"))
        if (lines := store_error_conversions(path.read_text(encoding="utf-8")))
    }
    assert list(found) == ["core/errors.py"], found


@pytest.mark.parametrize(
    ("caught", "handler", "lines"),
    [
        ("StoreError", "raise Unavailable() from None", [4]),
        ("(OSError, sqlite.StoreError) as e", "raise errors.Internal(str(e))", [4]),
        ("StoreError", "if y:\n    raise LicdError", [5]),
        ("StoreError", "log()\nraise", []),
        ("StoreError", "raise click.ClickException('no')", []),  # not a wire error
        ("KeyError", "raise Unavailable()", []),
    ],
)
def test_the_conversion_finder_finds_conversions_only(
    caught: str, handler: str, lines: list[int]
) -> None:
    body = "".join(f"    {line}\n" for line in handler.splitlines())
    assert store_error_conversions(f"try:\n    x()\nexcept {caught}:\n{body}") == lines


def test_only_the_error_map_writes_error_frames() -> None:
    """`error_frame` (an error to a wire reply) is called in licd/core/errors.py only;
    everything else goes through `error_reply` (or `Dispatcher.error`)."""
    callers = []
    for path in sorted(LICD_DIR.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and "error_frame" in _names(node.func):
                callers.append(path.relative_to(LICD_DIR).as_posix())
            if isinstance(node, ast.Dict):  # nor does anyone write an error reply by hand
                keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
                assert not {"ok", "error"} <= keys, path
    assert set(callers) == {"core/errors.py"}
