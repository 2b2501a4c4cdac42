"""Domain events: what happened to seats and licences, told to whoever listens.

The service publishes one `Event` per committed change (checkout, checkin, reclaim,
revoke, licence edit, reload) and per denial. The audit log is written with the change
itself, in the same transaction; metrics, alerts and logs subscribe here. Subscribers
are called synchronously on the event loop and must not block or raise.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from licd_client.messages import Holder

log = logging.getLogger(__name__)


class Kind(enum.Enum):
    CHECKOUT = "checkout"
    CHECKIN = "checkin"
    RECLAIM = "reclaim"  # a lease lapsed without a checkin: its holder went silent
    REVOKE = "revoke"
    DENIED = "denied"  # a checkout refused; `reason` is the error code
    LICENCE_ADDED = "licence_added"
    LICENCE_UPDATED = "licence_updated"
    LICENCE_REMOVED = "licence_removed"
    RELOAD = "reload"
    RELOAD_FAILED = "reload_failed"


@dataclass(frozen=True)
class Event:
    kind: Kind
    time: float  # wall clock
    licence: str | None = None  # licence id (never the key)
    handle: str | None = None  # lease handle (never the secret)
    host: str | None = None
    hostid: str | None = None
    user: str | None = None
    ip: str | None = None
    seats: int | None = None
    reason: str | None = None  # denial code, revoke reason, reload error
    admin_uid: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)


def holder_event(
    kind: Kind,
    time: float,
    *,
    licence: str,
    handle: str,
    holder: Holder,
    ip: str | None,
    seats: int,
    **extra: Any,
) -> Event:
    """An event about one holder's lease (local, or relayed upstream by a router)."""
    return Event(
        kind=kind,
        time=time,
        licence=licence,
        handle=handle,
        host=holder.host,
        hostid=holder.hostid,
        user=holder.user,
        ip=ip,
        seats=seats,
        **extra,
    )


Subscriber = Callable[[Event], None]


class EventBus:
    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.append(subscriber)

    def publish(self, event: Event) -> None:
        for subscriber in self._subscribers:
            try:
                subscriber(event)
            except Exception:  # one broken listener must not break the request
                log.exception("event=subscriber_failed kind=%s", event.kind.value)
