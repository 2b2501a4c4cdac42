"""Seat accounting: which leases share a seat, and how many seats a licence has in use.

A lease belongs to one *unit*, chosen by the licence's `count_by` when it is granted:
every lease its own (`lease`), or all leases of one machine (`host`, by hostid), one
user (`user`) or one user on one machine (`host_user`). A unit holds as many seats as
its largest lease; a licence's seats in use are the sum over its units. So the shared
seat is freed only when the last lease of its unit goes. Pure bookkeeping, no rules.
"""

from __future__ import annotations

from collections.abc import Callable

from licd_client.messages import Holder

from .lease import Lease


def unit_key(count_by: str, holder: Holder, handle: str) -> str:
    if count_by == "host":
        return "h:" + holder.hostid
    if count_by == "user":
        return "u:" + holder.user
    if count_by == "host_user":
        return f"hu:{holder.hostid}\0{holder.user}"
    return "l:" + handle


class SeatBook:
    def __init__(self) -> None:
        self._units: dict[str, dict[str, list[Lease]]] = {}  # licence id -> unit -> leases
        self._in_use: dict[str, int] = {}

    def in_use(self, licence_id: str) -> int:
        return self._in_use.get(licence_id, 0)

    def held(self, licence_id: str, unit: str) -> int:
        """Seats the unit holds now (0 if it holds none)."""
        leases = self._units.get(licence_id, {}).get(unit)
        return max((x.seats for x in leases), default=0) if leases else 0

    def add(self, lease: Lease) -> None:
        lid = lease.licence_id
        units = self._units.get(lid)
        if units is None:
            units = self._units[lid] = {}
        leases = units.get(lease.unit)
        if leases is None:  # the usual case: a unit of its own
            units[lease.unit] = [lease]
            grown = lease.seats
        else:
            grown = lease.seats - max(x.seats for x in leases)
            leases.append(lease)
        if grown > 0:
            self._in_use[lid] = self._in_use.get(lid, 0) + grown

    def remove(self, lease: Lease) -> None:
        units = self._units.get(lease.licence_id)
        if units is None:
            return
        leases = units.get(lease.unit)
        if not leases or lease not in leases:
            return
        freed = self.freed_by(lease)
        if len(leases) == 1:
            del units[lease.unit]
        else:
            leases.remove(lease)
        if freed:
            self._in_use[lease.licence_id] -= freed

    def freed_by(self, lease: Lease) -> int:
        """Seats that removing `lease` would free (0 while its unit keeps the seat)."""
        units = self._units.get(lease.licence_id)
        leases = units.get(lease.unit) if units else None
        if not leases or lease not in leases:
            return 0
        if len(leases) == 1:
            return lease.seats
        others = max(x.seats for x in leases if x is not lease)
        return max(0, lease.seats - others)

    def usage(self, licence_id: str, where: Callable[[Lease], bool]) -> int:
        """Seats held by the units with at least one lease for which `where` holds."""
        return sum(
            max(x.seats for x in leases)
            for leases in self._units.get(licence_id, {}).values()
            if any(where(x) for x in leases)
        )

    def forget(self, licence_id: str) -> None:
        self._units.pop(licence_id, None)
        self._in_use.pop(licence_id, None)
