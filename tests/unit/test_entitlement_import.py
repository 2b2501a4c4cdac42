"""A site's entitlements (licd/core/entitlements.py) over a real store, engine, service
and signer: imports all or nothing, what a config file's import skips, removal, the
check at start, the listing and the renewal request. The end-to-end flow through the
commands and clients is tests/integration/test_entitlements.py's."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from licd.clock import ManualClock
from licd.core.entitlements import EntitlementRefused, Entitlements
from licd.core.events import Kind
from licd.core.keys import Signer
from licd.core.service import LicenceService
from licd.engine import Licence
from licd.store.base import Store
from licd_client import entitlements as ents
from licd_client.terms import Binding, Terms
from tests.support import DICOM, new_engine
from tests.unit.test_store import running

NOW = 1_790_000_000.0
SITE = ("machine:a", "mac:b", "host:c")
VENDOR = SigningKey.generate()
DAEMON = SigningKey.generate()


def terms(licence_id: str = "cad", key: str = "CAD-1", **kw: object) -> Terms:
    base = Terms(
        licence_id=licence_id,
        key_hash=ents.key_hash(key),
        product="cad",
        seats=5,
        expires=NOW + 30 * 86400,
        sequence=1,
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def file_of(*items: tuple[str | None, Terms], daemon: bytes | None = None) -> str:
    signed = [
        (key, ents.issue(VENDOR, daemon or bytes(DAEMON.verify_key), NOW - 60, t))
        for key, t in items
    ]
    return ents.write_file(signed)


class Site:
    """The parts of a daemon that entitlements touch, built as the daemon builds them."""

    def __init__(self, store: Store, clock: ManualClock, declared: Iterable[str] = ()) -> None:
        self.store = store
        self.clock = clock
        self.declared = set(declared)
        self.signer = Signer(DAEMON, "plant-3")

    async def open(
        self,
        *,
        vendor_keys: Iterable[bytes] = (bytes(VENDOR.verify_key),),
        site: Iterable[str] = SITE,
    ) -> Entitlements:
        ents_ = Entitlements(
            self.store,
            self.signer,
            vendor_keys=vendor_keys,
            components=tuple(site),
            declared=lambda: self.declared,
        )
        stored = {x.id: x for x in await self.store.load_licences()}
        licences = await ents_.load(stored)
        self.service = LicenceService(new_engine(licences.values()), self.store, self.clock)
        ents_.install(self.service)
        return ents_

    async def kinds(self) -> list[Kind]:
        await self.store.barrier()
        return [e.event.kind for e in await self.store.audit(limit=1000)]

    def licence(self, licence_id: str = "cad") -> Licence | None:
        return self.service.engine.licence_by_id(licence_id)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with running(tmp_path / "licd.db") as s:
        yield s


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(wall=NOW)


async def test_an_import_serves_stores_chains_and_audits(store: Store, clock: ManualClock) -> None:
    site = Site(store, clock)
    e = await site.open()
    [outcome] = await e.import_text(file_of(("CAD-1", terms())), admin_uid=7, source="admin x")
    assert (outcome.licence_id, outcome.sequence, outcome.result, outcome.seats) == (
        "cad", 1, "imported", 5,
    )  # fmt: skip
    licence = site.licence()
    assert licence is not None and (licence.key, licence.seats) == ("CAD-1", 5)
    held = e.held["cad"]
    assert site.service.engine.entitled["cad"] == held.terms
    assert site.signer.chains["cad"] == [held.statement]
    [stored] = await store.load_entitlements()
    assert (stored.licence_id, stored.sequence, stored.statement) == ("cad", 1, held.statement)
    await store.barrier()
    [entry] = [x for x in await store.audit(limit=100) if x.event.kind is Kind.ENTITLEMENT_IMPORTED]
    assert entry.event.admin_uid == 7 and entry.event.detail["source"] == "admin x"
    assert entry.event.detail["sequence"] == 1 and entry.event.detail["seats_granted"] == 5
    [again] = await e.import_text(file_of(("CAD-1", terms())))  # the same statement
    assert again.result == "unchanged"
    assert [k for k in await site.kinds() if k is Kind.ENTITLEMENT_IMPORTED] == [
        Kind.ENTITLEMENT_IMPORTED
    ]


async def test_a_file_imports_whole_or_not_at_all(store: Store, clock: ManualClock) -> None:
    site = Site(store, clock, declared={"dicom"})
    e = await site.open()
    good = ("CAD-1", terms())
    cases = {
        "another daemon": file_of(good)
        + file_of(("CAM-1", terms("cam", "CAM-1")), daemon=b"\2" * 32),
        "twice": file_of(good, ("CAD-1", terms(sequence=2))),
        "declared": file_of(good, ("D-1", terms("dicom", "D-1"))),
        "no key": file_of(good, (None, terms("cam", "CAM-1"))),
    }
    reasons = {
        "another daemon": "licence 'cam': it is for another daemon",
        "twice": "licence 'cad': the file holds two entitlements for it",
        "declared": "licence 'dicom' is declared in the config file",
        "no key": "licence 'cam': the file holds no licence key",
    }
    for name, text in cases.items():
        with pytest.raises(EntitlementRefused, match=reasons[name]):
            await e.import_text(text)
        assert site.licence() is None and e.held == {}, name
        assert await store.load_entitlements() == [], name
    assert Kind.ENTITLEMENT_IMPORTED not in await site.kinds()


async def test_a_licence_key_another_licence_has_is_refused(
    store: Store, clock: ManualClock
) -> None:
    site = Site(store, clock)
    e = await site.open()
    await site.service.put_licence(DICOM)
    with pytest.raises(EntitlementRefused, match="licence 'dicom-hq' already has this licence key"):
        await e.import_text(file_of((DICOM.key, terms(key=DICOM.key))))


async def test_a_config_files_import_skips_what_is_stale_or_expired(
    store: Store, clock: ManualClock
) -> None:
    site = Site(store, clock)
    e = await site.open()
    await e.import_text(file_of(("CAD-1", terms(sequence=2))))
    stale = file_of(("CAD-1", terms(sequence=1)))
    with pytest.raises(EntitlementRefused, match="sequence 1 is not above 2"):
        await e.import_text(stale)
    [skipped] = await e.import_text(stale, lenient=True)
    assert skipped.result.startswith("skipped: its sequence 1 is not above 2")
    clock.advance(31 * 86400)
    expired = file_of(("CAM-1", terms("cam", "CAM-1", expires=NOW + 31 * 86400 - 1)))
    # issued before it expired, imported after
    [late] = await e.import_text(expired, lenient=True)
    assert late.result.startswith("skipped: it expired on")
    assert site.licence("cam") is None


async def test_a_removed_licence_keeps_its_sequence_counted(
    store: Store, clock: ManualClock
) -> None:
    site = Site(store, clock)
    e = await site.open()
    await e.import_text(file_of(("CAD-1", terms(sequence=3))))
    await site.service.remove_licence("cad")
    assert "cad" not in e.held and "cad" not in site.signer.chains
    assert [x["state"] for x in e.listing()] == ["removed"]
    with pytest.raises(EntitlementRefused, match="sequence 3 is not above 3"):
        await e.import_text(file_of(("CAD-1", terms(sequence=3, seats=50))))
    [back] = await e.import_text(file_of(("CAD-1", terms(sequence=4))))
    assert back.result == "imported" and site.licence() is not None


async def test_the_check_at_start(store: Store, clock: ManualClock) -> None:
    site = Site(store, clock)
    e = await site.open()
    bound = terms(binding=Binding(SITE, 2))
    await e.import_text(file_of(("CAD-1", bound)))
    again = await Site(store, clock).open()  # a restart
    assert "cad" in again.held
    for changed in ({"vendor_keys": ()}, {"site": ("machine:a", "mac:z")}):
        other = Site(store, clock)
        e2 = await other.open(**changed)
        assert other.licence() is None and e2.held == {}
        assert [x["state"] for x in e2.listing()] == ["invalid"]


async def test_the_listing_and_the_renewal_request(store: Store, clock: ManualClock) -> None:
    site = Site(store, clock)
    e = await site.open()
    with pytest.raises(EntitlementRefused, match="no vendor key is configured"):
        await (await Site(store, clock).open(vendor_keys=())).import_text(file_of(("K", terms())))
    await e.import_text(
        file_of(("CAD-1", terms(features={"tier": "pro"})), ("CAM-1", terms("cam", "CAM-1")))
    )
    cad_licence = site.licence()
    assert cad_licence is not None
    await site.service.put_licence(dataclasses.replace(cad_licence, seats=3))
    cad, cam = e.listing()
    assert (cad["licence"], cad["state"], cad["seats"], cad["seats_granted"]) == (
        "cad",
        "served",
        3,
        5,
    )
    assert cad["features"] == {"tier": "pro"} and cad["days_left"] == pytest.approx(30)
    assert cad["vendor"] == bytes(VENDOR.verify_key).hex() and cad["bound"] is False
    assert cam["licence"] == "cam"
    request = ents.read_request(await e.request())
    assert request.daemon == bytes(DAEMON.verify_key) and request.site == "plant-3"
    assert request.components == SITE
    assert set(request.entitlements) == {e.held["cad"].statement, e.held["cam"].statement}
    assert [u.licence_id for u in request.usage] == ["cad", "cam"]
