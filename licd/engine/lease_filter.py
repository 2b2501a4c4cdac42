"""Which leases an admin means: those of a licence, a host or a user, a page at a time.

One rule for `licd leases` (the daemon's own leases and a router's forwarded ones) and
`licd revoke --host/--user`: a criterion left out (None) matches every lease, and those
given must all match. Pages are in handle order; the next starts after the last handle
of the one before.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from licd_client.messages import Holder


class Listed(Protocol):
    """A lease as the filter sees it: an engine `Lease`, a router's forwarded one."""

    @property
    def handle(self) -> str: ...
    @property
    def licence_id(self) -> str: ...
    @property
    def holder(self) -> Holder: ...


L = TypeVar("L", bound=Listed)


@dataclass(frozen=True, slots=True)
class LeaseFilter:
    """The leases of `licence`, of `host`, of `user`, with a handle after `after`."""

    licence: str | None = None
    host: str | None = None
    user: str | None = None
    after: str | None = None

    def matches(self, lease: Listed) -> bool:
        return (
            (self.licence is None or lease.licence_id == self.licence)
            and (self.host is None or lease.holder.host == self.host)
            and (self.user is None or lease.holder.user == self.user)
            and (self.after is None or lease.handle > self.after)
        )

    def page(self, leases: Iterable[L], limit: int) -> tuple[list[L], str | None]:
        """The first `limit` matching leases in handle order (of equal handles, the one
        given first), and the handle the next page starts after: None when none is left."""
        first = heapq.nsmallest(
            limit + 1, (x for x in leases if self.matches(x)), key=lambda x: x.handle
        )
        if len(first) <= limit:
            return first, None
        page = first[:limit]
        return page, page[-1].handle if page else None
