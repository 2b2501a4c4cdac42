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
        units = self._units.setdefault(lease.licence_id, {})
        before = self.held(lease.licence_id, lease.unit)
        units.setdefault(lease.unit, []).append(lease)
        self._in_use[lease.licence_id] = self.in_use(lease.licence_id) + max(
            0, lease.seats - before
        )

    def remove(self, lease: Lease) -> None:
        units = self._units.get(lease.licence_id, {})
        leases = units.get(lease.unit)
        if not leases or lease not in leases:
            return
        before = self.held(lease.licence_id, lease.unit)
        leases.remove(lease)
        if not leases:
            del units[lease.unit]
        after = self.held(lease.licence_id, lease.unit)
        self._in_use[lease.licence_id] = self.in_use(lease.licence_id) - (before - after)

    def freed_by(self, lease: Lease) -> int:
        """Seats that removing `lease` would free (0 while its unit keeps the seat)."""
        leases = self._units.get(lease.licence_id, {}).get(lease.unit, [])
        others = max((x.seats for x in leases if x is not lease), default=0)
        return max(0, self.held(lease.licence_id, lease.unit) - others)

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
