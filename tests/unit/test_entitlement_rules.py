"""What an entitlement lets a site serve (licd/engine/entitlement.py), pure: the licence
served under it, the site's narrowing kept across a renewal, which edits go beyond the
terms, and when an import is refused."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from licd.engine.entitlement import (
    DEFAULT_TTL,
    VENDOR_FIELDS,
    Held,
    entitled_licence,
    import_refusal,
    narrowing_error,
    vendor_licence,
)
from licd.engine.licence import Addon, Counter
from licd_client.entitlements import key_hash
from licd_client.terms import AddonTerm, Binding, CounterTerm, Terms

KEY = "CAD-0001"
ME, OTHER = bytes(32), b"\x01" * 32
SITE = ("machine:a", "mac:b", "host:c")
TERMS = Terms(
    licence_id="cad",
    key_hash=key_hash(KEY),
    product="cad",
    seats=10,
    expires=2_000_000_000.0,
    sequence=3,
    features={"tier": "pro"},
    counters=(CounterTerm("exports", 100, "monthly"),),
    addons=(AddonTerm(5, {"burst": True}, 1_900_000_000.0, 1_950_000_000.0),),
    not_before=1_800_000_000.0,
    max_ttl=3600.0,
)


def test_the_vendor_licence_is_the_terms() -> None:
    lic = vendor_licence(TERMS, KEY)
    assert (lic.id, lic.key, lic.product, lic.seats) == ("cad", KEY, "cad", 10)
    assert (lic.not_before, lic.expires, lic.max_ttl) == (1_800_000_000.0, 2_000_000_000.0, 3600.0)
    assert lic.features == {"tier": "pro"}
    assert lic.counter == (Counter("exports", 100, "monthly"),)
    assert lic.addon == (Addon(5, {"burst": True}, 1_900_000_000.0, 1_950_000_000.0),)
    assert lic.lease_ttl == min(DEFAULT_TTL, 3600.0)
    assert vendor_licence(replace(TERMS, max_ttl=10.0), KEY).lease_ttl == 10.0
    assert vendor_licence(replace(TERMS, max_ttl=None), KEY).lease_ttl == DEFAULT_TTL


def test_the_sites_narrowing_is_kept_across_a_renewal() -> None:
    granted = vendor_licence(TERMS, KEY)
    local = replace(
        granted,
        seats=6,
        lease_ttl=600.0,
        grace=5.0,
        allow=("user:alice",),
        deny=("host:kiosk",),
        reserve={"group:cad": 2},
        max={"user": 1},
        delegable=True,
    )
    renewed = replace(TERMS, seats=12, sequence=4, max_ttl=300.0)
    lic = entitled_licence(renewed, KEY, local, TERMS)
    assert lic.seats == 6  # the site had lowered them: kept lowered
    assert lic.lease_ttl == 300.0  # never above the new max_ttl
    assert (lic.grace, lic.allow, lic.deny) == (5.0, ("user:alice",), ("host:kiosk",))
    assert (lic.reserve, lic.max, lic.delegable) == ({"group:cad": 2}, {"user": 1}, True)
    assert lic.max_ttl == 300.0 and lic.expires == TERMS.expires
    # Seats the site had not lowered follow the grant, up or down.
    full = replace(granted, lease_ttl=600.0)
    assert entitled_licence(renewed, KEY, full, TERMS).seats == 12
    assert entitled_licence(replace(renewed, seats=4), KEY, local, TERMS).seats == 4
    # A first import (no terms before): the grant's seats, whatever the local licence had.
    assert entitled_licence(TERMS, KEY, replace(granted, seats=2), None).seats == 10
    assert entitled_licence(TERMS, KEY, None) == granted


def test_an_edit_may_narrow_but_not_widen_nor_touch_the_vendors_fields() -> None:
    granted = vendor_licence(TERMS, KEY)
    for narrowed in (
        replace(granted, seats=1),
        replace(granted, lease_ttl=60.0, grace=0.0),
        replace(granted, allow=("group:cad",), reserve={"group:cad": 1}),
    ):
        assert narrowing_error(TERMS, narrowed) is None
    more = narrowing_error(TERMS, replace(granted, seats=11))
    assert more is not None and "to 10 seat(s)" in more and "not raise them to 11" in more
    longer = narrowing_error(TERMS, replace(granted, lease_ttl=3601.0))
    assert longer is not None and "at most 3600 s" in longer
    changed: dict[str, Any] = {
        "product": "cam",
        "not_before": None,
        "expires": 2_100_000_000.0,
        "features": {"tier": "max"},
        "max_ttl": 7200.0,
        "counter": (),
        "addon": (),
        "overdraft": 2,
        "count_by": "holder",
        "device_period": 86400.0,
    }
    assert set(changed) == set(VENDOR_FIELDS)
    for name, value in changed.items():
        error = narrowing_error(TERMS, replace(granted, **{name: value}))
        assert error is not None and f"its {name} is the vendor's" in error, name


def refusal(terms: Terms = TERMS, **kw: object) -> str | None:
    args: dict[str, object] = {
        "daemon": ME,
        "issued_for": ME,
        "site": SITE,
        "now": 1_850_000_000.0,
        "held": None,
    }
    args.update(kw)
    return import_refusal(terms, b"statement", **args)  # type: ignore[arg-type]


def test_an_import_is_refused_for_another_daemon_a_binding_expiry_or_an_old_sequence() -> None:
    assert refusal() is None
    other = refusal(issued_for=OTHER)
    assert other is not None and "for another daemon" in other and ME.hex() in other
    bound = replace(TERMS, binding=Binding(("machine:a", "mac:x", "host:y"), 2))
    failed = refusal(bound)
    assert failed is not None and "1 of the 3 host-id components" in failed and "2 needed" in failed
    assert refusal(bound, site=("machine:a", "mac:x")) is None
    assert refusal(now=TERMS.expires - 0.001) is None
    expired = refusal(now=TERMS.expires)
    assert expired is not None and "expired on 2033-05-18 03:33:20Z" in expired
    assert refusal(held=Held(2, b"older")) is None
    for sequence in (3, 4):
        stale = refusal(held=Held(sequence, b"another"))
        assert stale is not None and f"sequence 3 is not above {sequence}" in stale
    assert refusal(held=Held(3, b"statement")) is None  # the same one again: nothing to do


@pytest.mark.parametrize("need", [1, 3])
def test_a_binding_needs_k_of_n(need: int) -> None:
    bound = replace(TERMS, binding=Binding(SITE, need))
    assert refusal(bound, site=SITE[:need]) is None
    if need > 1:
        assert refusal(bound, site=SITE[: need - 1]) is not None
