"""Vendor entitlements end to end (docs/entitlements.md): a vendor key and files made
with `licd vendor`, imported into a real daemon with `licd entitlement import`, served
to clients that trust only the vendor's key; refusals that change nothing; an offline
renewal round trip on a running site; and a restart that verifies them again.

The daemon runs in the test's event loop with a ManualClock set to the real time (the
vendor commands sign at the real time); each `licd` command runs through click's
CliRunner on a worker thread.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from licd.clock import ManualClock
from licd.config.settings import VendorConfig, load_config
from licd.daemon import Daemon, StartupError
from licd_client import AsyncClient, AsyncLease
from licd_client.errors import SeatsExhausted, UnknownLicence, UntrustedKey
from tests.integration.vendors import (
    CAD_KEY,
    SITE,
    Vendor,
    iso,
    licd,
    ok,
    refused,
    site_config,
    sock,
    vendor_fixture,  # noqa: F401 - the `vendor` fixture
)
from tests.support import DICOM, address, running


@pytest.fixture
async def site(tmp_path: Path, vendor: Vendor) -> AsyncIterator[Daemon]:
    clock = ManualClock(wall=time.time())
    async with running(site_config(tmp_path, vendor), clock, components=SITE) as daemon:
        yield daemon
        await close_clients()  # while their daemon still answers their checkins


_clients: list[AsyncClient] = []


async def close_clients() -> None:
    """Close the clients `trusting` made (their leases checked in)."""
    while _clients:
        await _clients.pop().aclose()


def trusting(daemon: Daemon, key: str) -> AsyncClient:
    """A client of `daemon` that trusts `key` alone (closed when the test ends)."""
    client = AsyncClient([address(daemon)], key, retry_for=0)
    _clients.append(client)
    return client


@pytest.fixture(autouse=True)
async def _clients_closed() -> AsyncIterator[None]:
    yield
    await close_clients()  # any a test left open (its daemon gone: slower)


async def listed(daemon: Daemon) -> list[dict[str, Any]]:
    printed = await ok("entitlement", "list", *sock(daemon), "--json")
    out: list[dict[str, Any]] = json.loads(printed)["entitlements"]
    return out


async def state(daemon: Daemon) -> tuple[Any, ...]:
    """What an import may change: the entitlements, the licences, the audit log's length."""
    licences = json.loads(await ok("licence", "list", *sock(daemon), "--json"))["licences"]
    return (await listed(daemon), licences, len(await daemon.store.audit(limit=5000)))


async def checkouts(daemon: Daemon, key: str, n: int) -> list[AsyncLease]:
    client = trusting(daemon, key)
    return [await client.checkout(CAD_KEY) for _ in range(n)]


# --------------------------------------------------------------------- served


async def test_an_imported_entitlement_serves_clients_that_trust_only_the_vendor(
    site: Daemon, vendor: Vendor
) -> None:
    path = await vendor.issue(site.public_key.hex(), "cad.toml", "--feature", "tier=pro")
    printed = await ok("entitlement", "import", str(path), *sock(site))
    assert re.search(r"cad\s+1\s+imported\s+3", printed), printed
    client = trusting(site, vendor.public)
    leases = [await client.checkout(CAD_KEY) for _ in range(3)]
    assert all(x.features == {"tier": "pro"} and len(x.chain) == 1 for x in leases)
    with pytest.raises(SeatsExhausted):
        await client.checkout(CAD_KEY)
    # The site cannot raise what the vendor granted ...
    err = await refused("licence", "update", "cad", "--seats", "10", *sock(site))
    assert "entitled by the vendor" in err and "3 seat(s)" in err, err
    with pytest.raises(SeatsExhausted):
        await client.checkout(CAD_KEY)
    # ... but may narrow it.
    await leases[0].release()
    await ok("licence", "update", "cad", "--seats", "2", *sock(site))
    with pytest.raises(SeatsExhausted):
        await client.checkout(CAD_KEY)
    [item] = await listed(site)
    assert (item["state"], item["seats"], item["seats_granted"]) == ("served", 2, 3)
    status = json.loads(await ok("status", *sock(site), "--json"))
    assert {x["id"]: x["mode"] for x in status["licences"]} == {
        "cad": "entitled",
        DICOM.id: "local",
    }
    # A local licence still works for a client trusting the daemon's key.
    local = AsyncClient([address(site)], site.public_key.hex(), retry_for=0)
    await (await local.checkout(DICOM.key)).release()
    await client.aclose()
    await local.aclose()


async def test_a_client_trusting_only_the_daemon_key_refuses_an_entitled_lease(
    site: Daemon, vendor: Vendor
) -> None:
    """An entitled licence's leases chain to the vendor's key, not the daemon's: a
    client must trust the vendor for them (docs/protocol.md §4)."""
    await ok(
        "entitlement", "import", str(await vendor.issue(site.public_key.hex(), "e")), *sock(site)
    )
    client = trusting(site, site.public_key.hex())
    with pytest.raises(UntrustedKey):
        await client.checkout(CAD_KEY)
    await client.aclose()


# ------------------------------------------------------------------- refusals


def tampered(path: Path) -> Path:
    """The file with one byte of its signed statement changed."""
    text = path.read_text()
    match = re.search(r'statement = "([^"]+)"', text)
    assert match is not None
    blob = bytearray(base64.b64decode(match.group(1)))
    blob[len(blob) // 2] ^= 1
    path.write_text(text.replace(match.group(1), base64.b64encode(bytes(blob)).decode()))
    return path


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("tampered", "does not verify"),
        ("another daemon", "for another daemon"),
        ("sequence not above", "sequence 1 is not above 1"),
        ("expired", "expired on 2021-01-01"),
        ("site binding", "site binding failed: 1 of the 3"),
        ("another vendor", "not signed by a trusted vendor key"),
        ("not a file", "not an entitlement file"),
    ],
)
async def test_an_import_refused_names_why_and_changes_nothing(
    site: Daemon, vendor: Vendor, tmp_path: Path, case: str, reason: str
) -> None:
    me = site.public_key.hex()
    await ok("entitlement", "import", str(await vendor.issue(me, "first")), *sock(site))
    leases = await checkouts(site, vendor.public, 1)
    before = await state(site)
    if case == "tampered":
        path = tampered(await vendor.issue(me, "f", seats=30, sequence=2))
    elif case == "another daemon":
        path = await vendor.issue("ab" * 32, "f", seats=30, sequence=2)
    elif case == "sequence not above":
        path = await vendor.issue(me, "f", seats=30, sequence=1)
    elif case == "expired":
        path = await vendor.issue(
            me,
            "f",
            "--issued",
            "2020-06-01T00:00:00Z",
            seats=30,
            sequence=2,
            expires="2021-01-01T00:00:00Z",
        )
    elif case == "site binding":
        binding = ["--bind", SITE[0], "--bind", "mac:9999", "--bind", "host:8888"]
        path = await vendor.issue(me, "f", *binding, seats=30, sequence=2)
    elif case == "another vendor":
        other = tmp_path / "other"
        other.mkdir()
        await ok("vendor", "keygen", str(other / "k"))
        path = await Vendor(other / "k", "", other).issue(me, "f", seats=30, sequence=2)
    else:
        path = tmp_path / "junk.toml"
        path.write_text("seats = 30\n")
    err = await refused("entitlement", "import", str(path), *sock(site))
    assert reason in err, err
    assert "Traceback" not in err
    assert await state(site) == before
    with pytest.raises(SeatsExhausted):  # still 3 seats: 1 held + 2
        await checkouts(site, vendor.public, 3)
    await leases[0].release()


async def test_a_file_with_one_bad_entitlement_imports_none_of_it(
    site: Daemon, vendor: Vendor
) -> None:
    me = site.public_key.hex()
    good = (await vendor.issue(me, "good")).read_text()
    bad = (await vendor.issue("cd" * 32, "bad", licence_id="cae", licence_key="CAE-1")).read_text()
    both = vendor.out / "both.toml"
    both.write_text(good + "\n" + bad)
    err = await refused("entitlement", "import", str(both), *sock(site))
    assert "'cae'" in err and "another daemon" in err, err
    assert await listed(site) == []
    client = trusting(site, vendor.public)
    with pytest.raises(UnknownLicence):
        await client.checkout(CAD_KEY)
    await client.aclose()


async def test_an_entitled_licence_may_not_be_declared_or_added_locally(
    site: Daemon, vendor: Vendor
) -> None:
    await ok(
        "entitlement", "import", str(await vendor.issue(site.public_key.hex(), "e")), *sock(site)
    )
    err = await refused(
        "licence", "update", "cad", "--expires", "2099-01-01T00:00:00Z", *sock(site)
    )
    assert "expires is the vendor's" in err, err
    err = await refused("licence", "update", "cad", "--feature", "tier=max", *sock(site))
    assert "features is the vendor's" in err, err


# -------------------------------------------------------------------- renewal


async def test_an_offline_renewal_round_trip_extends_a_running_site_without_losing_a_seat(
    site: Daemon, vendor: Vendor
) -> None:
    soon = time.time() + 2 * 86400
    first = await vendor.issue(site.public_key.hex(), "e", expires=iso(soon))
    await ok("entitlement", "import", str(first), *sock(site))
    leases = await checkouts(site, vendor.public, 2)
    request = vendor.out / "request.toml"
    printed = await ok("entitlement", "request", "--out", str(request), *sock(site))
    assert "renewal request for cad" in printed
    renewed = vendor.out / "renewed.toml"
    printed = await ok(
        "vendor",
        "renew",
        "--key",
        str(vendor.key_file),
        "--request",
        str(request),
        "--out",
        str(renewed),
        "--valid",
        "35d",
    )
    assert "peak 2 seat(s)" in printed, printed  # the vendor sees the site's use
    await ok("entitlement", "import", str(renewed), *sock(site))
    [item] = await listed(site)
    assert item["sequence"] == 2
    assert item["expires"] > soon + 30 * 86400
    # Nothing was lost: the same two leases renew, and one seat is left.
    for lease in leases:
        await lease.renew_once()
    assert {x.handle for x in site.engine.leases} == {x.handle for x in leases}
    extra = await checkouts(site, vendor.public, 1)
    with pytest.raises(SeatsExhausted):
        await checkouts(site, vendor.public, 1)
    # The renewed file again is nothing to do; the first file again is refused.
    assert "unchanged" in await ok("entitlement", "import", str(renewed), *sock(site))
    err = await refused("entitlement", "import", str(first), *sock(site))
    assert "sequence 1 is not above 2" in err
    for lease in [*leases, *extra]:
        await lease.release()


# -------------------------------------------------------------------- restart


async def test_a_restart_verifies_the_stored_entitlements_again(
    tmp_path: Path, vendor: Vendor
) -> None:
    config = site_config(tmp_path, vendor)
    clock = ManualClock(wall=time.time())
    async with running(config, clock, components=SITE) as daemon:
        me = daemon.public_key.hex()
        bound = [item for c in SITE for item in ("--bind", c)]
        await ok("entitlement", "import", str(await vendor.issue(me, "e", *bound)), *sock(daemon))
    # One replaced network card does not void it: 2 of its 3 components are needed.
    async with running(config, clock, components=(*SITE[:2], "host:renamed")) as daemon:
        leases = await checkouts(daemon, vendor.public, 3)
        assert len(leases) == 3
        with pytest.raises(SeatsExhausted):
            await checkouts(daemon, vendor.public, 1)
        await close_clients()
    # Without the vendor's key, or on another machine, it is not served.
    for changed, components in (
        (dataclasses.replace(config, vendor=VendorConfig()), SITE),
        (config, (SITE[0], "mac:replaced", "host:renamed")),
    ):
        async with running(changed, clock, components=components) as daemon:
            assert daemon.engine.licence_by_id("cad") is None
            [item] = await listed(daemon)
            assert item["state"] == "invalid"


async def test_config_entitlement_files_are_imported_at_start_and_reload(
    tmp_path: Path, vendor: Vendor
) -> None:
    state_dir = tmp_path / "state"
    clock = ManualClock(wall=time.time())
    base = site_config(tmp_path, vendor)
    async with running(base, clock, components=SITE) as daemon:
        me = daemon.public_key.hex()
    path = await vendor.issue(me, "e.toml")
    config = dataclasses.replace(base, entitlement_files=(path,))
    async with running(config, clock, components=SITE) as daemon:
        assert daemon.engine.licence_by_id("cad") is not None
        assert [x["sequence"] for x in await listed(daemon)] == [1]
    # A file refused at start stops it, naming the file and why.
    bad = await vendor.issue("ab" * 32, "bad.toml", sequence=2)
    with pytest.raises(StartupError, match=r"bad\.toml.*another daemon"):
        async with running(
            dataclasses.replace(base, entitlement_files=(bad,)), clock, components=SITE
        ):
            pass
    assert state_dir.exists()


SITE_TOML = """\
[server]
listen = ["127.0.0.1:0"]
state_dir = "{state}"
site = "test"

[vendor]
keys = ["{vendor}"]
"""


async def test_a_reload_imports_the_files_the_config_names_and_refuses_declaring_one(
    tmp_path: Path, vendor: Vendor
) -> None:
    config_file = tmp_path / "licd.toml"
    toml = SITE_TOML.format(state=tmp_path / "state", vendor=vendor.public)
    config_file.write_text(toml)
    clock = ManualClock(wall=time.time())
    async with running(load_config(config_file), clock, components=SITE) as daemon:
        path = await vendor.issue(daemon.public_key.hex(), "e.toml")
        config_file.write_text(toml + f'\n[[entitlement]]\nfile = "{path}"\n')
        result = json.loads(await ok("reload", *sock(daemon), "--json"))
        assert result["entitlements"] == {str(path): "cad: imported"}
        assert daemon.engine.licence_by_id("cad") is not None
        result = json.loads(await ok("reload", *sock(daemon), "--json"))
        assert result["entitlements"] == {str(path): "cad: unchanged"}
        # A refused file is reported, and the reload fails for it.
        bad = await vendor.issue("ab" * 32, "bad.toml", sequence=2, seats=9)
        config_file.write_text(toml + f'\n[[entitlement]]\nfile = "{bad}"\n')
        result = await licd("reload", *sock(daemon))
        assert result.exit_code == 1
        assert f"entitlement file {bad}: error: " in result.stdout
        assert "another daemon" in result.stdout, result.stdout
        assert f"not applied: entitlement file(s) {bad}" in result.stderr
        assert daemon.engine.licence_by_id("cad").seats == 3  # type: ignore[union-attr]
        # The config may not declare an entitled licence: its terms are the vendor's.
        declared = f'\n[[licence]]\nid = "cad"\nkey = "{CAD_KEY}"\nproduct = "cad"\nseats = 50\n'
        config_file.write_text(toml + declared)
        err = await refused("reload", *sock(daemon))
        assert "licence 'cad' is entitled by a vendor" in err, err
        assert daemon.engine.licence_by_id("cad").seats == 3  # type: ignore[union-attr]
    # Nor at start.
    with pytest.raises(StartupError, match="licence 'cad' is entitled by a vendor"):
        async with running(load_config(config_file), clock, components=SITE):
            pass


async def test_check_config_and_start_refuse_an_entitlement_file_that_cannot_be_read(
    tmp_path: Path, vendor: Vendor
) -> None:
    config_file = tmp_path / "licd.toml"
    toml = SITE_TOML.format(state=tmp_path / "state", vendor=vendor.public)
    for target, problem in (
        (tmp_path / "missing.toml", "No such file or directory"),
        (tmp_path, "not a regular file"),
    ):
        config_file.write_text(toml + f'\n[[entitlement]]\nfile = "{target}"\n')
        err = await refused("check-config", str(config_file))
        assert f"entitlement file {target}: {problem}" in err, err
        with pytest.raises(StartupError, match=problem):
            async with running(load_config(config_file), components=SITE):
                pass
