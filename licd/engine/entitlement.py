"""What a vendor's entitlement lets a site serve, pure (docs/entitlements.md).

An entitled licence's vendor fields come from the entitlement's terms: its key (checked
against the signed hash by the caller), product, seat ceiling, features, counters,
add-ons, validity and longest lease; it is never overdrawn, counts leases, and has no
device leases. The site may only narrow it: fewer seats, access lists, reservations,
caps, a shorter lease, its grace, whether a router may take a block of it. Three rules
live here, once:

- `entitled_licence`: the licence served under an entitlement, keeping the site's
  narrowing across a renewal (a site that lowered its seats keeps them lowered);
- `narrowing_error`: why an edit of an entitled licence goes beyond its terms (every
  licence edit passes `Engine.check_licence`, which asks this);
- `import_refusal`: why an entitlement may not replace the one held (another daemon's,
  a failed site binding, expired, or a sequence not above the last).

No clock and no signatures: the caller verified the statement and passes the instants.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from licd.engine.licence import Addon, Counter, Licence
from licd_client.terms import Terms

#: Fields of an entitled licence that are the vendor's: an edit may not change them.
VENDOR_FIELDS = (
    "product",
    "not_before",
    "expires",
    "features",
    "max_ttl",
    "counter",
    "addon",
    "overdraft",
    "count_by",
    "device_period",
)
#: A lease's default length on an entitled licence the site has not shaped yet.
DEFAULT_TTL = Licence.lease_ttl


@dataclass(frozen=True)
class Held:
    """The last entitlement a site imported for a licence: its sequence and statement."""

    sequence: int
    statement: bytes
    removed: bool = False  # its licence was removed (`licd licence remove`)


def vendor_licence(terms: Terms, key: str) -> Licence:
    """The licence exactly as the vendor grants it, before the site narrows it."""
    ttl = DEFAULT_TTL if terms.max_ttl is None else min(DEFAULT_TTL, terms.max_ttl)
    return Licence(
        key=key,
        id=terms.licence_id,
        product=terms.product,
        seats=terms.seats,
        lease_ttl=ttl,
        not_before=terms.not_before,
        expires=terms.expires,
        features=dict(terms.features),
        max_ttl=terms.max_ttl,
        counter=tuple(Counter(c.name, c.limit, c.reset) for c in terms.counters),
        addon=tuple(Addon(a.seats, dict(a.features), a.starts, a.ends) for a in terms.addons),
    )


def entitled_licence(
    terms: Terms, key: str, local: Licence | None, before: Terms | None = None
) -> Licence:
    """The licence served under `terms`, with `local` (the licence the site served
    until now, under the terms `before`, if any) narrowing it: its access lists,
    reservations, caps, grace and delegation kept, its lease no longer than the
    vendor allows, and its seats kept only where the site had lowered them."""
    granted = vendor_licence(terms, key)
    if local is None:
        return granted
    narrowed = before is not None and local.seats < before.seats
    ttl = local.lease_ttl if terms.max_ttl is None else min(local.lease_ttl, terms.max_ttl)
    return replace(
        granted,
        seats=min(local.seats, terms.seats) if narrowed else terms.seats,
        lease_ttl=ttl,
        grace=local.grace,
        delegable=local.delegable,
        leases_per_unit=local.leases_per_unit,
        allow=local.allow,
        deny=local.deny,
        reserve=dict(local.reserve),
        max=dict(local.max),
    )


def narrowing_error(terms: Terms, licence: Licence) -> str | None:
    """Why `licence`, an edit of the licence entitled by `terms`, is more than the vendor
    grants (or changes what is the vendor's); None when it only narrows."""
    where = f"licence {licence.id!r} is entitled by the vendor (sequence {terms.sequence})"
    if licence.seats > terms.seats:
        return (
            f"{where} to {terms.seats} seat(s): a local change may lower its seats, not "
            f"raise them to {licence.seats}; ask the vendor for a new entitlement"
        )
    if terms.max_ttl is not None and licence.lease_ttl > terms.max_ttl:
        return f"{where}: its leases last at most {terms.max_ttl:g} s (the vendor's max_ttl)"
    granted = vendor_licence(terms, licence.key)
    for name in VENDOR_FIELDS:
        if getattr(licence, name) != getattr(granted, name):
            return f"{where}: its {name} is the vendor's and cannot be changed here"
    return None


def import_refusal(
    terms: Terms,
    statement: bytes,
    *,
    daemon: bytes,
    issued_for: bytes,
    site: Iterable[str],
    now: float,
    held: Held | None,
) -> str | None:
    """Why a verified entitlement for daemon key `issued_for` may not be imported by the
    daemon whose key is `daemon`, on a site with host-id components `site`, at wall time
    `now` (the effective one, never set back), over the one `held`; None to import it."""
    if issued_for != daemon:
        return (
            f"it is for another daemon (key {issued_for.hex()[:16]}...); this daemon's key "
            f"is {daemon.hex()}: ask the vendor for an entitlement issued for it"
        )
    binding = terms.binding
    if binding is not None and not binding.holds(site):
        return (
            f"the site binding failed: {binding.matched(site)} of the "
            f"{len(binding.components)} host-id components it names are this machine's, "
            f"{binding.need} needed"
        )
    if now >= terms.expires:
        return f"it expired on {_iso(terms.expires)}"
    if held is not None and terms.sequence <= held.sequence:
        if statement == held.statement and not held.removed:
            return None  # the same one again: nothing to do
        if statement == held.statement:
            return (
                f"its licence {terms.licence_id!r} was removed from this site: only a newer "
                f"entitlement (a sequence above {held.sequence}) brings it back"
            )
        return (
            f"its sequence {terms.sequence} is not above {held.sequence}, the last "
            f"imported for licence {terms.licence_id!r}: an older entitlement cannot replace "
            "a newer one"
        )
    return None


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
