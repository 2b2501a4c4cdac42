"""Domain events as values: what happened to seats and licences (`Event`, its `Kind`).

Plain frozen data, so every layer above the engine may hold them: the service publishes
them on the bus (`licd.core.events`), the store writes them to the audit log, metrics
and alerts read them. Nothing here publishes, stores or logs.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from licd_client.messages import Holder


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
    ENTITLEMENT_IMPORTED = "entitlement_imported"  # a vendor's entitlement took effect
    CLOCK_ROLLBACK = "clock_rollback"  # the wall clock was set back past the skew
    CLOCK_RESTORED = "clock_restored"  # ... and is right again
    RENEWAL_FAILED = "renewal_failed"  # a router's block went unrenewed too long
    SITE_USAGE = "site_usage"  # a site router reported its use of a block (a vendor's log)
    QUEUED = "queued"  # a checkout joined a licence's queue (no seat was free)
    QUEUE_LEFT = "queue_left"  # a queued checkout left without a seat (gone, refused)
    LINGER_ENDED = "linger_ended"  # a checked-in seat kept for its holder (linger) is free


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


def with_app(detail: dict[str, Any], holder: Holder) -> dict[str, Any]:
    """`detail` with the holder's `app`, when it sent one: the audit log's columns have
    no app (`licd report usage --by app` reads it there)."""
    if holder.app is not None:
        detail["app"] = holder.app
    return detail


def holder_event(
    kind: Kind,
    time: float,
    *,
    licence: str,
    handle: str,
    holder: Holder,
    ip: str | None,
    seats: int,
    detail: dict[str, Any] | None = None,
    **extra: Any,
) -> Event:
    """An event about one holder's lease (local, or relayed upstream by a router). A
    checkout's detail names the holder's `app`, when it sent one: the audit log's
    columns have no app (`licd report usage --by app` reads it there)."""
    detail = dict(detail or {})
    if holder.app is not None and kind is Kind.CHECKOUT:
        with_app(detail, holder)
    # Positional, in the order of the fields: keywords to a class cost a dict per event.
    return Event(
        kind,
        time,
        licence,
        handle,
        holder.host,
        holder.hostid,
        holder.user,
        ip,
        seats,
        detail=detail,
        **extra,
    )
