"""Unit tests of licd_client.errors: one class per wire code, and back (ARCHITECTURE 4)."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from licd_client import errors
from licd_client.errors import (
    REGISTRY,
    ClientError,
    ConnectionLost,
    Internal,
    LicdError,
    ProtocolViolation,
    SeatsExhausted,
    TokenInvalid,
    from_wire,
)

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
