"""The seat book: a unit holds as many seats as its largest lease, counted once."""

from __future__ import annotations

from licd.engine import Lease
from licd.engine.seats import SeatBook
from tests.support import holder


def lease(handle: str, seats: int, unit: str = "h:one") -> Lease:
    return Lease(
        secret=f"s-{handle}",
        handle=handle,
        licence_id="lic",
        holder=holder(),
        request=handle,
        seats=seats,
        ttl=60.0,
        created=0.0,
        expires=60.0,
        last_heartbeat=0.0,
        unit=unit,
    )


def test_a_unit_holds_its_largest_lease_and_frees_seats_as_they_go() -> None:
    book = SeatBook()
    big1, big2, small = lease("a", 3), lease("b", 3), lease("c", 1)
    for x in (big1, small, big2):
        book.add(x)
    book.add(lease("other", 2, unit="h:two"))
    assert book.in_use("lic") == 3 + 2
    assert book.leases_in("lic", "h:one") == 3
    # Two leases of the largest size: removing one frees nothing.
    assert book.freed_by(big1) == 0
    assert book.freed_by(small) == 0
    book.remove(big1)
    assert book.held("lic", "h:one") == 3
    # The last of the largest: the unit falls back to its next size.
    assert book.freed_by(big2) == 2
    book.remove(big2)
    assert book.held("lic", "h:one") == 1
    assert book.in_use("lic") == 1 + 2
    assert book.freed_by(small) == 1
    book.remove(small)
    assert book.held("lic", "h:one") == 0
    assert book.leases_in("lic", "h:one") == 0
    assert book.in_use("lic") == 2
    book.remove(small)  # not counted any more: nothing changes
    assert book.in_use("lic") == 2


def test_a_lease_not_in_the_book_frees_nothing() -> None:
    book = SeatBook()
    counted = lease("a", 2)
    book.add(counted)
    impostor = lease("a", 2)  # same handle, another lease object
    assert book.freed_by(impostor) == 0
    book.remove(impostor)
    assert book.in_use("lic") == 2
