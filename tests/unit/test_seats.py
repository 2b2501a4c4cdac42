"""The seat book on its own: the unit each `count_by` puts a lease in, a unit holding as
many seats as its largest lease (counted once), release, usage and forgetting a licence."""

from __future__ import annotations

import pytest

from licd.engine import SeatLease
from licd.engine.seats import SeatBook, unit_key
from licd_client.messages import Holder
from tests.support import holder


def lease(handle: str, seats: int, unit: str = "h:one", licence_id: str = "lic") -> SeatLease:
    return SeatLease(
        secret=f"s-{handle}",
        handle=handle,
        licence_id=licence_id,
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


# ------------------------------------------------------------------ units (count_by)


@pytest.mark.parametrize(
    ("count_by", "key"),
    [
        ("lease", "l:h-1"),
        ("host", "h:id-ws-1"),
        ("user", "u:alice"),
        ("host_user", "hu:id-ws-1\0alice"),
        ("anything else", "l:h-1"),  # the config admits the four; the rest: per lease
    ],
)
def test_the_unit_key_of_each_count_by(count_by: str, key: str) -> None:
    """The key is stored with its lease (the `unit` column): its spelling is on disk."""
    assert unit_key(count_by, holder("ws-1", user="alice"), "h-1") == key


def test_what_shares_a_unit_under_each_count_by() -> None:
    a = holder("ws-1", user="alice")
    renamed = Holder("ws-1.example", a.hostid, "alice", 1)  # same machine, another name
    bob_there = holder("ws-1", user="bob")
    alice_elsewhere = holder("ws-2", user="alice")

    def shared(count_by: str, other: Holder) -> bool:
        return unit_key(count_by, a, "h-1") == unit_key(count_by, other, "h-2")

    assert not shared("lease", a)  # every lease its own, even one holder's
    assert shared("host", renamed) and shared("host", bob_there)
    assert not shared("host", alice_elsewhere)
    assert shared("user", alice_elsewhere) and not shared("user", bob_there)
    assert shared("host_user", renamed)
    assert not shared("host_user", bob_there) and not shared("host_user", alice_elsewhere)


def test_a_user_named_like_a_machine_is_another_unit() -> None:
    """Each count_by has its own prefix, and host_user separates its two names."""
    named_like = Holder("ws", "x", "x", 1)
    assert unit_key("host", named_like, "h") != unit_key("user", named_like, "h")
    assert unit_key("host_user", Holder("ws", "ab", "c", 1), "h") != unit_key(
        "host_user", Holder("ws", "a", "bc", 1), "h"
    )


# ---------------------------------------------------------------- adding and releasing


def test_a_unit_grows_to_its_largest_lease_and_the_licence_by_the_difference() -> None:
    book = SeatBook()
    book.add(lease("a", 1))
    assert (book.held("lic", "h:one"), book.in_use("lic")) == (1, 1)
    book.add(lease("b", 1))  # as large as the unit: shares its seat
    assert (book.held("lic", "h:one"), book.in_use("lic")) == (1, 1)
    book.add(lease("c", 4))  # larger: the unit holds 4, the licence 3 more
    assert (book.held("lic", "h:one"), book.in_use("lic")) == (4, 4)
    book.add(lease("d", 2))  # between: nothing more
    assert (book.held("lic", "h:one"), book.in_use("lic")) == (4, 4)
    assert book.leases_in("lic", "h:one") == 4


def test_releasing_leases_of_three_sizes_one_by_one() -> None:
    book = SeatBook()
    big, small, middle = lease("a", 3), lease("b", 1), lease("c", 2)
    for x in (big, small, middle):
        book.add(x)
    assert book.freed_by(small) == 0
    assert book.freed_by(big) == 1  # down to the next largest
    book.remove(big)
    assert (book.held("lic", "h:one"), book.in_use("lic")) == (2, 2)
    book.remove(small)  # the only lease of its size, not the largest: frees nothing
    assert (book.held("lic", "h:one"), book.in_use("lic")) == (2, 2)
    assert book.freed_by(middle) == 2  # the last lease: the whole seat
    book.remove(middle)
    assert (book.held("lic", "h:one"), book.in_use("lic")) == (0, 0)
    assert not book._units["lic"]  # a unit left without leases is not kept


def test_leases_in_counts_a_units_leases_whatever_their_size() -> None:
    """What the engine holds against `leases_per_unit` (test_engine)."""
    book = SeatBook()
    leases = [lease(f"x{n}", 1 + n % 2) for n in range(5)]
    for n, x in enumerate(leases, start=1):
        book.add(x)
        assert book.leases_in("lic", "h:one") == n
    book.add(lease("y", 1, unit="h:two"))
    assert (book.leases_in("lic", "h:one"), book.leases_in("lic", "h:two")) == (5, 1)
    book.remove(leases[0])
    assert book.leases_in("lic", "h:one") == 4
    assert book.in_use("lic") == 2 + 1


def test_licences_and_units_are_counted_apart() -> None:
    book = SeatBook()
    book.add(lease("a", 2))
    book.add(lease("b", 3, licence_id="other"))  # the same unit key, another licence
    assert (book.in_use("lic"), book.in_use("other")) == (2, 3)
    assert (book.held("lic", "h:one"), book.held("other", "h:one")) == (2, 3)
    assert book.leases_in("lic", "h:one") == 1
    # Nothing known: nothing held.
    assert (book.in_use("none"), book.held("none", "h:one"), book.held("lic", "h:zz")) == (0,) * 3
    assert (book.leases_in("none", "h:one"), book.leases_in("lic", "h:zz")) == (0, 0)


# ----------------------------------------------------------------------------- usage


def test_usage_is_the_seats_of_every_unit_with_a_matching_lease() -> None:
    book = SeatBook()
    alice = lease("a", 1)
    alice.holder = holder("ws-1", user="alice")
    bob = lease("b", 3)  # the same unit: alice's one seat is in a unit of 3
    bob.holder = holder("ws-1", user="bob")
    carol = lease("c", 2, unit="h:two")
    carol.holder = holder("ws-2", user="carol")
    for x in (alice, bob, carol):
        book.add(x)

    def usage(user: str) -> int:
        return book.usage("lic", lambda x: x.holder.user == user)

    assert usage("alice") == 3  # the whole unit's seats, not her lease's
    assert usage("carol") == 2
    assert usage("dave") == 0
    assert book.usage("lic", lambda x: True) == book.in_use("lic") == 5
    assert book.usage("none", lambda x: True) == 0


# ---------------------------------------------------------------------------- forget


def test_forget_drops_a_licences_units_and_nothing_else() -> None:
    book = SeatBook()
    gone = lease("a", 2)
    book.add(gone)
    kept = lease("b", 1, licence_id="other")
    book.add(kept)
    book.forget("lic")
    assert book.in_use("lic") == book.held("lic", "h:one") == book.leases_in("lic", "h:one") == 0
    assert book.usage("lic", lambda x: True) == 0
    assert book.freed_by(gone) == 0
    book.remove(gone)  # no longer counted: nothing happens
    assert (book.in_use("lic"), book.in_use("other")) == (0, 1)
    book.forget("never-known")  # nothing to forget: no error
    book.add(gone)  # counted afresh
    assert book.in_use("lic") == 2
