"""Seat accounting: which leases share a seat, and how many seats a licence has in use.

A lease belongs to one *unit*, chosen by the licence's `count_by` when it is granted:
every lease its own (`lease`), or all leases of one machine (`host`, by hostid), one
user (`user`) or one user on one machine (`host_user`). A unit holds as many seats as
its largest lease; a licence's seats in use are the sum over its units. So the shared
seat is freed only when the last lease of its unit goes. Pure bookkeeping, no rules.

Every operation but `usage` costs O(1) whatever a unit holds: a unit keeps its leases in
a dict and a tally of their sizes, and its largest size is recomputed from the tally's
few distinct sizes only when the last lease of that size goes.
"""

from __future__ import annotations

from collections.abc import Callable

from licd.engine.lease import SeatLease
from licd_client.messages import Holder


def unit_key(count_by: str, holder: Holder, handle: str) -> str:
    if count_by == "host":
        return "h:" + holder.hostid
    if count_by == "user":
        return "u:" + holder.user
    if count_by == "host_user":
        return f"hu:{holder.hostid}\0{holder.user}"
    return "l:" + handle


class _Unit:
    """The leases sharing one seat, and the seats they hold together (the largest)."""

    __slots__ = ("leases", "sizes", "seats")

    def __init__(self) -> None:
        self.leases: dict[str, SeatLease] = {}  # by handle
        self.sizes: dict[int, int] = {}  # lease seats -> how many leases
        self.seats = 0

    def add(self, lease: SeatLease) -> None:
        self.leases[lease.handle] = lease
        self.sizes[lease.seats] = self.sizes.get(lease.seats, 0) + 1
        if lease.seats > self.seats:
            self.seats = lease.seats

    def remove(self, lease: SeatLease) -> None:
        del self.leases[lease.handle]
        left = self.sizes[lease.seats] - 1
        if left:
            self.sizes[lease.seats] = left
            return
        del self.sizes[lease.seats]
        if lease.seats == self.seats:
            self.seats = max(self.sizes) if self.sizes else 0

    def without(self, lease: SeatLease) -> int:
        """The seats the unit would hold without `lease`."""
        if lease.seats < self.seats or self.sizes[lease.seats] > 1:
            return self.seats
        if len(self.sizes) == 1:  # its size is the only one: nothing is left
            return 0
        return max(n for n in self.sizes if n != lease.seats)


class SeatBook:
    def __init__(self) -> None:
        self._units: dict[str, dict[str, _Unit]] = {}  # licence id -> unit key -> unit
        self._in_use: dict[str, int] = {}

    def in_use(self, licence_id: str) -> int:
        return self._in_use.get(licence_id, 0)

    def held(self, licence_id: str, unit: str) -> int:
        """Seats the unit holds now (0 if it holds none)."""
        found = self._units.get(licence_id, {}).get(unit)
        return found.seats if found is not None else 0

    def leases_in(self, licence_id: str, unit: str) -> int:
        """How many leases the unit has."""
        found = self._units.get(licence_id, {}).get(unit)
        return len(found.leases) if found is not None else 0

    def add(self, lease: SeatLease) -> None:
        lid = lease.licence_id
        units = self._units.setdefault(lid, {})
        unit = units.get(lease.unit)
        if unit is None:
            unit = units[lease.unit] = _Unit()
        before = unit.seats
        unit.add(lease)
        if unit.seats > before:
            self._in_use[lid] = self._in_use.get(lid, 0) + unit.seats - before

    def remove(self, lease: SeatLease) -> None:
        unit = self._unit_of(lease)
        if unit is None:
            return
        before = unit.seats
        unit.remove(lease)
        if not unit.leases:
            del self._units[lease.licence_id][lease.unit]
        if unit.seats < before:
            self._in_use[lease.licence_id] -= before - unit.seats

    def freed_by(self, lease: SeatLease) -> int:
        """Seats that removing `lease` would free (0 while its unit keeps the seat)."""
        unit = self._unit_of(lease)
        return 0 if unit is None else unit.seats - unit.without(lease)

    def usage(self, licence_id: str, where: Callable[[SeatLease], bool]) -> int:
        """Seats held by the units with at least one lease for which `where` holds. A
        scan of the licence's units: only the `max` and `reserve` policies ask."""
        return sum(
            unit.seats
            for unit in self._units.get(licence_id, {}).values()
            if any(where(x) for x in unit.leases.values())
        )

    def forget(self, licence_id: str) -> None:
        self._units.pop(licence_id, None)
        self._in_use.pop(licence_id, None)

    def _unit_of(self, lease: SeatLease) -> _Unit | None:
        """The unit `lease` is counted in, or None when it is not counted."""
        unit = self._units.get(lease.licence_id, {}).get(lease.unit)
        if unit is None or unit.leases.get(lease.handle) is not lease:
            return None
        return unit
