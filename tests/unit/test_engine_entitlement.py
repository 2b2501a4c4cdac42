"""The pure entitlement rules (licd/engine/entitlement.py), from angles
tests/unit/test_entitlement_rules.py leaves out: what the vendor's licence leaves at
Licence defaults, a renewal's seats and lease length case by case, that whatever a site
narrowed stays a pure narrowing of the new terms, which check `narrowing_error` and
`import_refusal` report first when several fail, and the exact limits (seats equal to
the grant, a lease of exactly max_ttl, a sequence equal to the one held)."""

from __future__ import annotations

from dataclasses import fields, replace
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
from licd.engine.licence import Licence
from licd_client.entitlements import key_hash
from licd_client.terms import AddonTerm, Binding, CounterTerm, Terms

KEY = "PLM-0042"
ME, OTHER = b"\x07" * 32, bytes(range(32))
SITE = ("machine:m1", "mac:aa", "disk:d1", "host:plm")
TERMS = Terms(
    licence_id="plm",
    key_hash=key_hash(KEY),
    product="plm",
    seats=8,
    expires=1_900_000_000.0,
    sequence=5,
    features={"edition": "gold", "seats_max": 8},
    counters=(CounterTerm("prints", 50),),
    addons=(AddonTerm(2, {}, None, 1_850_000_000.0),),
    max_ttl=1800.0,
)
#: A site's narrowing of the licence `TERMS` grant: every field the site may set.
NARROWED = replace(
    vendor_licence(TERMS, KEY),
    seats=5,
    lease_ttl=120.0,
    grace=2.0,
    delegable=True,
    leases_per_unit=3,
    allow=("group:eng",),
    deny=("user:mallory",),
    reserve={"group:eng": 1},
    max={"host": 2},
)


def test_the_vendors_licence_leaves_the_sites_fields_at_their_defaults() -> None:
    lic = vendor_licence(TERMS, KEY)
    site_fields = {
        f.name
        for f in fields(Licence)
        if f.name not in (*VENDOR_FIELDS, "key", "id", "seats", "lease_ttl")
    }
    default = Licence(key="k", id="i", product="p", seats=1)
    assert site_fields == {
        "grace", "delegable", "leases_per_unit", "allow", "deny", "reserve", "max",
        "borrow_after", "borrow_max", "borrow_allow", "queue_max", "queue_priority",
        "idle_timeout", "idle_reclaim", "idle_threshold", "linger",
    }  # fmt: skip
    for name in (*site_fields, "overdraft", "count_by", "device_period"):
        assert getattr(lic, name) == getattr(default, name), name


def test_the_vendors_licence_copies_the_terms_features() -> None:
    lic = vendor_licence(TERMS, KEY)
    assert lic.features == TERMS.features and lic.features is not TERMS.features
    assert lic.addon[0].features is not TERMS.addons[0].features
    assert (lic.addon[0].starts, lic.addon[0].ends) == (None, 1_850_000_000.0)


@pytest.mark.parametrize(
    ("max_ttl", "lease_ttl"),
    [(None, DEFAULT_TTL), (DEFAULT_TTL * 10, DEFAULT_TTL), (DEFAULT_TTL / 3, DEFAULT_TTL / 3)],
)
def test_the_vendors_licence_leases_the_default_length_never_above_max_ttl(
    max_ttl: float | None, lease_ttl: float
) -> None:
    assert vendor_licence(replace(TERMS, max_ttl=max_ttl), KEY).lease_ttl == lease_ttl


@pytest.mark.parametrize(
    ("before", "local", "granted", "served"),
    [
        (8, 8, 12, 12),  # not lowered: the new grant, up
        (8, 8, 4, 4),  # not lowered: the new grant, down
        (8, 5, 12, 5),  # lowered: kept lowered
        (8, 5, 3, 3),  # lowered, but the new grant is lower still
        (8, 7, 7, 7),  # lowered by one, grant cut to it
        (4, 6, 12, 12),  # above the old grant (no narrowing): the new grant
    ],
)
def test_a_renewals_seats(before: int, local: int, granted: int, served: int) -> None:
    old, new = replace(TERMS, seats=before), replace(TERMS, seats=granted, sequence=6)
    lic = entitled_licence(new, KEY, replace(NARROWED, seats=local), old)
    assert lic.seats == served


def test_without_the_terms_before_the_seats_are_the_grants() -> None:
    assert entitled_licence(TERMS, KEY, replace(NARROWED, seats=1)).seats == TERMS.seats


@pytest.mark.parametrize(
    ("local_ttl", "max_ttl", "served"),
    [(120.0, 1800.0, 120.0), (120.0, 60.0, 60.0), (120.0, 120.0, 120.0), (5000.0, None, 5000.0)],
)
def test_a_renewals_lease_length(local_ttl: float, max_ttl: float | None, served: float) -> None:
    renewed = replace(TERMS, max_ttl=max_ttl, sequence=6)
    lic = entitled_licence(renewed, KEY, replace(NARROWED, lease_ttl=local_ttl), TERMS)
    assert lic.lease_ttl == served


def test_a_renewal_takes_the_vendors_fields_from_the_new_terms_not_the_local_licence() -> None:
    renewed = replace(
        TERMS,
        product="plm2",
        sequence=6,
        expires=2_000_000_000.0,
        features={"edition": "platinum"},
        counters=(),
        addons=(),
        not_before=1_800_000_000.0,
    )
    stale = replace(NARROWED, overdraft=3, count_by="user", device_period=60.0, id="x", key="K")
    lic = entitled_licence(renewed, KEY, stale, TERMS)
    assert (lic.id, lic.key) == ("plm", KEY)
    for name in VENDOR_FIELDS:
        assert getattr(lic, name) == getattr(vendor_licence(renewed, KEY), name), name
    # and the site's fields from the local licence
    assert (lic.grace, lic.delegable, lic.leases_per_unit) == (2.0, True, 3)
    assert (lic.allow, lic.deny) == (("group:eng",), ("user:mallory",))
    assert (lic.reserve, lic.max) == ({"group:eng": 1}, {"host": 2})
    assert lic.reserve is not NARROWED.reserve and lic.max is not NARROWED.max


@pytest.mark.parametrize("seats", [1, 8, 20])
@pytest.mark.parametrize("max_ttl", [None, 30.0, 1800.0])
def test_what_a_renewal_serves_is_always_a_narrowing_of_its_terms(
    seats: int, max_ttl: float | None
) -> None:
    renewed = replace(TERMS, seats=seats, max_ttl=max_ttl, sequence=6)
    for local in (NARROWED, vendor_licence(TERMS, KEY), replace(NARROWED, lease_ttl=9999.0)):
        lic = entitled_licence(renewed, KEY, local, TERMS)
        assert narrowing_error(renewed, lic) is None
        assert lic.seats <= seats


def test_a_narrowing_up_to_the_limits_is_allowed() -> None:
    granted = vendor_licence(TERMS, KEY)
    assert narrowing_error(TERMS, NARROWED) is None
    assert narrowing_error(TERMS, replace(granted, seats=TERMS.seats)) is None
    assert narrowing_error(TERMS, replace(granted, lease_ttl=1800.0)) is None
    # without a max_ttl the vendor does not bound the lease
    free = replace(TERMS, max_ttl=None)
    assert narrowing_error(free, replace(vendor_licence(free, KEY), lease_ttl=1e6)) is None


def test_a_narrowing_error_names_the_licence_and_the_sequence() -> None:
    error = narrowing_error(TERMS, replace(NARROWED, seats=9))
    assert error is not None
    assert error.startswith("licence 'plm' is entitled by the vendor (sequence 5) to 8 seat(s)")
    assert "not raise them to 9" in error
    longer = narrowing_error(TERMS, replace(NARROWED, lease_ttl=1800.5))
    assert longer == (
        "licence 'plm' is entitled by the vendor (sequence 5): its leases last at most "
        "1800 s (the vendor's max_ttl)"
    )


CHANGED: dict[str, Any] = {
    "product": "cam",
    "not_before": 1_700_000_000.0,
    "expires": None,
    "features": {},
    "max_ttl": None,
    "counter": (),
    "addon": (),
    "overdraft": 1,
    "count_by": "host",
    "device_period": 3600.0,
}


@pytest.mark.parametrize("name", VENDOR_FIELDS)
def test_changing_a_vendor_field_of_a_narrowed_licence_is_named(name: str) -> None:
    assert set(CHANGED) == set(VENDOR_FIELDS)
    error = narrowing_error(TERMS, replace(NARROWED, **{name: CHANGED[name]}))
    assert error == (
        f"licence 'plm' is entitled by the vendor (sequence 5): its {name} is the vendor's "
        "and cannot be changed here"
    )


def test_too_many_seats_is_reported_before_a_changed_vendor_field() -> None:
    both = replace(NARROWED, seats=99, lease_ttl=9999.0, product="cam")
    error = narrowing_error(TERMS, both)
    assert error is not None and "not raise them to 99" in error
    error = narrowing_error(TERMS, replace(both, seats=1))
    assert error is not None and "at most 1800 s" in error


def refusal(terms: Terms = TERMS, statement: bytes = b"st-5", **kw: Any) -> str | None:
    args: dict[str, Any] = {
        "daemon": ME,
        "issued_for": ME,
        "site": SITE,
        "now": 1_800_000_000.0,
        "held": None,
    }
    return import_refusal(terms, statement, **(args | kw))


def test_another_daemons_entitlement_names_both_keys() -> None:
    error = refusal(issued_for=OTHER)
    assert error is not None
    assert OTHER.hex()[:16] in error and OTHER.hex() not in error
    assert f"this daemon's key is {ME.hex()}" in error


@pytest.mark.parametrize(
    ("site", "matched"),
    [((), 0), (("machine:m1",), 1), (("machine:m1", "machine:m1", "other:x"), 1)],
)
def test_a_failed_binding_names_the_components_matched(site: tuple[str, ...], matched: int) -> None:
    bound = replace(TERMS, binding=Binding(SITE, 2))
    assert refusal(bound, site=site) == (
        f"the site binding failed: {matched} of the 4 host-id components it names are this "
        "machine's, 2 needed"
    )
    assert refusal(bound, site=(*site, "disk:d1", "host:plm")) is None


def test_the_checks_are_reported_in_order() -> None:
    worst = replace(TERMS, binding=Binding(SITE, 4))
    args: dict[str, Any] = {
        "issued_for": OTHER,
        "site": (),
        "now": TERMS.expires + 1,
        "held": Held(9, b"newer"),
    }
    for reason, fixed in (
        ("for another daemon", {"issued_for": ME}),
        ("site binding failed", {"site": SITE}),
        ("it expired on 2030-03-17 17:46:40Z", {"now": 0.0}),
        ("its sequence 5 is not above 9", {"held": None}),
    ):
        error = refusal(worst, **args)
        assert error is not None and reason in error, (reason, error)
        args |= fixed
    assert refusal(worst, **args) is None


def test_the_sequence_against_the_one_held() -> None:
    assert refusal(held=Held(4, b"older")) is None
    assert refusal(held=Held(5, b"st-5")) is None  # the same one again
    equal = refusal(held=Held(5, b"another-5"))
    assert equal == (
        "its sequence 5 is not above 5, the last imported for licence 'plm': an older "
        "entitlement cannot replace a newer one"
    )
    below = refusal(held=Held(6, b"st-6"))
    assert below is not None and "its sequence 5 is not above 6" in below


def test_the_validity_window_not_before_does_not_stop_an_import_the_expiry_does() -> None:
    early = replace(TERMS, not_before=1_850_000_000.0)
    assert refusal(early, now=1_800_000_000.0) is None
    assert refusal(now=TERMS.expires - 0.5) is None
    assert refusal(now=TERMS.expires) == "it expired on 2030-03-17 17:46:40Z"
