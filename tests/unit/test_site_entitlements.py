"""A site's entitlements (licd/core/entitlements.py) over a real store, engine, service and
signer, beyond tests/unit/test_entitlement_import.py: the audit entry's and listing's
fields, a refused file leaving a served licence as it was (each reason), what a lenient
import still refuses, a renewal without its key keeping the narrowing, removal down to the
store, what the check at start drops, the renewal request; and the two bugs it found,
fixed (a removed licence's own file, a licence twice in a file whatever the order)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import SigningKey

from licd.clock import ManualClock
from licd.core.entitlements import EntitlementRefused, Entitlements
from licd.core.events import Event, Kind
from licd.core.keys import Signer
from licd.core.service import LicenceService
from licd.engine import Licence
from licd.engine.entitlement import vendor_licence
from licd.store.base import Store
from licd.store.records import AuditEntry
from licd_client import entitlements as ents
from licd_client.statements import fingerprint
from licd_client.terms import AddonTerm, Binding, Terms
from tests.support import new_engine
from tests.unit.test_store import running

NOW = 1_790_000_000.0
DAY = 86400.0
SITE = ("machine:m1", "mac:aa", "host:plm")
VENDOR = SigningKey.generate()
DAEMON = SigningKey.generate()


def terms(licence_id: str = "plm", key: str = "PLM-1", **kw: Any) -> Terms:
    base = Terms(
        licence_id=licence_id,
        key_hash=ents.key_hash(key),
        product="plm",
        seats=8,
        expires=NOW + 10 * DAY,
        sequence=1,
    )
    return dataclasses.replace(base, **kw)


def signed(
    t: Terms, *, vendor: SigningKey = VENDOR, daemon: bytes | None = None
) -> ents.Entitlement:
    return ents.issue(vendor, daemon or bytes(DAEMON.verify_key), NOW - 60, t)


Item = tuple[str | None, Terms | ents.Entitlement]


def file_of(*items: Item) -> str:
    return ents.write_file(
        [(key, x if isinstance(x, ents.Entitlement) else signed(x)) for key, x in items]
    )


class Site:
    """A daemon's store, clock, signer, service and entitlements, built in its order."""

    def __init__(self, store: Store, clock: ManualClock | None = None, key: SigningKey = DAEMON):
        self.store, self.clock = store, clock or ManualClock(wall=NOW)
        self.signer = Signer(key, "plant-9")
        self.declared: set[str] = set()

    async def start(self, keys: Iterable[bytes] = (bytes(VENDOR.verify_key),)) -> Entitlements:
        self.ents = Entitlements(  # declared: what self.declared holds at each import
            self.store, self.signer, vendor_keys=keys, components=SITE, declared=self.declared.copy
        )
        self.loaded = await self.ents.load({x.id: x for x in await self.store.load_licences()})
        self.service = LicenceService(new_engine(self.loaded.values()), self.store, self.clock)
        self.ents.install(self.service)
        return self.ents

    def licence(self, licence_id: str = "plm") -> Licence | None:
        return self.service.engine.licence_by_id(licence_id)

    async def imported(self) -> list[AuditEntry]:
        await self.store.barrier()
        entries = await self.store.audit(limit=1000)
        return [x for x in entries if x.event.kind is Kind.ENTITLEMENT_IMPORTED]

    async def snapshot(self) -> tuple[object, ...]:
        """Everything an import changes."""
        return (
            self.service.engine.licences,
            dict(self.service.engine.entitled),
            {k: list(v) for k, v in self.signer.chains.items()},
            dict(self.ents.held),
            dict(self.ents.stored),
            await self.store.load_entitlements(),
            await self.store.load_licences(),
            len(await self.imported()),
        )


def states(e: Entitlements) -> list[tuple[str, str]]:
    return [(x["licence"], x["state"]) for x in e.listing()]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with running(tmp_path / "licd.db") as s:
        yield s


async def test_every_licence_of_a_file_is_served_stored_chained_and_audited(store: Store) -> None:
    site = Site(store)
    e = await site.start()
    plm, cam = signed(terms()), signed(terms("cam", "CAM-1", product="cam", seats=2, sequence=7))
    out = await e.import_text(file_of(("PLM-1", plm), ("CAM-1", cam)), admin_uid=0, source="t")
    assert [(o.licence_id, o.sequence, o.result, o.seats, o.expires) for o in out] == [
        ("plm", 1, "imported", 8, NOW + 10 * DAY),
        ("cam", 7, "imported", 2, NOW + 10 * DAY),
    ]
    for ent, key in ((plm, "PLM-1"), (cam, "CAM-1")):
        licence_id = ent.terms.licence_id
        assert site.licence(licence_id) == vendor_licence(ent.terms, key)  # key included
        assert site.service.engine.entitled[licence_id] == ent.terms
        assert site.signer.chains[licence_id] == [ent.statement]
        assert site.signer.chain_iat[licence_id] == NOW - 60
    rows = [(x.licence_id, x.sequence, x.imported) for x in await store.load_entitlements()]
    assert rows == [("cam", 7, NOW), ("plm", 1, NOW)]
    assert {x.id for x in await store.load_licences()} == {"plm", "cam"}
    entries = await site.imported()
    events = [(x.event.licence, x.event.seats, x.event.time, x.event.admin_uid) for x in entries]
    assert events == [("plm", 8, NOW, 0), ("cam", 2, NOW, 0)]
    assert entries[1].event.detail == {
        "source": "t",
        "sequence": 7,
        "vendor": fingerprint(bytes(VENDOR.verify_key)),
        "expires": NOW + 10 * DAY,
        "product": "cam",
        "seats_granted": 2,
    }
    # The same file again: nothing to do, nothing written; with a new one beside it,
    # only that one is imported.
    again = await e.import_text(file_of(("PLM-1", plm), ("CAM-1", cam)))
    assert [o.result for o in again] == ["unchanged", "unchanged"]
    newer = file_of(("PLM-1", plm), (None, terms("cam", "CAM-1", product="cam", sequence=8)))
    assert [o.result for o in await e.import_text(newer)] == ["unchanged", "imported"]
    assert [x.event.licence for x in await site.imported()] == ["plm", "cam", "cam"]


def tampered(t: Terms) -> ents.Entitlement:
    ent = signed(t)
    return dataclasses.replace(ent, statement=ent.statement[:-1] + bytes([ent.statement[-1] ^ 1]))


BAD: dict[str, tuple[Item, str]] = {
    "binding": (("CAM-1", terms("cam", "CAM-1", binding=Binding(("x:1", "x:2"), 1))),
                "licence 'cam': the site binding failed: 0 of the 2 host-id components"),
    "expired": (("CAM-1", terms("cam", "CAM-1", expires=NOW - 1)),
                "licence 'cam': it expired on 2026-09-21"),
    "another vendor": (("CAM-1", signed(terms("cam", "CAM-1"), vendor=SigningKey.generate())),
                       "not signed by a trusted vendor key"),
    "edited key": (("CAM-2", terms("cam", "CAM-1")),
                   "licence 'cam': the licence key is not the one the vendor signed"),
    "tampered": (("CAM-1", tampered(terms("cam", "CAM-1"))), "the entitlement does not verify"),
    "stale": (("OLD-1", terms("old", "OLD-1", sequence=4)), "licence 'old': its sequence 4 is not"),
    "key served": (("PLM-1", terms("cam", "PLM-1")),
                   "licence 'cam': licence 'plm' already has this licence key"),
    "key in the file": (("NEW-1", terms("cam", "NEW-1")),
                        "licence 'cam': licence 'new' already has this licence key"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD)
async def test_a_refused_file_leaves_a_served_licence_as_it_was(store: Store, case: str) -> None:
    site = Site(store)
    e = await site.start()
    await e.import_text(file_of(("PLM-1", terms()), ("OLD-1", terms("old", "OLD-1", sequence=5))))
    before = await site.snapshot()
    renewal = ("PLM-1", terms(sequence=2, seats=20))  # valid, and first in the file
    new = ("NEW-1", terms("new", "NEW-1"))
    bad, reason = BAD[case]
    with pytest.raises(EntitlementRefused, match=reason):
        await e.import_text(file_of(renewal, new, bad))
    assert await site.snapshot() == before


async def test_a_lenient_import_skips_only_what_is_stale_or_expired(store: Store) -> None:
    site = Site(store)
    e = await site.start()
    await e.import_text(file_of(("PLM-1", terms(sequence=4))))
    text = file_of(
        ("PLM-1", terms(sequence=3)),
        ("OLD-1", terms("old", "OLD-1", expires=NOW - 1)),
        ("CAM-1", terms("cam", "CAM-1", seats=2)),
    )
    out = await e.import_text(text, lenient=True, source="file x")
    assert [(o.licence_id, o.result.split(":")[0], o.seats) for o in out] == [
        ("plm", "skipped", 8),  # the seats it serves
        ("old", "skipped", 0),  # it serves none
        ("cam", "imported", 2),
    ]
    assert out[0].result == (
        "skipped: its sequence 3 is not above 4, the last imported for licence 'plm': an "
        "older entitlement cannot replace a newer one"
    )
    assert out[1].result.startswith("skipped: it expired on")
    assert site.licence("old") is None and site.service.engine.entitled["plm"].sequence == 4
    assert [x.event.detail["source"] for x in await site.imported()][-1] == "file x"
    refusals: list[tuple[Item, str]] = [
        (("X-1", signed(terms("x", "X-1"), daemon=b"\x05" * 32)), "for another daemon"),
        (("X-1", terms("x", "X-1", binding=Binding(("x:1",), 1))), "site binding failed"),
        ((None, terms("x", "X-1")), "holds no licence key"),
    ]
    for refused, reason in refusals:
        with pytest.raises(EntitlementRefused, match=reason):
            await e.import_text(file_of(refused), lenient=True)
    assert site.licence("x") is None


async def test_a_renewal_without_the_key_keeps_the_sites_narrowing(store: Store) -> None:
    site = Site(store)
    e = await site.start()
    await e.import_text(file_of(("PLM-1", terms(max_ttl=600.0))))
    served = site.licence()
    assert served is not None
    narrowed = dataclasses.replace(served, seats=5, lease_ttl=300.0, allow=("group:eng",))
    assert await site.service.put_licence(narrowed) == "updated"
    renewal = signed(terms(sequence=2, seats=12, max_ttl=200.0, expires=NOW + 40 * DAY))
    [out] = await e.import_text(file_of((None, renewal)))
    assert (out.result, out.seats) == ("imported", 5)
    lic = site.licence()
    assert lic is not None and lic.key == "PLM-1"
    assert (lic.seats, lic.lease_ttl, lic.allow) == (5, 200.0, ("group:eng",))
    assert lic.expires == NOW + 40 * DAY
    assert site.service.engine.entitled["plm"] == renewal.terms
    assert site.signer.chains["plm"] == [renewal.statement]
    assert await store.load_licences() == [lic]
    # Once the config declares it, no renewal is taken any more.
    site.declared.add("plm")
    with pytest.raises(EntitlementRefused, match="'plm' is declared in the config file"):
        await e.import_text(file_of((None, terms(sequence=3))))


async def test_a_removed_licence_is_dropped_down_to_the_store(store: Store) -> None:
    site = Site(store)
    e = await site.start()
    await e.import_text(file_of(("PLM-1", terms(sequence=2)), ("CAM-1", terms("cam", "CAM-1"))))
    await site.service.remove_licence("plm")
    assert "plm" not in e.held and "plm" not in site.service.engine.entitled
    assert "plm" not in site.signer.chains and "plm" not in site.signer.chain_iat
    assert e.stored["plm"].removed and not e.stored["cam"].removed
    rows = [(x.licence_id, x.sequence, x.removed) for x in await store.load_entitlements()]
    assert rows == [("cam", 1, False), ("plm", 2, True)]
    with pytest.raises(EntitlementRefused, match="sequence 2 is not above 2"):
        await e.import_text(file_of(("PLM-1", terms(sequence=2, seats=1))))
    with pytest.raises(EntitlementRefused, match="holds no licence key"):
        await e.import_text(file_of((None, terms(sequence=3))))
    # After a restart it stays removed, and its sequence counted.
    again = Site(store, site.clock)
    e2 = await again.start()
    assert again.licence() is None and "plm" not in e2.held
    assert states(e2) == [("cam", "served"), ("plm", "removed")]
    with pytest.raises(EntitlementRefused, match="sequence 1 is not above 2"):
        await e2.import_text(file_of(("PLM-1", terms(sequence=1))))


async def test_the_removed_file_itself_cannot_be_imported_again(store: Store) -> None:
    site = Site(store)
    e = await site.start()
    text = file_of(("PLM-1", terms(sequence=2)))
    await e.import_text(text)
    await site.service.remove_licence("plm")
    with pytest.raises(EntitlementRefused, match="was removed from this site"):
        await e.import_text(text)


async def test_two_entitlements_for_one_licence_are_refused_whatever_their_order(
    store: Store,
) -> None:
    site = Site(store)
    e = await site.start()
    held = signed(terms(sequence=1))
    await e.import_text(file_of(("PLM-1", held)))
    with pytest.raises(EntitlementRefused, match="two entitlements"):
        await e.import_text(file_of(("PLM-1", terms(sequence=2)), ("PLM-1", held)))
    with pytest.raises(EntitlementRefused, match="two entitlements"):
        await e.import_text(file_of(("PLM-1", held), ("PLM-1", terms(sequence=2))))


async def test_the_check_at_start(store: Store) -> None:
    site = Site(store)
    e = await site.start()
    await e.import_text(file_of(("PLM-1", terms(seats=8)), ("CAM-1", terms("cam", "CAM-1"))))
    await site.service.put_licence(Licence(key="LOCAL-1", id="local", product="x", seats=1))
    cam = site.licence("cam")
    assert cam is not None
    await site.service.put_licence(dataclasses.replace(cam, seats=1, grace=3.0))
    # A hand edit of the stored key of plm: its entitlement no longer matches.
    plm = site.licence()
    assert plm is not None
    await store.put_licence(
        dataclasses.replace(plm, key="EDITED"), Event(Kind.LICENCE_UPDATED, NOW, "plm")
    )
    # Expired by the next start: still served (it serves nothing after its expiry).
    site.clock.advance(11 * DAY)
    again = Site(store, site.clock)
    e2 = await again.start()
    assert set(again.loaded) == {"cam", "local"} and set(e2.held) == {"cam"}
    assert again.licence() is None
    kept = again.licence("cam")
    assert kept is not None and (kept.seats, kept.grace) == (1, 3.0)  # narrowing kept
    assert again.service.engine.entitled["cam"] == e.held["cam"].terms
    assert again.signer.chains == {"cam": [e.held["cam"].statement]}
    assert states(e2) == [("cam", "served"), ("plm", "invalid")]
    # Another daemon key, or another vendor key, over the same store: none of them.
    for other, vendor_keys in (
        (Site(store, site.clock, SigningKey.generate()), [bytes(VENDOR.verify_key)]),
        (Site(store, site.clock), [bytes(SigningKey.generate().verify_key)]),
    ):
        e3 = await other.start(vendor_keys)
        assert set(other.loaded) == {"local"} and e3.held == {} and other.signer.chains == {}
        assert other.service.engine.entitled == {}


async def test_the_listing(store: Store) -> None:
    site = Site(store)
    e = await site.start()
    assert e.listing() == []
    bound = terms(
        seats=4,
        features={"tier": "a"},
        addons=(AddonTerm(3, {"tier": "b"}, NOW, NOW + DAY),),
        binding=Binding(SITE, 2),
        max_ttl=900.0,
        not_before=NOW - DAY,
    )
    plm = signed(bound)
    await e.import_text(file_of(("PLM-1", plm), ("CAM-1", terms("cam", "CAM-1"))))
    await site.service.remove_licence("cam")
    site.clock.advance(DAY / 2)
    assert e.listing() == [
        {"licence": "cam", "sequence": 1, "imported": NOW, "state": "removed"},
        {
            "licence": "plm",
            "sequence": 1,
            "imported": NOW,
            "state": "served",
            "product": "plm",
            "seats_granted": 7,  # with the add-on active now
            "seats": 7,
            "features": {"tier": "b"},
            "not_before": NOW - DAY,
            "expires": NOW + 10 * DAY,
            "days_left": 9.5,
            "max_ttl": 900.0,
            "vendor": bytes(VENDOR.verify_key).hex(),
            "bound": True,
        },
    ]
    site.clock.advance(DAY)  # the add-on is over
    [_, item] = e.listing()
    assert (item["seats_granted"], item["seats"], item["features"]) == (4, 4, {"tier": "a"})


async def test_the_renewal_request(store: Store) -> None:
    site = Site(store)
    e = await site.start()
    empty = ents.read_request(await e.request())
    assert (empty.entitlements, empty.usage) == ((), ())
    await e.import_text(
        file_of(
            ("ZED-1", terms("zed", "ZED-1")), ("PLM-1", terms()), ("CAM-1", terms("cam", "CAM-1"))
        )
    )
    await site.service.remove_licence("cam")
    site.clock.advance(3 * DAY)
    request = ents.read_request(await e.request())
    assert request.daemon == site.signer.public == bytes(DAEMON.verify_key)
    assert (request.site, request.made, request.components) == ("plant-9", NOW + 3 * DAY, SITE)
    assert request.entitlements == (e.held["plm"].statement, e.held["zed"].statement)
    assert [u.licence_id for u in request.usage] == ["plm", "zed"]
