"""Unit tests of licd_client.entitlements: the entitlement statement both ways, every
refusal of its reader, files, and renewal requests (docs/protocol.md section 4).

Statements are signed for real with fixed PyNaCl keys; refusals are payloads changed by
hand and signed again by the vendor, so each one reaches the field check it is about.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import msgpack
import pytest
from nacl.signing import SigningKey

from licd_client.entitlements import (
    KEY_HASH_DOMAIN,
    REQUEST_VALID,
    AddonTerm,
    Binding,
    CounterTerm,
    Entitlement,
    FileEntry,
    LicenceUsage,
    Terms,
    entitlement_payload,
    issue,
    key_hash,
    make_request,
    open_entitlement,
    read_entitlement,
    read_file,
    read_request,
    read_request_file,
    request_file,
    write_file,
)
from licd_client.errors import TokenInvalid, UntrustedKey
from licd_client.statements import SIGNATURE_LEN, fingerprint, open_statement, sign

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
DAY = 86_400.0
VENDOR = SigningKey(bytes([11]) * 32)
DAEMON = SigningKey(bytes([12]) * 32)
STRANGER = SigningKey(bytes([13]) * 32)
LICENCE_KEY = "ACME-1234-5678"


def pub(k: SigningKey) -> bytes:
    return bytes(k.verify_key)


MINIMAL = Terms(
    licence_id="dicom-site",
    key_hash=key_hash(LICENCE_KEY),
    product="dicom",
    seats=5,
    expires=T0 + 30 * DAY,
    sequence=1,
)
FULL = Terms(
    licence_id="dicom-site",
    key_hash=key_hash(LICENCE_KEY),
    product="dicom",
    seats=5,
    expires=T0 + 30 * DAY,
    sequence=7,
    features={"tier": "pro", "max_studies": 500, "ocr": True, "ratio": 0.5},
    counters=(CounterTerm("studies", 1000, "monthly"), CounterTerm("exports", 50)),
    addons=(
        AddonTerm(seats=3, features={"tier": "enterprise"}, starts=T0 + DAY, ends=T0 + 8 * DAY),
        AddonTerm(seats=1),
    ),
    not_before=T0 + 0.5,
    max_ttl=7 * DAY,
    binding=Binding(("mid:abc", "mac:00:11", "disk:42"), 2),
)


def body(blob: bytes) -> dict[str, Any]:
    value: dict[str, Any] = msgpack.unpackb(blob[SIGNATURE_LEN:], raw=False)
    return value


def signed(**changes: Any) -> bytes:
    """FULL's entitlement with `changes` to its payload (None removes a key), re-signed."""
    payload = {**entitlement_payload(pub(VENDOR), pub(DAEMON), T0, FULL), **changes}
    return sign(VENDOR, {k: v for k, v in payload.items() if v is not None})


def read(blob: bytes) -> Entitlement:
    return read_entitlement(open_statement(blob, pub(VENDOR)), blob)


# ------------------------------------------------------------------ the statement


def test_the_key_hash_is_sha256_of_the_domain_and_the_key() -> None:
    assert KEY_HASH_DOMAIN == b"licd-licence-key-v1\x00"
    assert key_hash("é-1") == hashlib.sha256(b"licd-licence-key-v1\x00\xc3\xa9-1").digest()
    assert key_hash("A") != key_hash("B")


def test_a_minimal_entitlement_holds_the_required_fields_only() -> None:
    ent = issue(VENDOR, pub(DAEMON), T0, MINIMAL)
    assert body(ent.statement) == {
        "typ": "entitlement",
        "iss": pub(VENDOR),
        "iat": 1_767_225_600,  # a whole second is written as an integer
        "exp": 1_767_225_600 + 30 * 86_400,
        "del": pub(DAEMON),
        "lic": "dicom-site",
        "keyhash": key_hash(LICENCE_KEY),
        "product": "dicom",
        "seats": 5,
        "features": {},
        "seq": 1,
    }
    assert type(body(ent.statement)["iat"]) is int
    assert ent.terms == MINIMAL
    assert (ent.vendor, ent.daemon, ent.issued, ent.expires) == (
        pub(VENDOR),
        pub(DAEMON),
        T0,
        MINIMAL.expires,
    )


def test_every_term_round_trips() -> None:
    ent = issue(VENDOR, pub(DAEMON), T0, FULL)
    payload = body(ent.statement)
    assert payload["counters"] == [
        {"name": "studies", "limit": 1000, "reset": "monthly"},
        {"name": "exports", "limit": 50, "reset": "never"},
    ]
    assert payload["addons"] == [
        {
            "seats": 3,
            "features": {"tier": "enterprise"},
            "starts": T0 + DAY,
            "ends": T0 + 8 * DAY,
        },
        {"seats": 1, "features": {}},
    ]
    assert payload["nbf"] == T0 + 0.5 and type(payload["nbf"]) is float
    assert payload["max_ttl"] == 7 * 86_400
    assert payload["bind"] == {"hostid": ["mid:abc", "mac:00:11", "disk:42"], "need": 2}
    assert ent.terms == FULL
    assert read(ent.statement) == ent
    assert open_entitlement(ent.statement, [pub(STRANGER), pub(VENDOR)]) == ent


def test_issue_refuses_a_daemon_key_of_the_wrong_length_and_an_empty_period() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        issue(VENDOR, pub(DAEMON)[:31], T0, MINIMAL)
    with pytest.raises(ValueError, match="expire after it is issued"):
        issue(VENDOR, pub(DAEMON), MINIMAL.expires, MINIMAL)


# Every refusal of read_entitlement: a payload change and the message it gives.
BAD_FIELDS: list[tuple[str, dict[str, Any], str]] = [
    ("typ", {"typ": "lease"}, "a 'lease' statement is not an entitlement"),
    ("del-missing", {"del": None}, "'del' (the daemon key it is for) is required"),
    ("unknown-key", {"extra": 1}, "entitlement: unknown keys 'extra'"),
    ("lic-missing", {"lic": None}, "'lic' is required"),
    ("lic-empty", {"lic": ""}, "'lic' must not be empty"),
    ("lic-long", {"lic": "x" * 65}, "'lic' must be at most 64 characters"),
    ("lic-bin", {"lic": b"dicom"}, "'lic' must be a string"),
    ("keyhash-missing", {"keyhash": None}, "'keyhash' is required"),
    ("keyhash-short", {"keyhash": bytes(31)}, "'keyhash' must be 32 bytes of binary"),
    ("keyhash-str", {"keyhash": "00" * 32}, "'keyhash' must be binary"),
    ("product-missing", {"product": None}, "'product' is required"),
    ("product-empty", {"product": ""}, "'product' must not be empty"),
    ("seats-missing", {"seats": None}, "'seats' is required"),
    ("seats-zero", {"seats": 0}, "'seats' must be at least 1"),
    ("seats-big", {"seats": 65536}, "'seats' must be at most 65535"),
    ("seats-bool", {"seats": True}, "'seats' must be an unsigned integer"),
    ("seats-float", {"seats": 5.0}, "'seats' must be an unsigned integer"),
    ("features-missing", {"features": None}, "'features' is required"),
    ("features-array", {"features": ["tier"]}, "'features' must be a map"),
    ("features-nil-value", {"features": {"a": []}}, "'features' must map strings to"),
    ("seq-missing", {"seq": None}, "'seq' is required"),
    ("seq-zero", {"seq": 0}, "'seq' must be at least 1"),
    ("seq-big", {"seq": 2**53 + 1}, "'seq' must be at most"),
    ("counters-map", {"counters": {"a": 1}}, "'counters' must be an array"),
    ("counters-items", {"counters": [1]}, "'counters' must be an array of maps"),
    (
        "counters-65",
        {"counters": [{"name": f"c{i}", "limit": 1} for i in range(65)]},
        "'counters' has more than 64 entries",
    ),
    (
        "counter-twice",
        {"counters": [{"name": "c", "limit": 1}, {"name": "c", "limit": 2}]},
        "'counters' names a counter twice",
    ),
    ("counter-name", {"counters": [{"limit": 1}]}, "counter: 'name' is required"),
    ("counter-limit", {"counters": [{"name": "c", "limit": -1}]}, "'limit' must be an unsigned"),
    (
        "counter-reset",
        {"counters": [{"name": "c", "limit": 1, "reset": "weekly"}]},
        "'reset' must be one of never, daily, monthly",
    ),
    (
        "counter-unknown",
        {"counters": [{"name": "c", "limit": 1, "every": 2}]},
        "entitlement counter: unknown keys 'every'",
    ),
    ("addons-items", {"addons": ["x"]}, "'addons' must be an array of maps"),
    ("addon-seats", {"addons": [{"features": {}}]}, "add-on: 'seats' is required"),
    ("addon-features", {"addons": [{"seats": 1}]}, "add-on: 'features' is required"),
    (
        "addon-starts",
        {"addons": [{"seats": 1, "features": {}, "starts": "soon"}]},
        "add-on: 'starts' must be a number",
    ),
    (
        "addon-ends-first",
        {"addons": [{"seats": 1, "features": {}, "starts": T0, "ends": T0}]},
        "add-on: 'ends' is not after 'starts'",
    ),
    (
        "addon-unknown",
        {"addons": [{"seats": 1, "features": {}, "extra": 1}]},
        "add-on: unknown keys 'extra'",
    ),
    ("nbf-str", {"nbf": "now"}, "'nbf' must be a number"),
    ("nbf-at-exp", {"nbf": T0 + 30 * DAY}, "'nbf' is not before 'exp'"),
    ("nbf-nan", {"nbf": float("nan")}, "'nbf' must be a finite number"),
    ("max-ttl-zero", {"max_ttl": 0}, "'max_ttl' must be positive"),
    ("max-ttl-negative", {"max_ttl": -1.0}, "'max_ttl' must be positive"),
    ("bind-array", {"bind": ["mid:abc"]}, "'bind' must be a map"),
    ("bind-need-missing", {"bind": {"hostid": ["a"]}}, "bind: 'need' is required"),
    ("bind-no-components", {"bind": {"need": 1}}, "'hostid' holds 1 to 16 components"),
    (
        "bind-17",
        {"bind": {"hostid": [f"c{i}" for i in range(17)], "need": 1}},
        "'hostid' holds 1 to 16 components",
    ),
    (
        "bind-twice",
        {"bind": {"hostid": ["a", "a"], "need": 1}},
        "'hostid' names a component twice",
    ),
    ("bind-need-zero", {"bind": {"hostid": ["a"], "need": 0}}, "'need' must be at least 1"),
    (
        "bind-need-above",
        {"bind": {"hostid": ["a", "b"], "need": 3}},
        "'need' is more than the components named",
    ),
    (
        "bind-unknown",
        {"bind": {"hostid": ["a"], "need": 1, "any": True}},
        "entitlement bind: unknown keys 'any'",
    ),
]


@pytest.mark.parametrize(
    ("changes", "error"), [c[1:] for c in BAD_FIELDS], ids=[c[0] for c in BAD_FIELDS]
)
def test_read_entitlement_refuses_each_malformed_field(changes: dict[str, Any], error: str) -> None:
    blob = signed(**changes)
    with pytest.raises(TokenInvalid) as info:
        read(blob)
    assert error in str(info.value)
    with pytest.raises(TokenInvalid):  # and so does the trusted reader
        open_entitlement(blob, [pub(VENDOR)])


def test_a_nil_value_is_not_an_absent_optional_field() -> None:
    payload = {**entitlement_payload(pub(VENDOR), pub(DAEMON), T0, MINIMAL), "nbf": None}
    with pytest.raises(TokenInvalid, match="'nbf' must not be nil"):
        read(sign(VENDOR, payload))


def test_open_entitlement_names_an_untrusted_vendor_key() -> None:
    blob = issue(STRANGER, pub(DAEMON), T0, MINIMAL).statement
    with pytest.raises(UntrustedKey) as info:
        open_entitlement(blob, [pub(VENDOR)])
    assert info.value.signer == pub(STRANGER)
    assert str(info.value) == (
        f"signed by key fingerprint {fingerprint(pub(STRANGER))}, not by a vendor key "
        f"(trusted: {fingerprint(pub(VENDOR))})"
    )


def test_open_entitlement_refuses_what_is_not_genuinely_signed() -> None:
    blob = issue(VENDOR, pub(DAEMON), T0, MINIMAL).statement
    # A stranger's signature over a payload naming the vendor: a bad signature.
    forged = sign(STRANGER, body(blob))
    with pytest.raises(TokenInvalid, match="^bad signature$"):
        open_entitlement(forged, [pub(VENDOR)])
    # Naming another key it was not signed by either: a bad signature, not untrusted.
    claims_stranger = sign(VENDOR, {**body(blob), "iss": pub(STRANGER)})
    with pytest.raises(TokenInvalid, match="^bad signature$") as info:
        open_entitlement(claims_stranger, [pub(VENDOR)])
    assert not isinstance(info.value, UntrustedKey)
    flipped = bytearray(blob)
    flipped[10] ^= 1  # in the signature
    with pytest.raises(TokenInvalid, match="bad signature"):
        open_entitlement(bytes(flipped), [pub(VENDOR)])
    with pytest.raises(TokenInvalid, match="not a signed statement"):
        open_entitlement(b"\x00" * 80, [pub(VENDOR)])
    with pytest.raises(TokenInvalid, match="names no signing key"):
        open_entitlement(sign(VENDOR, {**body(blob), "iss": None}), [pub(VENDOR)])
    with pytest.raises(TokenInvalid, match="no vendor key"):
        open_entitlement(blob, [])


# ------------------------------------------------------------------------ files


def test_a_file_round_trips_with_and_without_a_licence_key() -> None:
    first = issue(VENDOR, pub(DAEMON), T0, FULL)
    renewal = issue(VENDOR, pub(DAEMON), T0, MINIMAL)
    odd_key = 'ACME "quoted" \\ back'
    text = write_file([(odd_key, first), (None, renewal)])
    assert text.startswith("# licd entitlements: import with `licd entitlement import FILE`")
    assert "# licence dicom-site: product dicom, 5 seat(s), sequence 7" in text
    assert "valid 2026-01-01T00:00:00Z .. 2026-01-31T00:00:00Z" in text
    assert f"# for daemon key {pub(DAEMON).hex()}" in text
    assert text.count("key = ") == 1  # the renewal's entry has none
    assert read_file(text) == [
        FileEntry(odd_key, first.statement),
        FileEntry(None, renewal.statement),
    ]


def test_write_file_refuses_a_control_character() -> None:
    with pytest.raises(ValueError, match="control character"):
        write_file([("ACME\n[x]", issue(VENDOR, pub(DAEMON), T0, MINIMAL))])


STATEMENT = base64.b64encode(b"s" * 80).decode()


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("[[entitlement]\n", "not an entitlement file (TOML)"),
        ("", "it must hold [[entitlement]] tables only"),
        ("entitlement = []\n", "it must hold [[entitlement]] tables only"),
        ("entitlement = 1\n", "it must hold [[entitlement]] tables only"),
        (f'other = 1\n[[entitlement]]\nstatement = "{STATEMENT}"\n', "tables only"),
        (f'[[entitlement]]\nstatement = "{STATEMENT}"\nseq = 2\n', "unknown keys seq"),
        (f'[[entitlement]]\nkey = ""\nstatement = "{STATEMENT}"\n', "'key' must be"),
        (f'[[entitlement]]\nkey = 5\nstatement = "{STATEMENT}"\n', "'key' must be"),
        (f'[[entitlement]]\nkey = "{"k" * 257}"\nstatement = "{STATEMENT}"\n', "'key' must"),
        ('[[entitlement]]\nkey = "K"\n', "'statement' must be the statement in base64"),
        ('[[entitlement]]\nstatement = "not base64!"\n', "'statement' is not valid base64"),
        (
            f'[[entitlement]]\nstatement = "{STATEMENT}"\n[[entitlement]]\nstatement = 1\n',
            "entitlement[1]: 'statement' must be",
        ),
    ],
    ids=[
        "not-toml",
        "empty",
        "empty-list",
        "not-tables",
        "other-key",
        "unknown-entry-key",
        "empty-key",
        "key-int",
        "key-long",
        "no-statement",
        "not-base64",
        "second-entry",
    ],
)
def test_read_file_refuses_what_is_not_an_entitlement_file(text: str, error: str) -> None:
    with pytest.raises(ValueError) as info:
        read_file(text)
    assert error in str(info.value)


# --------------------------------------------------------------------- requests

USAGE = (
    LicenceUsage(
        "dicom-site",
        slot=3600.0,
        peaks=((T0, 4), (T0 + 3600.5, 5)),
        denials=2,
        counters={"studies": 120},
    ),
    LicenceUsage("cad-site", slot=86_400.0),
)


def request(**changes: Any) -> bytes:
    made = make_request(
        DAEMON,
        site="branch-7",
        made=T0,
        components=["mid:abc", "mac:00:11"],
        entitlements=[issue(VENDOR, pub(DAEMON), T0, FULL).statement],
        usage=USAGE,
    )
    if not changes:
        return made
    payload = {**body(made), **changes}
    return sign(DAEMON, {k: v for k, v in payload.items() if v is not None})


def test_a_request_round_trips() -> None:
    blob = request()
    got = read_request(blob)
    assert got.daemon == pub(DAEMON)
    assert (got.site, got.made, got.expires) == ("branch-7", T0, T0 + REQUEST_VALID)
    assert got.components == ("mid:abc", "mac:00:11")
    assert got.entitlements == (issue(VENDOR, pub(DAEMON), T0, FULL).statement,)
    assert got.usage == USAGE
    assert got.statement == blob
    assert body(blob)["typ"] == "entitlement_request"


def test_a_request_file_round_trips() -> None:
    blob = request()
    text = request_file(blob)
    assert text.startswith("# licd renewal request: send it to the vendor")
    assert read_request_file(text) == blob


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("request = ", "not a renewal request file (TOML)"),
        ("", 'it must hold `request = "..."` only'),
        ('request = "AAAA"\nsite = "x"\n', 'it must hold `request = "..."` only'),
        ("request = 5\n", 'it must hold `request = "..."` only'),
        ('request = "*not base64*"\n', "the request is not valid base64"),
    ],
    ids=["not-toml", "empty", "other-key", "not-a-string", "not-base64"],
)
def test_read_request_file_refuses_what_is_not_a_request_file(text: str, error: str) -> None:
    with pytest.raises(ValueError) as info:
        read_request_file(text)
    assert error in str(info.value)


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"typ": "entitlement"}, "a 'entitlement' statement is not a renewal request"),
        ({"site": None}, "renewal request: 'site' is required"),
        ({"hostid": "mid:abc"}, "'hostid' must be an array of non-empty strings"),
        ({"entitlements": ["x"]}, "'entitlements' must be an array of binaries"),
        ({"usage": []}, "'usage' must be a map"),
        ({"extra": 1}, "renewal request: unknown keys 'extra'"),
        ({"usage": {"a": 1}}, "'usage' must map licence ids to maps"),
        (
            {"usage": {"a": {"slot": 0, "peaks": [], "denials": 0, "counters": {}}}},
            "'slot' must be positive",
        ),
        (
            {"usage": {"a": {"slot": 60, "peaks": [[T0, -1]], "denials": 0, "counters": {}}}},
            "'peaks' is malformed",
        ),
        (
            {"usage": {"a": {"slot": 60, "peaks": [[T0, True]], "denials": 0, "counters": {}}}},
            "'peaks' is malformed",
        ),
        (
            {"usage": {"a": {"slot": 60, "peaks": [], "denials": 0, "counters": {"c": -1}}}},
            "'counters' is malformed",
        ),
        (
            {"usage": {"a": {"slot": 60, "peaks": [], "denials": 0, "counters": {}, "x": 1}}},
            "unknown keys 'x'",
        ),
    ],
    ids=[
        "typ",
        "no-site",
        "hostid",
        "entitlements",
        "usage-array",
        "unknown",
        "usage-item",
        "slot",
        "peak-negative",
        "peak-bool",
        "counter-negative",
        "usage-unknown",
    ],
)
def test_read_request_refuses_each_malformed_field(changes: dict[str, Any], error: str) -> None:
    with pytest.raises(TokenInvalid) as info:
        read_request(request(**changes))
    assert error in str(info.value)


def test_read_request_refuses_what_its_key_did_not_sign() -> None:
    blob = bytearray(request())
    blob[10] ^= 1  # in the signature
    with pytest.raises(TokenInvalid, match="bad signature"):
        read_request(bytes(blob))
    # Signed by a stranger while naming the daemon's key: refused, not read as the stranger's.
    with pytest.raises(TokenInvalid, match="bad signature"):
        read_request(sign(STRANGER, body(request())))
    with pytest.raises(TokenInvalid, match="not a signed statement"):
        read_request(b"\xff" * 70)
    with pytest.raises(TokenInvalid, match="names no signing key"):
        read_request(request(iss=b"short"))
