"""The lease filter: which leases an admin means, and the pages `licd leases` shows."""

from __future__ import annotations

from licd.clock import ManualClock
from licd.engine import SeatLease
from licd.engine.lease_filter import LeaseFilter
from licd.store.records import Forwarded
from tests.support import DICOM, holder, new_engine


def forwarded(
    handle: str, licence: str = "dicom-hq", host: str = "ws-1", user: str = "alice"
) -> Forwarded:
    return Forwarded(
        secret=f"s-{handle}",
        handle=handle,
        licence_id=licence,
        holder=holder(host, user=user),
        ip=None,
        seats=1,
        created=0.0,
        expires=90.0,
    )


LEASES = [
    forwarded("a1", licence="cad", host="ws-1", user="alice"),
    forwarded("b2", licence="dicom-hq", host="ws-1", user="bob"),
    forwarded("c3", licence="dicom-hq", host="ws-2", user="alice"),
    forwarded("d4", licence="dicom-hq", host="ws-2", user="bob"),
]


def chosen(f: LeaseFilter) -> list[str]:
    return [x.handle for x in LEASES if f.matches(x)]


def test_each_criterion_given_must_match() -> None:
    assert chosen(LeaseFilter()) == ["a1", "b2", "c3", "d4"]  # none given: every lease
    assert chosen(LeaseFilter(licence="dicom-hq")) == ["b2", "c3", "d4"]
    assert chosen(LeaseFilter(host="ws-1")) == ["a1", "b2"]
    assert chosen(LeaseFilter(user="alice")) == ["a1", "c3"]
    assert chosen(LeaseFilter(after="b2")) == ["c3", "d4"]  # strictly after
    assert chosen(LeaseFilter(licence="dicom-hq", host="ws-2", user="bob")) == ["d4"]
    assert chosen(LeaseFilter(licence="dicom-hq", host="ws-1", user="alice")) == []


def test_pages_go_in_handle_order_and_say_where_the_next_starts() -> None:
    shuffled = [LEASES[2], LEASES[0], LEASES[3], LEASES[1]]
    page, after = LeaseFilter().page(shuffled, 3)
    assert ([x.handle for x in page], after) == (["a1", "b2", "c3"], "c3")
    page, after = LeaseFilter(after=after).page(shuffled, 3)
    assert ([x.handle for x in page], after) == (["d4"], None)
    # A page that holds exactly what is left is the last one.
    page, after = LeaseFilter(licence="dicom-hq").page(shuffled, 3)
    assert ([x.handle for x in page], after) == (["b2", "c3", "d4"], None)
    assert LeaseFilter(user="carol").page(shuffled, 3) == ([], None)


def test_a_page_mixes_the_engines_leases_with_forwarded_ones() -> None:
    clock = ManualClock()
    engine = new_engine([DICOM])
    for host in ("ws-1", "ws-2"):
        grant = engine.checkout(DICOM.key, holder(host), request=host, at=clock.now())
        engine.confirm(grant.lease)
    mine = engine.leases
    upstream = [forwarded(x.handle + "x", host=x.holder.host) for x in mine]
    everything: list[SeatLease | Forwarded] = [*mine, *upstream]
    page, after = LeaseFilter(host="ws-2").page(everything, 10)
    ws2 = next(x for x in mine if x.holder.host == "ws-2")
    assert [(type(x), x.handle) for x in page] == [
        (SeatLease, ws2.handle),
        (Forwarded, ws2.handle + "x"),
    ]
    assert after is None
