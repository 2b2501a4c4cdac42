"""The one error map: what an exception is told as, to whom, and whether it ends the
connection, for the TCP protocol (`dispatch`, `server`) and the admin socket alike.

A LicdError is told as itself; a ConfigError (an admin's licence edit or reload) as
`bad_request` saying what is wrong; a StoreError as `unavailable`, in words fit for the
audience (a client gets the protocol's, an administrator is told nothing was changed)
and its own logged; anything else as `internal`, its text logged, never sent. A
StoreError becomes a LicdError here and nowhere else: callers let it propagate, or (a
licence edit, told to a person) name what failed with `store_failure_as_unavailable`.
After an error of `CLOSING` the stream or the client is broken: the connection closes.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections.abc import Iterator
from typing import Any

from licd.config.settings import ConfigError
from licd.store.base import StoreError
from licd_client.errors import (
    BadRequest,
    FrameTooLarge,
    HelloRequired,
    Internal,
    LicdError,
    Unavailable,
)
from licd_client.messages import error_frame

log = logging.getLogger(__name__)


class Audience(enum.Enum):
    """Who is told: a client on the TCP protocol, or a person at the admin socket."""

    CLIENT = "client"
    ADMIN = "admin"


#: Errors after which the connection is closed: the stream or the client is broken.
CLOSING: tuple[type[LicdError], ...] = (BadRequest, FrameTooLarge, HelloRequired)

#: What an administrator whose request the database failed is told (the log says why).
ADMIN_UNAVAILABLE = "the database failed: nothing was changed (the daemon's log says why)"


def wire_error(exc: BaseException, audience: Audience, op: object = None) -> LicdError:
    """The LicdError `exc` is told to `audience` as; a StoreError or an unexpected error
    is logged here (with `op`, the request's op), since its own text is not sent."""
    if isinstance(exc, LicdError):
        return exc
    if isinstance(exc, ConfigError):
        return BadRequest(str(exc))
    if isinstance(exc, StoreError):
        log.error("event=store_error op=%r error=%r", op, str(exc))
        return Unavailable(ADMIN_UNAVAILABLE if audience is Audience.ADMIN else None)
    log.error("event=internal_error op=%r", op, exc_info=exc)
    return Internal()


def closes(exc: BaseException) -> bool:
    """Whether the connection is closed after telling `exc`: a broken stream or client,
    never an error the map converted (an admin's bad edit, a database failure)."""
    return isinstance(exc, CLOSING)


def error_reply(
    rid: int | None, exc: BaseException, audience: Audience, op: object = None
) -> tuple[dict[str, Any], bool]:
    """The error frame for `exc` (request id `rid`) and whether to close after it."""
    return error_frame(rid, wire_error(exc, audience, op)), closes(exc)


@contextlib.contextmanager
def store_failure_as_unavailable(failure: str) -> Iterator[None]:
    """A StoreError inside becomes `unavailable` saying `failure` and the database's
    words: for work whose callers handle LicdErrors only and report them to a person
    (a licence edit: by the admin socket, a reload, the start)."""
    try:
        yield
    except StoreError as exc:
        raise Unavailable(f"{failure}: {exc}") from None
