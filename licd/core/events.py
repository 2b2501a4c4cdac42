"""The event bus: domain events told to whoever listens.

The service publishes one `Event` per committed change (checkout, checkin, reclaim,
revoke, licence edit, reload) and per denial. The audit log is written with the change
itself, in the same transaction; metrics, alerts and logs subscribe here. Subscribers
are called synchronously on the event loop and must not block or raise. The events
themselves are plain values of the engine layer (`licd.engine.events`), so the store,
which sits below the core, writes them too; they are re-exported here with the bus.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from licd.engine.events import Event, Kind, holder_event

__all__ = ["Event", "EventBus", "Kind", "Subscriber", "holder_event"]

log = logging.getLogger(__name__)

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
