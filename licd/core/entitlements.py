"""A site's vendor entitlements: importing them, serving licences under them, keeping
them across restarts, and asking the vendor to renew them (docs/entitlements.md).

An import verifies every entitlement of a file (the vendor's signature by a key of
`[vendor] keys`, issued for this daemon's key, the site binding, not expired, a sequence
above the last imported for its licence, the licence key the vendor hashed), then
commits all of them with the licences served under them and an audit entry each, in
one transaction, and only then serves them: the engine gets each licence and its terms
(`Engine.entitle`), the signer puts the entitlement first in its leases' chains. A
refusal names its reason and changes nothing.

On every start the stored entitlements are verified again, with the config's vendor
keys: one that no longer verifies is not served (and says why in the log). The rules
themselves (what an entitled licence is, what an edit may change, when an import is
refused) are the engine's (`licd.engine.entitlement`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from licd.core.events import Event, Kind
from licd.core.keys import Signer
from licd.core.service import LicenceService
from licd.core.usage import licence_usage
from licd.engine import Licence
from licd.engine.entitlement import Held, entitled_licence, import_refusal
from licd.engine.licence import key_clash
from licd.store.base import Store
from licd.store.records import StoredEntitlement
from licd_client import entitlements as ent_format
from licd_client.entitlements import Entitlement, FileEntry
from licd_client.errors import BadRequest, TokenInvalid, UntrustedKey
from licd_client.statements import fingerprint

log = logging.getLogger(__name__)


class EntitlementRefused(BadRequest):
    """An entitlement that cannot be imported; the message names the licence and why."""


@dataclass(frozen=True)
class Outcome:
    """What an import did with one entitlement."""

    licence_id: str
    sequence: int
    result: str  # "imported" | "unchanged" | "skipped: <why>"
    expires: float
    seats: int


class Entitlements:
    """The entitlements this daemon holds, by licence id, and how they change."""

    def __init__(
        self,
        store: Store,
        signer: Signer,
        *,
        vendor_keys: Iterable[bytes],
        components: Sequence[str],
        declared: Callable[[], Iterable[str]],
    ) -> None:
        self.store = store
        self.signer = signer
        self.vendor_keys = frozenset(vendor_keys)
        self.components = tuple(components)
        #: The ids of licences the config file declares (an entitlement may not take one).
        self._declared = declared
        self._service: LicenceService | None = None  # once installed
        self.held: dict[str, Entitlement] = {}  # served now
        self.stored: dict[str, StoredEntitlement] = {}  # every one imported, removed too

    @property
    def service(self) -> LicenceService:
        if self._service is None:
            raise RuntimeError("Entitlements.install() was not called")
        return self._service

    # -------------------------------------------------------------------- start

    async def load(self, licences: dict[str, Licence]) -> dict[str, Licence]:
        """At start, before the engine exists: verify the stored entitlements again;
        returns `licences` (the database's, by id) with each entitled licence as its
        entitlement allows, and without those whose entitlement no longer verifies."""
        out = dict(licences)
        for stored in await self.store.load_entitlements():
            self.stored[stored.licence_id] = stored
            local = out.get(stored.licence_id)
            if stored.removed or local is None:
                continue
            try:
                ent = self._verified(stored.statement, local.key)
                refusal = import_refusal(
                    ent.terms,
                    ent.statement,
                    daemon=self.signer.public,
                    issued_for=ent.daemon,
                    site=self.components,
                    now=0.0,  # an expired one stays: its licence serves nothing after expiry
                    held=None,
                )
                if refusal is not None:
                    raise EntitlementRefused(refusal)
            except BadRequest as exc:
                log.error(
                    "event=entitlement_invalid licence=%s error=%r: the licence is not served",
                    stored.licence_id,
                    exc.message,
                )
                del out[stored.licence_id]
                continue
            out[stored.licence_id] = entitled_licence(ent.terms, local.key, local, ent.terms)
            self.held[stored.licence_id] = ent
        return out

    def install(self, service: LicenceService) -> None:
        """Once the engine exists: it and the signer serve what `load` verified, and
        a `licence remove` of an entitled licence is followed."""
        self._service = service
        service.events.subscribe(self._on_event)
        for licence_id, ent in self.held.items():
            service.engine.entitled[licence_id] = ent.terms
            self._chain(ent)

    def _on_event(self, event: Event) -> None:
        if event.kind is Kind.LICENCE_REMOVED and event.licence is not None:
            self.removed(event.licence)

    def _chain(self, ent: Entitlement) -> None:
        self.signer.chains[ent.terms.licence_id] = [ent.statement]
        self.signer.chain_iat[ent.terms.licence_id] = ent.issued

    def removed(self, licence_id: str) -> None:
        """`licence remove` took an entitled licence away (its sequence stays counted)."""
        self.held.pop(licence_id, None)
        self.signer.chains.pop(licence_id, None)
        self.signer.chain_iat.pop(licence_id, None)
        stored = self.stored.get(licence_id)
        if stored is not None:
            self.stored[licence_id] = StoredEntitlement(
                stored.licence_id, stored.sequence, stored.statement, stored.imported, True
            )

    # ------------------------------------------------------------------- import

    def _verified(self, statement: bytes, key: str | None) -> Entitlement:
        """The entitlement `statement` holds, signed by a vendor key, for licence key
        `key`; EntitlementRefused naming what is wrong."""
        if not self.vendor_keys:
            raise EntitlementRefused(
                "no vendor key is configured: add the vendor's public key to [vendor] keys "
                "in the config file, then reload"
            )
        try:
            ent = ent_format.open_entitlement(statement, self.vendor_keys)
        except UntrustedKey as exc:
            raise EntitlementRefused(f"not signed by a trusted vendor key: {exc}") from None
        except TokenInvalid as exc:
            raise EntitlementRefused(
                f"the entitlement does not verify ({exc}): the file was changed or damaged"
            ) from None
        if key is not None and ent_format.key_hash(key) != ent.terms.key_hash:
            raise EntitlementRefused(
                f"licence {ent.terms.licence_id!r}: the licence key is not the one the vendor "
                "signed: the file was changed"
            )
        return ent

    async def import_text(
        self,
        text: str,
        *,
        admin_uid: int | None = None,
        source: str = "admin",
        lenient: bool = False,
    ) -> list[Outcome]:
        """Import an entitlement file's text: all of it, or nothing and
        EntitlementRefused saying why. `lenient` (a config file's at start or reload):
        an expired entitlement, or one older than the one held, is skipped, not refused."""
        async with self.service.licence_edits:
            return await self._import_text(text, admin_uid, source, lenient)

    async def _import_text(
        self, text: str, admin_uid: int | None, source: str, lenient: bool
    ) -> list[Outcome]:
        try:
            entries = ent_format.read_file(text)
        except ValueError as exc:
            raise EntitlementRefused(str(exc)) from None
        return await self._import(entries, admin_uid, source, lenient)

    async def _import(
        self, entries: Sequence[FileEntry], admin_uid: int | None, source: str, lenient: bool
    ) -> list[Outcome]:
        now = self.service.now().wall
        outcomes: list[Outcome] = []
        chosen: list[tuple[Entitlement, Licence]] = []
        verified = [(entry, self._verified(entry.statement, entry.key)) for entry in entries]
        seen: set[str] = set()
        for _, ent in verified:
            if ent.terms.licence_id in seen:
                raise EntitlementRefused(
                    f"licence {ent.terms.licence_id!r}: the file holds two entitlements for it"
                )
            seen.add(ent.terms.licence_id)
        for entry, ent in verified:
            licence_id = ent.terms.licence_id
            try:
                licence = self._licence_for(ent, entry.key, now, chosen)
            except _Skip as skip:
                if skip.refusal is not None and not lenient:
                    raise EntitlementRefused(f"licence {licence_id!r}: {skip.refusal}") from None
                outcomes.append(self._outcome(ent, skip.result))
                continue
            chosen.append((ent, licence))
            outcomes.append(self._outcome(ent, "imported", licence))
        if chosen:
            await self._commit(chosen, admin_uid, source, now)
        return outcomes

    def _licence_for(
        self,
        ent: Entitlement,
        key: str | None,
        now: float,
        chosen: Sequence[tuple[Entitlement, Licence]],
    ) -> Licence:
        """The licence to serve under `ent`, imported at wall time `now` (with the
        licences `chosen` from the same file); EntitlementRefused, or _Skip when there
        is nothing to do (the one held again) or, for a config file, nothing to do yet
        (an expired one, one older than the one held)."""
        engine, terms = self.service.engine, ent.terms
        where = f"licence {terms.licence_id!r}"
        stored = self.stored.get(terms.licence_id)
        last = None if stored is None else Held(stored.sequence, stored.statement, stored.removed)
        refusal = import_refusal(
            terms,
            ent.statement,
            daemon=self.signer.public,
            issued_for=ent.daemon,
            site=self.components,
            now=now,
            held=last,
        )
        held = self.held.get(terms.licence_id)
        if refusal is None and held is not None and held.statement == ent.statement:
            raise _Skip("unchanged")
        if refusal is not None:
            stale = last is not None and terms.sequence <= last.sequence
            if stale or now >= terms.expires:  # a config file may still name an old one
                raise _Skip(f"skipped: {refusal}", refusal)
            raise EntitlementRefused(f"{where}: {refusal}")
        if terms.licence_id in set(self._declared()):
            raise EntitlementRefused(
                f"{where} is declared in the config file: an entitled licence's terms come "
                "from the vendor; remove its [[licence]] table, reload, then import"
            )
        local = engine.licence_by_id(terms.licence_id)
        key = key if key is not None else (local.key if local is not None else None)
        if key is None:
            raise EntitlementRefused(
                f"{where}: the file holds no licence key and this daemon serves no such "
                "licence: import the vendor's first file for it (the one with its key)"
            )
        if ent_format.key_hash(key) != terms.key_hash:
            raise EntitlementRefused(
                f"{where}: the licence key this daemon holds is not the one the vendor signed"
            )
        licence = entitled_licence(terms, key, local, held.terms if held is not None else None)
        others = {x.key: x for x in engine.licences if x.id != licence.id}
        others |= {x.key: x for _, x in chosen}
        clash = key_clash(others, (licence,))
        if clash is not None:
            raise EntitlementRefused(
                f"{where}: licence {clash.holder.id!r} already has this licence key"
            )
        return licence

    def _outcome(self, ent: Entitlement, result: str, licence: Licence | None = None) -> Outcome:
        if licence is None:
            licence = self.service.engine.licence_by_id(ent.terms.licence_id)
        seats = licence.seats if licence is not None else 0
        return Outcome(ent.terms.licence_id, ent.terms.sequence, result, ent.expires, seats)

    async def _commit(
        self,
        chosen: Sequence[tuple[Entitlement, Licence]],
        admin_uid: int | None,
        source: str,
        now: float,
    ) -> None:
        items = [
            (
                StoredEntitlement(ent.terms.licence_id, ent.terms.sequence, ent.statement, now),
                licence,
            )
            for ent, licence in chosen
        ]
        events = [
            Event(
                kind=Kind.ENTITLEMENT_IMPORTED,
                time=now,
                licence=ent.terms.licence_id,
                seats=licence.seats,
                admin_uid=admin_uid,
                detail={
                    "source": source,
                    "sequence": ent.terms.sequence,
                    "vendor": fingerprint(ent.vendor),
                    "expires": ent.terms.expires,
                    "product": ent.terms.product,
                    "seats_granted": ent.terms.seats,
                },
            )
            for ent, licence in chosen
        ]

        def apply() -> None:
            for (ent, licence), (stored, _) in zip(chosen, items, strict=True):
                self.service.engine.entitle(licence, ent.terms)
                self.held[licence.id] = ent
                self.stored[licence.id] = stored
                self._chain(ent)

        await self.service.commit_edit(
            self.store.put_entitlements(items, events),
            apply,
            events,
            "the entitlements were not imported",
        )

    async def import_files(
        self, paths: Iterable[Path], *, admin_uid: int | None = None
    ) -> dict[str, list[Outcome]]:
        """Import the entitlement files the config names (at start and on reload; the
        caller holds `service.licence_edits`), each all or nothing: EntitlementRefused
        naming the file when one cannot be read or is refused (the files before it
        stay imported)."""
        out: dict[str, list[Outcome]] = {}
        for path in paths:
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise EntitlementRefused(f"{path}: cannot read: {exc}") from None
            try:
                out[str(path)] = await self._import_text(text, admin_uid, f"file {path}", True)
            except EntitlementRefused as exc:
                raise EntitlementRefused(f"{path}: {exc.message}") from None
            for outcome in out[str(path)]:
                if outcome.result.startswith("skipped"):
                    log.warning(
                        "event=entitlement_skipped file=%s licence=%s reason=%r",
                        path,
                        outcome.licence_id,
                        outcome.result,
                    )
        return out

    # ------------------------------------------------------------------- queries

    def listing(self) -> list[dict[str, Any]]:
        """The entitlements held and removed, as `licd entitlement list` shows them."""
        engine = self.service.engine
        now = self.service.now().wall
        out = []
        for licence_id, stored in sorted(self.stored.items()):
            ent = self.held.get(licence_id)
            licence = engine.licence_by_id(licence_id)
            item: dict[str, Any] = {
                "licence": licence_id,
                "sequence": stored.sequence,
                "imported": stored.imported,
                "state": "removed" if stored.removed else "served" if ent else "invalid",
            }
            if ent is not None:
                t = ent.terms
                item |= {
                    "product": t.product,
                    "seats_granted": t.seats_at(now),
                    "seats": licence.seats_at(now) if licence else 0,
                    "features": t.features_at(now),
                    "not_before": t.not_before,
                    "expires": t.expires,
                    "days_left": (t.expires - now) / 86400,
                    "max_ttl": t.max_ttl,
                    "vendor": ent.vendor.hex(),
                    "bound": t.binding is not None,
                }
            out.append(item)
        return out

    async def request(self) -> bytes:
        """A renewal request for the entitlements held, signed by this daemon's key."""
        at = self.service.now()
        held = sorted(self.held.values(), key=lambda e: e.terms.licence_id)
        usage = [
            await licence_usage(
                self.store,
                self.service.engine,
                e.terms.licence_id,
                since=self.stored[e.terms.licence_id].imported,
                at=at,
            )
            for e in held
        ]
        return self.signer.renewal_request(
            made=at.wall,
            components=self.components,
            entitlements_held=[e.statement for e in held],
            usage=usage,
        )


class _Skip(Exception):
    """Nothing to import for an entitlement: `result` says why; `refusal` is the reason
    a refusal would give when skipping is not allowed."""

    def __init__(self, result: str, refusal: str | None = None) -> None:
        super().__init__(result)
        self.result = result
        self.refusal = refusal
