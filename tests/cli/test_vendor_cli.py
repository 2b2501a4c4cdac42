"""Tests of `licd vendor keygen / issue / renew` (licd/cli/vendor.py), through click's
CliRunner with real keys and real files in tmp_path.

What a command writes is read back with licd_client.entitlements (read_file,
open_entitlement with the vendor key keygen printed), so the tests check the signed
terms, not the wording of a file. Times are given (--issued, --now), never read. Every
refusal must exit 1 or 2 with a one-sentence error, no stack trace and no file written.
"""

from __future__ import annotations

import os
import stat
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result
from nacl.signing import SigningKey

from licd.cli import format as fmt
from licd.cli.main import main
from licd.cli.outfile import write_output
from licd.store.keyfile import load_key
from licd_client import entitlements as ents
from licd_client.entitlements import (
    REQUEST_VALID,
    AddonTerm,
    Binding,
    CounterTerm,
    Entitlement,
    LicenceUsage,
    Terms,
)

T0 = 1_790_000_000.0  # 2026-09-21 14:13:20Z: when the first entitlement is issued
DAY = 86400.0
EXPIRES = T0 + 30 * DAY
T1 = T0 + 25 * DAY  # when the site's request is answered
DAEMON = SigningKey(b"d" * 32)  # the site daemon's key
OTHER_DAEMON = SigningKey(b"o" * 32)
OTHER_VENDOR = SigningKey(b"v" * 32)
LICENCE_KEY = "XXXX-YYYY-ZZZZ"


def iso(t: float) -> str:
    return fmt.iso(t).replace(".000", "")


def public(key: SigningKey) -> bytes:
    return bytes(key.verify_key)


def licd(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(*args: object) -> str:
    result = licd(*args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def refused(code: int, *args: object) -> str:
    """`licd ARGS` exits `code` with an error, no traceback; returns its stderr."""
    result = licd(*args)
    assert result.exit_code == code, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert result.stdout == ""
    return result.stderr


def files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


@pytest.fixture
def vendor_key(tmp_path: Path) -> tuple[Path, bytes]:
    """A vendor key made by `licd vendor keygen`, and the public key it printed."""
    path = tmp_path / "vendor.key"
    printed = ok("vendor", "keygen", path).splitlines()[-1]
    return path, bytes.fromhex(printed)


def read_out(path: Path, vendor: bytes) -> list[tuple[str | None, Entitlement]]:
    """An entitlement file's entries: each key, and its statement verified as the vendor's."""
    return [
        (e.key, ents.open_entitlement(e.statement, [vendor]))
        for e in ents.read_file(path.read_text())
    ]


# ------------------------------------------------------------------------- keygen


def test_keygen_writes_a_private_key_and_prints_its_public_key_last(tmp_path: Path) -> None:
    path = tmp_path / "vendor.key"
    lines = ok("vendor", "keygen", path).splitlines()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert lines[-1] == public(load_key(path)).hex()
    assert len(lines[-1]) == 64
    assert str(path) in lines[0] and "trust" in lines[-2]


def test_keygen_refuses_to_overwrite_anything(tmp_path: Path) -> None:
    existing = tmp_path / "vendor.key"
    existing.write_text("precious\n")
    dangling = tmp_path / "link.key"
    dangling.symlink_to(tmp_path / "nowhere")
    for path in (existing, dangling):
        assert "already exists: not replaced" in refused(1, "vendor", "keygen", path)
    assert existing.read_text() == "precious\n"
    assert files(tmp_path) == {"vendor.key", "link.key"}


def test_keygen_into_a_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    error = refused(1, "vendor", "keygen", tmp_path / "no" / "vendor.key")
    assert "cannot write the key" in error
    assert files(tmp_path) == set()


# -------------------------------------------------------------------------- issue


def issue_args(key: Path, out: Path, *extra: object) -> list[object]:
    return [
        "vendor",
        "issue",
        "--key",
        key,
        "--for",
        public(DAEMON).hex(),
        "--licence-id",
        "dicom-hq",
        "--licence-key",
        LICENCE_KEY,
        "--product",
        "dicom",
        "--seats",
        10,
        "--expires",
        iso(EXPIRES),
        "--sequence",
        3,
        "--issued",
        iso(T0),
        "--out",
        out,
        *extra,
    ]


def test_issue_signs_the_terms_asked_for_the_daemon_key(
    tmp_path: Path, vendor_key: tuple[Path, bytes]
) -> None:
    key, vendor = vendor_key
    out = tmp_path / "dicom.toml"
    printed = ok(
        *issue_args(key, out),
        *("--feature", "tier=pro", "--feature", "modules=core,ocr", "--feature", "max=4"),
        *("--counter", "pages=5000/monthly", "--counter", "exports=10"),
        *("--addon", f"5:{iso(T0 + DAY)}..{iso(T0 + 2 * DAY)}", "--addon", "2"),
        *("--addon", f"1:..{iso(T0 + DAY)}", "--addon", f"3:{iso(T0 + DAY)}.."),
        *("--not-before", iso(T0 - DAY), "--max-ttl", "8h"),
        *("--bind", "machine:aa", "--bind", "mac:bb", "--bind", "host:cc"),
    )
    [(licence_key, ent)] = read_out(out, vendor)
    assert licence_key == LICENCE_KEY
    assert ent.vendor == vendor and ent.daemon == public(DAEMON) and ent.issued == T0
    assert ent.terms == Terms(
        licence_id="dicom-hq",
        key_hash=ents.key_hash(LICENCE_KEY),
        product="dicom",
        seats=10,
        expires=EXPIRES,
        sequence=3,
        features={"tier": "pro", "modules": "core,ocr", "max": 4},
        counters=(CounterTerm("pages", 5000, "monthly"), CounterTerm("exports", 10, "never")),
        addons=(
            AddonTerm(5, starts=T0 + DAY, ends=T0 + 2 * DAY),
            AddonTerm(2),
            AddonTerm(1, ends=T0 + DAY),
            AddonTerm(3, starts=T0 + DAY),
        ),
        not_before=T0 - DAY,
        max_ttl=8 * 3600.0,
        binding=Binding(("machine:aa", "mac:bb", "host:cc"), 2),
    )
    assert stat.S_IMODE(out.stat().st_mode) == 0o600  # it holds the licence key
    assert files(tmp_path) == {"vendor.key", "dicom.toml"}
    assert printed.count("\n") == 1 and "licence dicom-hq" in printed
    assert "sequence 3" in printed and public(DAEMON).hex()[:16] in printed


@pytest.mark.parametrize(
    ("binds", "need", "expected"),
    [
        (["a", "b", "c", "d"], None, 3),
        (["a", "b", "c"], None, 2),
        (["a", "b"], None, 2),
        (["a"], None, 1),
        (["a", "b", "c"], 1, 1),
        (["a", "b", "c"], 3, 3),
    ],
)
def test_issue_binds_all_but_one_of_three_or_more_components_unless_told(
    tmp_path: Path,
    vendor_key: tuple[Path, bytes],
    binds: list[str],
    need: int | None,
    expected: int,
) -> None:
    key, vendor = vendor_key
    out = tmp_path / "e.toml"
    extra = [arg for b in binds for arg in ("--bind", b)]
    ok(*issue_args(key, out), *extra, *(() if need is None else ("--bind-need", need)))
    [(_, ent)] = read_out(out, vendor)
    assert ent.terms.binding == Binding(tuple(binds), expected)


def test_issue_without_options_has_no_optional_terms(
    tmp_path: Path, vendor_key: tuple[Path, bytes]
) -> None:
    key, vendor = vendor_key
    ok(*issue_args(key, tmp_path / "e.toml"))
    [(_, ent)] = read_out(tmp_path / "e.toml", vendor)
    assert (ent.terms.features, ent.terms.counters, ent.terms.addons) == ({}, (), ())
    assert (ent.terms.not_before, ent.terms.max_ttl, ent.terms.binding) == (None, None, None)


@pytest.mark.parametrize(
    ("change", "code", "message"),
    [
        ({"--expires": iso(T0)}, 2, "is not after the issue time"),
        ({"--expires": iso(T0 - DAY)}, 2, "is not after the issue time"),
        ({"--expires": "2027-01-01"}, 2, "has no time zone"),
        ({"--seats": 0}, 2, "--seats"),
        ({"--seats": 65536}, 2, "--seats"),
        ({"--sequence": 0}, 2, "--sequence"),
        ({"--sequence": 2**53 + 1}, 1, "'seq' must be at most"),
        ({"--for": "zz" * 32}, 2, "hex digits"),
        ({"--for": public(DAEMON).hex()[:-2]}, 2, "64 hex digits"),
        ({"--for": public(DAEMON).hex() + "00"}, 2, "64 hex digits"),
        ({"--licence-id": "x" * 65}, 1, "'lic' must be at most 64"),
        ({"--licence-id": ""}, 1, "'lic' must not be empty"),
        ({"--licence-id": "a\nb"}, 1, "control character"),
        ({"--licence-key": ""}, 2, "--licence-key"),
        ({"--licence-key": "k" * 257}, 2, "--licence-key"),
        ({"--licence-key": "XX\x1bYY"}, 1, "control character"),
        ({"--product": ""}, 1, "'product' must not be empty"),
    ],
)
def test_issue_refuses_a_bad_value_and_writes_nothing(
    tmp_path: Path,
    vendor_key: tuple[Path, bytes],
    change: dict[str, object],
    code: int,
    message: str,
) -> None:
    key, _ = vendor_key
    args = issue_args(key, tmp_path / "e.toml")
    for option, value in change.items():
        args[args.index(option) + 1] = value
    assert message in refused(code, *args)
    assert files(tmp_path) == {"vendor.key"}


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["--feature", "tier"], 2, "write a feature as name=value"),
        (["--feature", "=pro"], 2, "write a feature as name=value"),
        (["--counter", "pages"], 2, "NAME=LIMIT"),
        (["--counter", "=5"], 2, "NAME=LIMIT"),
        (["--counter", "pages=lots"], 2, "whole number"),
        (["--counter", "pages=-5"], 2, "whole number"),
        (["--counter", "pages=5/weekly"], 2, "never, daily, monthly"),
        (["--counter", "a=1", "--counter", "a=2"], 1, "names a counter twice"),
        (["--addon", "0"], 2, "SEATS >= 1"),
        (["--addon", "five"], 2, "SEATS >= 1"),
        (["--addon", "5:"], 2, "FROM..TO"),
        (["--addon", "5:.."], 2, "FROM..TO"),
        (["--addon", f"5:{iso(T0)}"], 2, "FROM..TO"),
        (["--addon", "5:2027-13-01T00:00:00Z.."], 2, "not an ISO date-time"),
        (["--addon", f"5:{iso(T0 + 2 * DAY)}..{iso(T0 + DAY)}"], 2, "end after it starts"),
        (["--addon", f"5:..{iso(T0)}"], 2, "ends before the issue time"),
        (["--addon", "70000"], 1, "must be at most 65535"),
        (["--not-before", iso(EXPIRES)], 2, "is not before --expires"),
        (["--not-before", iso(EXPIRES + DAY)], 2, "is not before --expires"),
        (["--max-ttl", "soon"], 2, "invalid duration"),
        (["--max-ttl", "0"], 2, "greater than 0"),
        (["--bind-need", 1], 2, "--bind-need needs the components"),
        (["--bind", "a", "--bind-need", 2], 1, "'need' is more than the components"),
        (["--bind", "a", "--bind", "a"], 1, "names a component twice"),
        (["--bind", "a", "--bind-need", 0], 2, "--bind-need"),
    ],
)
def test_issue_refuses_bad_terms_and_writes_nothing(
    tmp_path: Path, vendor_key: tuple[Path, bytes], extra: list[object], code: int, message: str
) -> None:
    key, _ = vendor_key
    assert message in refused(code, *issue_args(key, tmp_path / "e.toml"), *extra)
    assert files(tmp_path) == {"vendor.key"}


def test_issue_replaces_an_existing_file_only_with_force(
    tmp_path: Path, vendor_key: tuple[Path, bytes]
) -> None:
    key, vendor = vendor_key
    out = tmp_path / "e.toml"
    out.write_text("an older file\n")
    assert "already exists" in refused(1, *issue_args(key, out))
    assert out.read_text() == "an older file\n"
    ok(*issue_args(key, out), "--force")
    [(_, ent)] = read_out(out, vendor)
    assert ent.terms.sequence == 3
    assert files(tmp_path) == {"vendor.key", "e.toml"}


def test_an_output_file_is_linked_into_place_never_over_another(tmp_path: Path) -> None:
    """The last step of every command that writes: a file that appeared since the
    command checked is not replaced (without --force), and no temporary file is left."""
    out = tmp_path / "e.toml"
    out.write_text("theirs\n")
    with pytest.raises(click.ClickException, match="already exists"):
        write_output(out, "ours\n", force=False)
    assert out.read_text() == "theirs\n"
    write_output(out, "ours\n", force=True)
    assert out.read_text() == "ours\n"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert files(tmp_path) == {"e.toml"}


def test_issue_into_a_missing_directory_is_a_clear_error(
    tmp_path: Path, vendor_key: tuple[Path, bytes]
) -> None:
    key, _ = vendor_key
    assert "cannot write it" in refused(1, *issue_args(key, tmp_path / "no" / "e.toml"))
    assert files(tmp_path) == {"vendor.key"}


def test_the_vendor_key_must_be_a_private_key_file(
    tmp_path: Path, vendor_key: tuple[Path, bytes]
) -> None:
    key, _ = vendor_key
    out = tmp_path / "e.toml"
    assert "vendor keygen" in refused(1, *issue_args(tmp_path / "missing.key", out))
    os.chmod(key, 0o644)
    assert "chmod 600" in refused(1, *issue_args(key, out))
    os.chmod(key, 0o640)
    assert "open to others (mode 0640)" in refused(1, *issue_args(key, out))
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key\n")
    os.chmod(garbage, 0o600)
    assert "not a vendor key" in refused(1, *issue_args(garbage, out))
    fifo = tmp_path / "fifo.key"
    os.mkfifo(fifo, 0o600)
    assert "not a regular file" in refused(1, *issue_args(fifo, out))
    assert not out.exists()


# -------------------------------------------------------------------------- renew


def terms(**changes: Any) -> Terms:
    base = Terms(
        licence_id="dicom-hq",
        key_hash=ents.key_hash(LICENCE_KEY),
        product="dicom",
        seats=10,
        expires=EXPIRES,
        sequence=3,
        features={"tier": "pro"},
        counters=(CounterTerm("pages", 5000, "monthly"),),
        addons=(
            AddonTerm(5, starts=T0, ends=T1),  # ended when the request is answered
            AddonTerm(2, starts=T0, ends=T1 + DAY),
            AddonTerm(1),
        ),
        not_before=T0 - DAY,
        max_ttl=8 * 3600.0,
        binding=Binding(("machine:aa", "mac:bb", "host:cc"), 2),
    )
    return replace(base, **changes)


def entitlement(vendor: SigningKey, for_daemon: SigningKey = DAEMON, **changes: Any) -> bytes:
    return ents.issue(vendor, public(for_daemon), T0, terms(**changes)).statement


USAGE = LicenceUsage(
    "dicom-hq",
    slot=3600.0,
    peaks=((T0, 4), (T0 + 3600, 9), (T0 + 7200, 7)),
    denials=3,
    counters={"pages": 1234},
)


def request_file(
    directory: Path,
    held: list[bytes],
    *,
    signer: SigningKey = DAEMON,
    made: float = T1 - DAY,
    usage: tuple[LicenceUsage, ...] = (USAGE,),
    components: tuple[str, ...] = ("machine:aa", "mac:bb", "host:zz"),
    tamper: bool = False,
) -> Path:
    blob = ents.make_request(
        signer,
        site="hq",
        made=made,
        components=components,
        entitlements=held,
        usage=usage,
    )
    if tamper:
        blob = blob[:-1] + bytes([blob[-1] ^ 1])
    path = directory / "request.toml"
    path.write_text(ents.request_file(blob))
    return path


def renew_args(key: Path, request: Path, out: Path, *extra: object) -> list[object]:
    return [
        "vendor",
        "renew",
        "--key",
        key,
        "--request",
        request,
        "--out",
        out,
        "--now",
        iso(T1),
        *extra,
    ]


def test_renew_issues_the_same_terms_with_the_next_sequence_and_a_new_expiry(
    tmp_path: Path, vendor_key: tuple[Path, bytes]
) -> None:
    key, vendor = vendor_key
    signer = load_key(key)
    request = request_file(tmp_path, [entitlement(signer)])
    out = tmp_path / "renewed.toml"
    printed = ok(*renew_args(key, request, out))
    assert "key =" not in out.read_text()  # the vendor never sees the licence key
    [(licence_key, ent)] = read_out(out, vendor)
    assert licence_key is None
    assert ent.daemon == public(DAEMON) and ent.issued == T1
    assert (
        ent.terms
        == replace(
            terms(),
            sequence=4,
            expires=T1 + 35 * DAY,
            not_before=None,  # already past
            addons=terms().addons[1:],  # the first one ended
        )
    )
    lines = printed.splitlines()
    assert "site hq" in lines[0] and public(DAEMON).hex()[:16] in lines[0]
    assert lines[1] == (
        f"licence dicom-hq: sequence 4, 10 seat(s), expires {fmt.when(T1 + 35 * DAY)}"
        f" (was {fmt.when(EXPIRES)})"
    )
    assert lines[2] == (
        f"  used: peak 9 seat(s) ({fmt.when(T0)} .. {fmt.when(T0 + 3 * 3600)}), "
        "3 checkout(s) refused, counter pages 1234 of 5000 (monthly)"
    )
    assert lines[3].startswith(f"wrote {out}: 1 entitlement(s)")
    assert files(tmp_path) == {"vendor.key", "request.toml", "renewed.toml"}


def test_renew_keeps_a_start_date_still_to_come_and_sets_seats_when_told(
    tmp_path: Path, vendor_key: tuple[Path, bytes]
) -> None:
    key, vendor = vendor_key
    held = [entitlement(load_key(key), not_before=T1 + DAY, expires=T1 + 40 * DAY)]
    out = tmp_path / "renewed.toml"
    ok(*renew_args(key, request_file(tmp_path, held), out, "--valid", "60d", "--seats", 25))
    [(_, ent)] = read_out(out, vendor)
    assert (ent.terms.not_before, ent.terms.expires) == (T1 + DAY, T1 + 60 * DAY)
    assert ent.terms.seats == 25


def test_renew_answers_each_licence_once_from_its_latest_entitlement(
    tmp_path: Path, vendor_key: tuple[Path, bytes]
) -> None:
    key, vendor = vendor_key
    signer = load_key(key)
    held = [
        entitlement(signer, sequence=7),
        entitlement(signer, sequence=5, seats=3),
        entitlement(signer, licence_id="cad", product="cad", sequence=1),
        entitlement(OTHER_VENDOR, licence_id="other"),  # another vendor's: left alone
    ]
    out = tmp_path / "renewed.toml"
    printed = ok(*renew_args(key, request_file(tmp_path, held), out))
    renewed = {e.terms.licence_id: e.terms for _, e in read_out(out, vendor)}
    assert sorted(renewed) == ["cad", "dicom-hq"]
    assert (renewed["dicom-hq"].sequence, renewed["dicom-hq"].seats) == (8, 10)
    assert renewed["cad"].sequence == 2
    assert "licence cad: sequence 2" in printed and "  used: not reported" in printed


def test_renew_warns_when_the_renewal_expires_sooner_than_what_it_renews(
    tmp_path: Path, vendor_key: tuple[Path, bytes]
) -> None:
    key, vendor = vendor_key
    request = request_file(tmp_path, [entitlement(load_key(key))])
    out = tmp_path / "renewed.toml"
    printed = ok(*renew_args(key, request, out, "--valid", "1d"))  # EXPIRES is T1 + 5 days
    [(_, ent)] = read_out(out, vendor)
    assert ent.terms.expires == T1 + DAY
    assert "warning: it expires before the entitlement it renews" in printed
    printed = ok(*renew_args(key, request, out, "--valid", "5d", "--force"))
    assert "warning" not in printed


def test_renew_warns_when_the_site_no_longer_matches_its_binding(
    tmp_path: Path, vendor_key: tuple[Path, bytes]
) -> None:
    key, _ = vendor_key
    held = [entitlement(load_key(key))]
    request = request_file(tmp_path, held, components=("machine:aa", "mac:xx", "host:zz"))
    printed = ok(*renew_args(key, request, tmp_path / "renewed.toml"))
    assert "matches 1 of the components bound, 2 needed" in printed
    request = request_file(tmp_path, held)  # 2 of 3 match: no warning
    assert "warning" not in ok(*renew_args(key, request, tmp_path / "renewed.toml", "--force"))


def test_renew_refuses_entitlements_issued_to_another_daemon_key(
    tmp_path: Path, vendor_key: tuple[Path, bytes]
) -> None:
    key, _ = vendor_key
    held = [entitlement(load_key(key), for_daemon=OTHER_DAEMON)]
    request = request_file(tmp_path, held)  # signed by DAEMON
    error = refused(1, *renew_args(key, request, tmp_path / "renewed.toml"))
    assert f"issued for daemon key {public(OTHER_DAEMON).hex()[:16]}" in error
    assert f"signed by daemon key {public(DAEMON).hex()[:16]}" in error
    assert files(tmp_path) == {"vendor.key", "request.toml"}


def test_renew_refuses_a_tampered_request(tmp_path: Path, vendor_key: tuple[Path, bytes]) -> None:
    key, _ = vendor_key
    request = request_file(tmp_path, [entitlement(load_key(key))], tamper=True)
    error = refused(1, *renew_args(key, request, tmp_path / "renewed.toml"))
    assert "not a valid renewal request: bad signature" in error
    assert files(tmp_path) == {"vendor.key", "request.toml"}


def test_renew_refuses_a_request_holding_a_tampered_entitlement(
    tmp_path: Path, vendor_key: tuple[Path, bytes]
) -> None:
    key, _ = vendor_key
    blob = entitlement(load_key(key))
    request = request_file(tmp_path, [blob[:-1] + bytes([blob[-1] ^ 1])])
    error = refused(1, *renew_args(key, request, tmp_path / "renewed.toml"))
    assert "entitlement 1 of the request does not verify: bad signature" in error
    assert files(tmp_path) == {"vendor.key", "request.toml"}


def test_renew_answers_a_request_for_thirty_days_and_no_longer(
    tmp_path: Path, vendor_key: tuple[Path, bytes]
) -> None:
    key, _ = vendor_key
    held = [entitlement(load_key(key))]
    out = tmp_path / "renewed.toml"
    request = request_file(tmp_path, held, made=T1 - REQUEST_VALID)
    ok(*renew_args(key, request, out))
    out.unlink()
    request = request_file(tmp_path, held, made=T1 - REQUEST_VALID - 1)
    error = refused(1, *renew_args(key, request, out))
    assert "more than 30d ago: ask the site for a new one" in error
    assert files(tmp_path) == {"vendor.key", "request.toml"}


@pytest.mark.parametrize("held", ["none", "other vendor"])
def test_renew_refuses_a_request_with_no_entitlement_of_this_vendor(
    tmp_path: Path, vendor_key: tuple[Path, bytes], held: str
) -> None:
    key, vendor = vendor_key
    blobs = [] if held == "none" else [entitlement(OTHER_VENDOR)]
    error = refused(1, *renew_args(key, request_file(tmp_path, blobs), tmp_path / "r.toml"))
    assert f"no entitlement signed by this vendor key ({vendor.hex()[:16]})" in error
    assert files(tmp_path) == {"vendor.key", "request.toml"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"request = 'not base64!'\n", "not valid base64"),
        (b"[[entitlement]]\nstatement = ''\n", "not a renewal request file"),
        (b"\xff\xfe", "not a renewal request file (not text)"),
        (b'request = "AAAA"\n', "not a valid renewal request"),
    ],
)
def test_renew_refuses_what_is_not_a_request(
    tmp_path: Path, vendor_key: tuple[Path, bytes], content: bytes, message: str
) -> None:
    key, _ = vendor_key
    request = tmp_path / "request.toml"
    request.write_bytes(content)
    assert message in refused(1, *renew_args(key, request, tmp_path / "r.toml"))
    assert "cannot read it" in refused(
        1, *renew_args(key, tmp_path / "none.toml", tmp_path / "r.toml")
    )
    assert files(tmp_path) == {"vendor.key", "request.toml"}


def test_renew_refuses_an_existing_out_file(tmp_path: Path, vendor_key: tuple[Path, bytes]) -> None:
    key, _ = vendor_key
    out = tmp_path / "renewed.toml"
    out.write_text("kept\n")
    request = request_file(tmp_path, [entitlement(load_key(key))])
    assert "already exists" in refused(1, *renew_args(key, request, out))
    assert out.read_text() == "kept\n"


def test_renew_shows_the_times_a_site_sent_even_out_of_range(
    tmp_path: Path, vendor_key: tuple[Path, bytes]
) -> None:
    key, _ = vendor_key
    usage = (replace(USAGE, peaks=((1e15, 2),)),)
    request = request_file(tmp_path, [entitlement(load_key(key))], usage=usage)
    printed = ok(*renew_args(key, request, tmp_path / "renewed.toml"))
    assert "peak 2 seat(s) (1" in printed and "out of range" in printed
