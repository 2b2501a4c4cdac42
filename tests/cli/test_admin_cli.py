"""Tests of the `licd` admin commands against a real daemon on its admin socket.

The daemon runs in the test's event loop (tests.support.running); each command runs
through click's CliRunner on a worker thread, since the admin client blocks. Raw
protocol peers take and probe seats. The pure helpers of licd.cli.format come last.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from licd import __version__
from licd.cli import format as fmt
from licd.cli.admin_client import AdminClient
from licd.cli.main import audit_entries, main
from licd.clock import ManualClock
from licd.config.settings import load_config
from licd.daemon import Daemon, StartupError
from licd.shells.admin_server import Access
from tests.integration.procs import run_licd
from tests.support import DICOM, RawPeer, address, holder, make_config, running

SITE_TOML = """\
[server]
listen = ["127.0.0.1:0"]
state_dir = "{state}"
site = "{site}"

[[licence]]
key = "XXXX-YYYY-ZZZZ"
id = "dicom-hq"
product = "dicom"
seats = 3
"""
EXTRA_TOML = """
[[licence]]
key = "CAD-1"
id = "cad"
product = "cad"
seats = 5
"""


async def licd(*args: str, env: Mapping[str, str] | None = None) -> Result:
    """`licd ARGS...` (with `env` added to the environment) on a worker thread (the
    daemon serves on this one)."""
    return await asyncio.to_thread(CliRunner(env=env).invoke, main, list(args))


async def ok(*args: str, env: Mapping[str, str] | None = None) -> str:
    result = await licd(*args, env=env)
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result.stdout


async def ok_json(*args: str, env: Mapping[str, str] | None = None) -> Any:
    return json.loads(await ok(*args, "--json", env=env))


def sock(daemon: Daemon) -> tuple[str, str]:
    return ("--socket", str(daemon.admin.path))


@contextlib.asynccontextmanager
async def connected(daemon: Daemon) -> AsyncIterator[RawPeer]:
    peer = await RawPeer.connect(address(daemon))
    try:
        await peer.hello()
        yield peer
    finally:
        await peer.close()


async def take(peer: RawPeer, host: str = "machine-a", user: str = "alice", **args: Any) -> Any:
    reply = await peer.checkout(h=holder(host, user=user), **args)
    assert reply["ok"] is True, reply
    return reply


async def heartbeat_error(peer: RawPeer, secret: str) -> Any:
    reply = await peer.call("heartbeat", lease=secret, nonce=os.urandom(16))
    return reply.get("error")


@pytest.fixture(autouse=True)
def _no_daemon_chosen_by_the_shell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither a LICD_CONFIG or LICD_SOCKET exported where the tests run nor a daemon on
    the embedded default (`make run`) reaches them."""
    monkeypatch.delenv("LICD_CONFIG", raising=False)
    monkeypatch.delenv("LICD_SOCKET", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    async with running(make_config(tmp_path)) as d:
        yield d


@pytest.fixture
async def peer(daemon: Daemon) -> AsyncIterator[RawPeer]:
    async with connected(daemon) as p:
        yield p


# ----------------------------------------------------------------- status, leases


async def test_status_shows_licences_and_seats_in_use(daemon: Daemon, peer: RawPeer) -> None:
    await take(peer, seats=2)
    out = await ok("status", *sock(daemon))
    assert "site         test" in out
    assert f"licd {__version__}" in out
    assert daemon.signer.public.hex() in out
    row = next(line for line in out.splitlines() if line.startswith("dicom-hq"))
    assert row.split()[:4] == ["dicom-hq", "dicom", "2/3", "1"]
    assert row.split()[4:] == ["-", "-", "local"]  # no expiry, no days left, a local licence

    data = await ok_json("status", *sock(daemon))
    assert data["site"] == "test" and data["listen"] == daemon.listen
    assert data["connections"] == 1
    [item] = data["licences"]
    assert (item["id"], item["in_use"], item["seats"], item["available"]) == ("dicom-hq", 2, 3, 1)
    assert "ok" not in data and "id" not in data  # the envelope is not the result


async def test_leases_list_and_filter_but_never_show_the_secret(
    daemon: Daemon, peer: RawPeer
) -> None:
    a = await take(peer, "machine-a", "alice")
    b = await take(peer, "machine-b", "bob")
    out = await ok("leases", *sock(daemon))
    head = ["HANDLE", "LICENCE", "HOST", "HOSTID", "USER", "PID", "SEATS"]
    assert out.splitlines()[0].split()[:7] == head
    assert a["handle"] in out and b["handle"] in out and "127.0.0.1" in out
    # Machines are told apart by hostid too (two may share a host name).
    assert "id-machine-a" in out and "id-machine-b" in out
    assert "hostid=id-machine-a" in await ok("audit", *sock(daemon))
    assert "2026-09-21 " in out  # the fake clock's wall time, shown in UTC

    data = await ok_json("leases", *sock(daemon))
    assert {x["handle"] for x in data["leases"]} == {a["handle"], b["handle"]}
    assert all("secret" not in x and "lease" not in x for x in data["leases"])
    assert data["leases"][0]["since"] == 1_790_000_000.0  # epoch, unchanged

    only_b = await ok_json("leases", "--host", "machine-b", *sock(daemon))
    assert [x["handle"] for x in only_b["leases"]] == [b["handle"]]
    only_a = await ok_json("leases", "--user", "alice", "--licence", "dicom-hq", *sock(daemon))
    assert [x["handle"] for x in only_a["leases"]] == [a["handle"]]
    # A licence that does not exist is an error, not an empty listing.
    nope = await licd("leases", "--licence", "nope", *sock(daemon))
    assert nope.exit_code != 0 and "no licence with id 'nope'" in nope.output

    # No command ever prints a lease secret.
    outputs = [out, json.dumps(data), await ok("status", *sock(daemon))]
    outputs += [await ok("audit", *sock(daemon), "--format", f) for f in ("table", "csv")]
    outputs += [await ok("audit", "--json", *sock(daemon))]
    outputs += [await ok("licence", "list", "--show-keys", *sock(daemon))]
    for text in outputs:
        assert a["lease"] not in text and b["lease"] not in text


async def test_leases_page_through_every_lease(
    daemon: Daemon, peer: RawPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("licd.cli.main.PAGE", 1)  # one lease a page: three pages
    handles = {(await take(peer, f"m{i}"))["handle"] for i in range(3)}
    data = await ok_json("leases", *sock(daemon))
    assert {x["handle"] for x in data["leases"]} == handles


# ------------------------------------------------------------------------- revoke


async def test_revoke_by_handle_ends_the_holders_lease(daemon: Daemon, peer: RawPeer) -> None:
    a = await take(peer)
    b = await take(peer)
    out = await ok("revoke", a["handle"], "--reason", "left the company", *sock(daemon))
    assert out.strip() == f"revoked 1 lease(s): {a['handle']}"
    assert await heartbeat_error(peer, a["lease"]) == "lease_unknown"
    assert await heartbeat_error(peer, b["lease"]) is None  # the other one lives on
    entries = [json.loads(x) for x in (await ok("audit", "--json", *sock(daemon))).splitlines()]
    [revoked] = [e for e in entries if e["event"] == "revoke"]
    assert revoked["handle"] == a["handle"] and revoked["reason"] == "left the company"
    assert revoked["admin_uid"] == os.geteuid()

    again = await licd("revoke", a["handle"], *sock(daemon))
    assert again.exit_code == 1
    assert again.stderr == f"Error: no live lease with handle {a['handle']!r}\n"


async def test_revoke_every_lease_of_a_host_or_user(daemon: Daemon, peer: RawPeer) -> None:
    a1 = await take(peer, "machine-a", "alice")
    a2 = await take(peer, "machine-a", "carol")
    b = await take(peer, "machine-b", "bob")
    data = await ok_json("revoke", "--host", "machine-a", *sock(daemon))
    assert sorted(data["revoked"]) == sorted([a1["handle"], a2["handle"]])
    assert await heartbeat_error(peer, a1["lease"]) == "lease_unknown"
    assert await heartbeat_error(peer, a2["lease"]) == "lease_unknown"
    assert await heartbeat_error(peer, b["lease"]) is None

    assert (await ok_json("revoke", "--user", "bob", *sock(daemon)))["revoked"] == [b["handle"]]
    out = await ok("revoke", "--user", "nobody", *sock(daemon))
    assert out.strip() == "nothing revoked: no live lease matched"
    assert daemon.engine.in_use(DICOM.id) == 0

    usage = await licd("revoke", *sock(daemon))
    assert usage.exit_code == 2 and "name lease handles, --host or --user" in usage.stderr


# ----------------------------------------------------------------------- licences


async def test_licence_add_update_and_list(daemon: Daemon, peer: RawPeer) -> None:
    args = ["licence", "add", "cad", "--key", "CAD-SECRET-1", "--product", "cad", "--seats", "5"]
    args += ["--ttl", "5m", "--grace", "0", "--expires", "2027-01-01T00:00:00Z"]
    args += ["--feature", "tier=pro", "--feature", "max=4", "--feature", "beta=true"]
    assert (await ok(*args, *sock(daemon))).strip() == "licence cad: added"
    cad = daemon.engine.licence_by_id("cad")
    assert cad is not None and cad.seats == 5 and cad.lease_ttl == 300.0 and cad.grace == 0.0
    assert cad.expires == 1798761600.0
    assert cad.features == {"tier": "pro", "max": 4, "beta": True}

    listed = await ok("licence", "list", *sock(daemon))
    row = next(line for line in listed.splitlines() if line.startswith("cad "))
    assert "5m 00s" in row and "2027-01-01 00:00:00Z" in row and "beta=true max=4 tier=pro" in row
    assert "CAD-SECRET-1" not in listed and "KEY" not in listed
    shown = await ok("licence", "list", "--show-keys", *sock(daemon))
    assert "CAD-SECRET-1" in shown and DICOM.key in shown
    data = await ok_json("licence", "list", *sock(daemon))
    assert [x["id"] for x in data["licences"]] == ["cad", "dicom-hq"]
    assert all("key" not in x for x in data["licences"])

    # The new licence serves at once; an update changes seats and merges features.
    assert (await peer.checkout(key="CAD-SECRET-1"))["features"]["max"] == 4
    out = await ok(
        "licence",
        "update",
        "cad",
        "--seats",
        "7",
        "--feature",
        "max=8",
        "--drop-feature",
        "beta",
        "--expires",
        "none",
        *sock(daemon),
    )
    assert out.strip() == "licence cad: updated"
    cad = daemon.engine.licence_by_id("cad")
    assert cad is not None and cad.seats == 7 and cad.expires is None
    assert cad.features == {"tier": "pro", "max": 8}
    data = await ok_json("licence", "update", "cad", "--clear-features", *sock(daemon))
    assert data == {"licence": "cad", "result": "updated"}
    assert daemon.engine.licence_by_id("cad").features == {}  # type: ignore[union-attr]
    same = await ok_json("licence", "update", "cad", "--seats", "7", *sock(daemon))
    assert same["result"] == "unchanged"


async def test_licence_edits_the_daemon_refuses(daemon: Daemon) -> None:
    dup = await licd(
        "licence",
        "add",
        "dicom-hq",
        "--key",
        "K2",
        "--product",
        "p",
        "--seats",
        "1",
        *sock(daemon),
    )
    assert dup.exit_code == 1
    assert "exists already: use licence update" in dup.stderr
    unknown = await licd("licence", "update", "nope", "--seats", "2", *sock(daemon))
    assert unknown.exit_code == 1 and "no licence with id 'nope'" in unknown.stderr
    # Checked here, before a request is sent: bad durations and times are usage errors.
    bad_ttl = await licd("licence", "update", "dicom-hq", "--ttl", "5x", *sock(daemon))
    assert bad_ttl.exit_code == 2 and "invalid duration '5x'" in bad_ttl.stderr
    naive = await licd("licence", "update", "dicom-hq", "--expires", "2027-01-01", *sock(daemon))
    assert naive.exit_code == 2 and "no time zone" in naive.stderr
    nothing = await licd("licence", "update", "dicom-hq", *sock(daemon))
    assert nothing.exit_code == 2 and "nothing to change" in nothing.stderr
    # A number msgpack cannot carry: one line, nothing sent, nothing changed.
    before = daemon.engine.licence_by_id("dicom-hq")
    huge = "9" * 20
    for args in (
        ["--seats", huge],
        ["--counter", f"a:{huge}"],
        ["--addon", f'{{"seats": {huge}}}'],
    ):
        result = await licd("licence", "update", "dicom-hq", *args, *sock(daemon))
        assert result.exit_code == 1, result.exception
        assert result.stderr == (
            "Error: licence.update: a number is out of range (msgpack integers are -2^63..2^64-1)\n"
        ), args
    assert daemon.engine.licence_by_id("dicom-hq") == before


async def test_licence_remove_needs_force_while_leases_live(daemon: Daemon, peer: RawPeer) -> None:
    lease = await take(peer)
    refused = await licd("licence", "remove", "dicom-hq", *sock(daemon))
    assert refused.exit_code == 1
    assert refused.stderr == (
        "Error: licence 'dicom-hq' has 1 seat(s) in use: revoke them or use --force\n"
    )
    assert daemon.engine.licence_by_id(DICOM.id) is not None
    out = await ok("licence", "remove", "dicom-hq", "--force", *sock(daemon))
    assert out.strip() == f"licence dicom-hq: removed (revoked 1 lease(s): {lease['handle']})"
    assert daemon.engine.licence_by_id(DICOM.id) is None
    assert await heartbeat_error(peer, lease["lease"]) == "lease_unknown"
    assert (await ok("licence", "list", *sock(daemon))).strip() == "(no licences)"


# -------------------------------------------------------------------------- audit


async def test_audit_table_csv_json_and_since(tmp_path: Path) -> None:
    clock = ManualClock(wall=time.time() - 7200)  # two hours ago, then now
    async with running(make_config(tmp_path), clock) as daemon, connected(daemon) as peer:
        old = await take(peer)
        clock.set_wall(time.time())
        assert (await peer.call("checkin", lease=old["lease"]))["ok"] is True
        new = await take(peer, "machine-b")

        table = (await ok("audit", *sock(daemon))).splitlines()
        assert table[0].split()[:4] == ["ID", "TIME", "(UTC)", "EVENT"]
        events = [line.split()[3] for line in table[1:]]
        assert events == ["licence_added", "checkout", "checkin", "checkout"]
        assert old["handle"] in table[2] and "machine-a" in table[2]

        rows = list(csv.reader((await ok("audit", "--format", "csv", *sock(daemon))).splitlines()))
        assert rows[0] == list(fmt.AUDIT_COLUMNS)
        assert [r[2] for r in rows[1:]] == events
        assert rows[2][1].endswith("Z") and rows[2][4] == old["handle"] and rows[2][9] == "1"

        lines = (await ok("audit", "--json", *sock(daemon))).splitlines()
        entries = [json.loads(line) for line in lines]
        assert [e["id"] for e in entries] == [1, 2, 3, 4]
        assert set(entries[1]) == set(fmt.AUDIT_COLUMNS)
        assert isinstance(entries[1]["time"], float)

        recent = await ok("audit", "--since", "1h", "--format", "json", *sock(daemon))
        handles = [json.loads(line)["handle"] for line in recent.splitlines()]
        assert handles == [old["handle"], new["handle"]]  # the checkin, then the checkout
        iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 60))
        assert (await ok("audit", "--since", iso, "--json", *sock(daemon))) == ""
        bad = await licd("audit", "--since", "yesterday", *sock(daemon))
        assert bad.exit_code == 2 and "or give a duration" in bad.stderr


async def test_audit_pages_through_the_log(
    daemon: Daemon, peer: RawPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("licd.cli.main.PAGE", 2)
    for i in range(3):
        await take(peer, f"m{i}")
    lines = (await ok("audit", "--json", *sock(daemon))).splitlines()
    assert [json.loads(line)["id"] for line in lines] == [1, 2, 3, 4]  # pages 2, 2, 0


async def test_audit_follow_prints_new_entries(daemon: Daemon, peer: RawPeer) -> None:
    follow = asyncio.create_task(
        licd("audit", "--follow", "--follow-polls", "1", "--json", *sock(daemon))
    )
    # Seats are taken and returned until the follower's one long poll has seen one:
    # whether it comes before or during that poll, the poll returns at once.
    async with asyncio.timeout(5):
        while not follow.done():
            lease = await take(peer)
            await peer.call("checkin", lease=lease["lease"])
            await asyncio.wait({follow}, timeout=0.05)
    result = follow.result()
    assert result.exit_code == 0, result.output
    entries = [json.loads(line) for line in result.stdout.splitlines()]
    assert entries[0]["event"] == "licence_added"
    assert {"checkout", "checkin"} & {e["event"] for e in entries[1:]}
    assert [e["id"] for e in entries] == sorted({e["id"] for e in entries})


def test_audit_follow_long_polls_until_ctrl_c(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    pages = [
        {"entries": [{"id": 1, "time": 0.0, "event": "checkout"}], "last": 1},
        {"entries": [], "last": 1},  # the long poll timed out with nothing new
        {"entries": [{"id": 2, "time": 60.0, "event": "checkin", "seats": 1}], "last": 2},
    ]

    def call(self: AdminClient, op: str, **args: Any) -> dict[str, Any]:
        calls.append({"op": op, **args})
        if not pages:
            raise KeyboardInterrupt
        return {"id": 1, "ok": True, **pages.pop(0)}

    monkeypatch.setattr(AdminClient, "call", call)
    result = CliRunner().invoke(main, ["audit", "--follow", "--socket", "/x"])
    assert result.exit_code == 0 and result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["ID", "TIME"]
    assert lines[1].split()[:4] == ["1", "1970-01-01", "00:00:00Z", "checkout"]
    assert lines[2].split()[:4] == ["2", "1970-01-01", "00:01:00Z", "checkin"]
    assert [c.get("wait") for c in calls] == [None, 10.0, 10.0, 10.0]
    assert [c["after"] for c in calls] == [0, 1, 1, 2]


def test_audit_entries_stop_without_follow(monkeypatch: pytest.MonkeyPatch) -> None:
    pages = [{"entries": [{"id": i} for i in (1, 2)], "last": 2}, {"entries": [], "last": 2}]
    seen: list[int] = []

    def call(op: str, **args: Any) -> dict[str, Any]:
        seen.append(args["after"])
        return pages.pop(0)

    monkeypatch.setattr("licd.cli.main.PAGE", 2)  # a full page: ask for the next one
    assert [e["id"] for e in audit_entries(call, None)] == [1, 2]
    assert seen == [0, 2]


# ----------------------------------------------------------- client-chosen strings

HOSTILE_HOST = "ws1\n     1  2026-01-01 00:00:00Z  licence_added\x1b[31m\u202eexe.txt"
HOSTILE_USER = '=HYPERLINK("http://evil.example/","open me")'
SHOWN_HOST = "ws1\\n     1  2026-01-01 00:00:00Z  licence_added\\x1b[31m\\u202eexe.txt"


def raw_controls(text: str) -> list[str]:
    """Control characters other than the line breaks between rows."""
    return [c for c in text if c in "\x1b\r\u202e\u2028" or (ord(c) < 32 and c != "\n")]


async def test_client_strings_are_escaped_in_tables_and_neutralised_in_csv(
    daemon: Daemon, peer: RawPeer
) -> None:
    lease = await take(peer, HOSTILE_HOST, HOSTILE_USER, request=secrets.token_hex(16))
    denied = await peer.checkout(
        "NO-SUCH-KEY", holder(HOSTILE_HOST, user=HOSTILE_USER), request=secrets.token_hex(16)
    )
    assert denied["error"] == "unknown_licence"
    await daemon.store.barrier()  # the denial's audit entry is written with the next batch

    table = await ok("leases", *sock(daemon))
    assert len(table.splitlines()) == 2 and raw_controls(table) == []  # a header and one row
    assert SHOWN_HOST in table and HOSTILE_USER in table  # a table is not a spreadsheet
    [listed] = (await ok_json("leases", *sock(daemon)))["leases"]  # JSON: the exact strings
    assert (listed["handle"], listed["host"], listed["user"]) == (
        lease["handle"], HOSTILE_HOST, HOSTILE_USER,
    )  # fmt: skip

    audit = await ok("audit", *sock(daemon))
    entries = [
        json.loads(line) for line in (await ok("audit", "--json", *sock(daemon))).splitlines()
    ]
    assert len(audit.splitlines()) == 1 + len(entries) and raw_controls(audit) == []
    assert sum(SHOWN_HOST in line for line in audit.splitlines()) == 2  # the lease, the denial
    assert sum(e["host"] == HOSTILE_HOST for e in entries) == 2

    text = await ok("audit", "--format", "csv", *sock(daemon))
    assert len(text.splitlines()) == 1 + len(entries) and raw_controls(text) == []
    rows = list(csv.DictReader(text.splitlines()))
    hostile = [r for r in rows if r["host"] == SHOWN_HOST]
    assert len(hostile) == 2
    assert all(r["user"] == "'" + HOSTILE_USER for r in hostile)
    for row in rows:
        assert not any(cell.startswith(("=", "+", "-", "@", "\t", "\r")) for cell in row.values())


def test_every_table_value_and_error_is_escaped(monkeypatch: pytest.MonkeyPatch) -> None:
    from licd.cli.admin_client import AdminError

    def call(self: AdminClient, op: str, **args: Any) -> dict[str, Any]:
        if op == "reload":
            return {"licences": {"a\x1b]0;pwned\x07": "error: bad\nkey"}, "restart_needed": []}
        raise AdminError("no licence 'x\n\x1b[2J'")

    monkeypatch.setattr(AdminClient, "call", call)
    reloaded = CliRunner().invoke(main, ["reload", "--socket", "/x"])
    assert reloaded.stdout == "licence a\\x1b]0;pwned\\x07: error: bad\\nkey\n"
    assert reloaded.stderr == "Error: not applied: licence(s) a\\x1b]0;pwned\\x07\n"
    refused = CliRunner().invoke(main, ["status", "--socket", "/x"])
    assert refused.exit_code == 1 and refused.stderr == "Error: no licence 'x\\n\\x1b[2J'\n"
    features = fmt.licences_text(
        [
            {"id": "l\u202e", "product": "p", "seats": 1, "in_use": 0, "lease_ttl": 60.0}
            | {"grace": 0, "not_before": None, "expires": None, "features": {"t": "\x9b2J"}}
        ],
        show_keys=False,
    )
    assert "l\\u202e" in features and "t=\\x9b2J" in features and raw_controls(features) == []


# ------------------------------------------------------------------------- reload


async def test_reload_without_a_config_file_says_so(daemon: Daemon) -> None:
    result = await licd("reload", *sock(daemon))
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: running on the embedded defaults: there is no file to reload\n"
    )


async def test_reload_applies_the_file_or_names_its_error(tmp_path: Path) -> None:
    from licd.config.settings import load_config

    path = tmp_path / "licd.toml"
    path.write_text(SITE_TOML.format(state=tmp_path / "state", site="hq"))
    async with running(load_config(path)) as daemon:
        conf = ("--config", str(path))  # the socket found through the file
        assert (await ok("reload", *conf)).strip() == "licence dicom-hq: unchanged"

        path.write_text(SITE_TOML.format(state=tmp_path / "state", site="hq") + EXTRA_TOML)
        assert (await ok("reload", *conf)).splitlines() == [
            "licence cad: added",
            "licence dicom-hq: unchanged",
        ]
        assert (await ok_json("status", *conf))["licences"][0]["id"] == "cad"

        path.write_text(SITE_TOML.format(state=tmp_path / "state", site="branch"))
        data = await ok_json("reload", *conf)
        assert data == {
            "licences": {"dicom-hq": "unchanged"},
            "entitlements": {},
            "restart_needed": ["server.site"],
        }
        out = await ok("reload", *conf)
        assert out.splitlines()[-1] == "needs a restart to apply: server.site"

        # A licence with the key of another licence the daemon keeps: nothing applies.
        await ok("licence", "remove", "cad", *conf)
        await ok(
            "licence", "add", "other", "--key", "CAD-1", "--product", "p", "--seats", "1", *conf
        )
        site = SITE_TOML.format(state=tmp_path / "state", site="branch")
        path.write_text(site.replace("seats = 3", "seats = 4") + EXTRA_TOML)
        clash = await licd("reload", *conf)
        assert clash.exit_code == 1
        assert clash.stderr == (
            "Error: licence 'cad' has the key of licence 'other': a licence keeps its id; "
            "remove 'other' first (licd licence remove)\n"
        )
        assert daemon.engine.licence_by_id("dicom-hq").seats == 3  # type: ignore[union-attr]
        assert daemon.engine.licence_by_id("cad") is None
        await ok("licence", "remove", "other", *conf)

        # A group that a licence kept in the database names cannot go.
        grouped = site + '\n[groups]\ncad = ["user:alice"]\n'
        path.write_text(grouped)
        await ok("reload", *conf)
        await ok(
            "licence", "add", "res", "--key", "RES-1", "--product", "p", "--seats", "2",
            "--reserve", "cad=1", *conf,
        )  # fmt: skip
        path.write_text(site.replace("seats = 3", "seats = 4"))
        gone = await licd("reload", *conf)
        assert gone.exit_code == 1
        assert gone.stderr == (
            "Error: licence 'res' names group 'cad', which the file no longer declares in "
            "[groups]\n"
        )
        assert daemon.engine.groups == {"cad": ("user:alice",)}
        assert daemon.engine.licence_by_id("dicom-hq").seats == 3  # type: ignore[union-attr]
        path.write_text(site)

        good = path.read_text()
        path.write_text(good.replace("seats = 3", "seats = 0"))
        bad = await licd("reload", "--socket", str(daemon.admin.path))
        assert bad.exit_code == 1
        assert (
            bad.stderr
            == f"Error: {path}: licence[0].seats: must be an integer between 1 and 1000000\n"
        )
        assert daemon.engine.licence_by_id("dicom-hq").seats == 3  # type: ignore[union-attr]
        # Now the file itself is broken, so --config cannot find the socket either.
        broken = await licd("status", *conf)
        assert broken.exit_code == 1 and "licence[0].seats" in broken.stderr


# ------------------------------------------------------------ finding the daemon


ELSEWHERE = (
    "to ask another daemon give --config FILE or --socket PATH, or set LICD_CONFIG or LICD_SOCKET"
)


def test_not_running_names_the_socket_tried_and_where_it_came_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    path = tmp_path / "admin.sock"
    config = tmp_path / "licd.toml"
    config.write_text(SITE_TOML.format(state=tmp_path / "state", site="hq"))
    in_config = tmp_path / "state" / "admin.sock"
    cases = [
        (["--socket", str(path)], {}, path, "from --socket"),
        (["--config", str(config)], {}, in_config, f"from --config {config}"),
        ([], {"LICD_CONFIG": str(config)}, in_config, f"from LICD_CONFIG={config}"),
        ([], {"LICD_SOCKET": str(path)}, path, "from LICD_SOCKET"),
        ([], {}, tmp_path / "licd" / "admin.sock", "the embedded default"),
    ]
    for args, env, tried, origin in cases:
        result = CliRunner(env=env).invoke(main, ["status", *args])
        assert result.exit_code == 1, (args, env)
        assert result.stderr == (
            f"Error: the daemon is not running: no socket at {tried} ({origin}); {ELSEWHERE}\n"
        )
    # A file that is no socket (the config file, given as --socket, say) says so.
    result = CliRunner().invoke(main, ["status", "--socket", str(config)])
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: the daemon is not running: {config} (from --socket) is not a socket; {ELSEWHERE}\n"
    )
    # A socket file nobody listens on (a daemon that died) says so.
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
    result = CliRunner().invoke(main, ["leases", "--socket", str(path)])
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: the daemon is not running: connection refused on {path} (from --socket), a "
        f"socket left behind by a daemon that stopped; {ELSEWHERE}\n"
    )


def test_both_options_or_a_missing_config_file_are_errors(tmp_path: Path) -> None:
    path = tmp_path / "licd.toml"
    path.write_text(SITE_TOML.format(state=tmp_path / "state", site="hq"))
    both = CliRunner().invoke(main, ["status", "--config", str(path), "--socket", "/x"])
    assert both.exit_code == 2 and "give --config or --socket, not both" in both.stderr
    missing = CliRunner().invoke(main, ["status", "--config", str(tmp_path / "nope.toml")])
    assert missing.exit_code == 1 and "nope.toml: cannot read" in missing.stderr


async def test_options_beat_the_environment_which_beats_the_default(tmp_path: Path) -> None:
    path = tmp_path / "licd.toml"
    path.write_text(SITE_TOML.format(state=tmp_path / "state", site="hq"))
    broken = tmp_path / "broken.toml"
    broken.write_text("bogus = 1\n")
    nowhere = str(tmp_path / "nowhere.sock")
    async with running(load_config(path)) as daemon:
        real = str(daemon.admin.path)

        def asked(out: str) -> str:
            first = out.splitlines()[0]
            assert first.startswith(f"socket       {real} (")
            return first.removeprefix(f"socket       {real} ")

        # LICD_CONFIG picks the config file, and so the socket.
        assert asked(await ok("status", env={"LICD_CONFIG": str(path)})) == (
            f"(from LICD_CONFIG={path})"
        )
        # --config beats LICD_CONFIG and LICD_SOCKET (neither is looked at).
        env = {"LICD_CONFIG": str(broken), "LICD_SOCKET": nowhere}
        assert (
            asked(await ok("status", "--config", str(path), env=env)) == f"(from --config {path})"
        )
        # --socket beats both.
        assert asked(await ok("status", "--socket", real, env=env)) == "(from --socket)"
        # LICD_SOCKET beats LICD_CONFIG.
        data = await ok_json("status", env={"LICD_CONFIG": str(broken), "LICD_SOCKET": real})
        assert data["admin_socket"] == real and data["site"] == "hq"
        listed = await ok_json("licence", "list", env={"LICD_SOCKET": real})  # every command
        assert [x["id"] for x in listed["licences"]] == ["dicom-hq"]
        # A bad LICD_CONFIG is named as such (it beats the embedded default).
        bad = await licd("leases", env={"LICD_CONFIG": str(broken)})
        assert (bad.exit_code, bad.stdout) == (1, "")
        assert bad.stderr == f"Error: LICD_CONFIG: {broken}: bogus: unknown key\n"


async def test_status_says_when_it_shows_the_default_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))  # the embedded default's state dir
    async with running(make_config(tmp_path / "licd")) as daemon:
        out = await ok("status")
        assert out.splitlines()[:2] == [
            f"socket       {daemon.admin.path} (the embedded default; --config, --socket or "
            "LICD_CONFIG choose another)",
            f"daemon       licd {__version__}",
        ]
        data = await ok_json("status")  # JSON only, naming the socket too
        assert data["admin_socket"] == str(daemon.admin.path) and data["site"] == "test"


def test_serve_and_check_config_read_licd_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "licd.toml"
    path.write_text(SITE_TOML.format(state=tmp_path, site="hq"))
    monkeypatch.setenv("LICD_CONFIG", str(path))
    result = CliRunner().invoke(main, ["check-config"])
    assert (result.exit_code, result.stdout) == (
        0,
        f"{path}: ok: listen 127.0.0.1:0; 1 licence(s)\n",
    )
    path.write_text("bogus = 1\n")
    refused = f"Error: LICD_CONFIG: {path}: bogus: unknown key\n"
    for args in (["check-config"], ["key", "show"]):
        result = CliRunner().invoke(main, args)
        assert (result.exit_code, result.stdout, result.stderr) == (1, "", refused), args
    serve = run_licd("serve")  # a process of its own: `serve` takes over signals
    assert (serve.returncode, serve.stdout, serve.stderr) == (1, "", refused)
    # The command line beats it.
    result = CliRunner().invoke(main, ["check-config", "/nope"])
    assert result.stderr == "Error: /nope: cannot read: No such file or directory\n"


def test_permission_denied_on_the_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    # As root a chmod cannot keep us out, so the refusal is simulated at connect().
    def refuse(self: socket.socket, where: Any) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    result = CliRunner().invoke(main, ["status", "--socket", "/run/licd/admin.sock"])
    assert result.exit_code == 1
    assert result.stderr.startswith(
        "Error: permission denied on /run/licd/admin.sock (from --socket): run as"
    )
    assert "Traceback" not in result.output


async def test_the_daemon_refuses_a_user_it_does_not_allow(daemon: Daemon) -> None:
    daemon.admin.access = Access(uids=frozenset())  # nobody, not even us
    result = await licd("status", *sock(daemon))
    assert result.exit_code == 1
    assert result.stderr == f"Error: uid {os.geteuid()} may not use the admin socket\n"


# ------------------------------------------------------------ key, check-config


async def test_why_explains_what_a_checkout_would_get_and_the_checkout_agrees(
    daemon: Daemon,
) -> None:
    args = ("why", "--licence", "dicom-hq", "--host", "ws-4", "--user", "dave", *sock(daemon))
    granted = await ok_json(*args)
    assert (granted["decision"], granted["rule"]) == ("granted", None)
    assert granted["holder"] == {"host": "ws-4", "hostid": "ws-4", "user": "dave"}
    assert [v["rule"] for v in granted["verdicts"]][:3] == ["validity", "deny", "allow"]
    async with connected(daemon) as peer:
        for n in range(3):
            await take(peer, host=f"machine-{n}")
        refused = await ok_json(*args)
        assert (refused["decision"], refused["rule"]) == ("seats_exhausted", "seats")
        (seats,) = [v for v in refused["verdicts"] if v["rule"] == "seats"]
        assert seats == {
            "rule": "seats",
            "passed": False,
            "reason": "3 of 3 seat(s) in use",
            "error": "seats_exhausted",
        }
        real = await peer.checkout(h=holder("ws-4", user="dave"))
        assert (real["error"], real["detail"]["rule"]) == ("seats_exhausted", "seats")
    text = await ok(*args)
    assert text.splitlines()[0] == (
        "licence dicom-hq, host ws-4, user dave, 1 seat(s): seats_exhausted "
        "(decided by the rule 'seats')"
    )
    assert "  seats        refused  3 of 3 seat(s) in use   <- decides" in text
    unknown = await licd("why", "--licence", "nope", "--host", "h", *sock(daemon))
    assert unknown.exit_code == 1 and "no licence with id 'nope'" in unknown.stderr


async def test_borrows_are_capped_and_listed_apart(daemon: Daemon) -> None:
    await ok(
        "licence", "add", "lab", "--key", "LAB-1", "--product", "lab", "--seats", "3",
        "--max-ttl", "7d", "--borrow-after", "1d", "--borrow-max", "1", *sock(daemon),
    )  # fmt: skip
    async with connected(daemon) as peer:
        borrowed = await take(peer, host="laptop-1", key="LAB-1", ttl=3 * 86400.0)
        await take(peer, host="desk-1", key="LAB-1")
        refused = await peer.checkout(key="LAB-1", h=holder("laptop-2"), ttl=3 * 86400.0)
        assert (refused["error"], refused["detail"]["rule"]) == ("denied", "borrow")
        listed = (await ok_json("leases", "--borrowed", *sock(daemon)))["leases"]
        assert [(x["handle"], x["borrowed"]) for x in listed] == [(borrowed["handle"], True)]
        every = (await ok_json("leases", "--licence", "lab", *sock(daemon)))["leases"]
        assert sorted(x["borrowed"] for x in every) == [False, True]
        why = await ok_json(
            "why", "--licence", "lab", "--host", "laptop-2", "--ttl", "3d", *sock(daemon)
        )
        assert (why["decision"], why["rule"]) == ("denied", "borrow")
        # Returned early, the borrow frees its seat (and its borrow) at once.
        assert (await peer.call("checkin", lease=borrowed["lease"]))["ok"] is True
        await take(peer, host="laptop-2", key="LAB-1", ttl=3 * 86400.0)


async def test_queue_lists_the_waiters_in_order_and_the_queue_policies_are_edited(
    daemon: Daemon,
) -> None:
    await ok(
        "licence", "add", "lab", "--key", "LAB-1", "--product", "lab", "--seats", "1",
        "--queue-max", "5", "--idle-timeout", "10m", "--idle-reclaim", "always",
        "--idle-threshold", "0.5", "--linger", "2m", *sock(daemon),
    )  # fmt: skip
    [lab] = [x for x in (await ok_json("licence", "list", *sock(daemon)))["licences"]
             if x["id"] == "lab"]  # fmt: skip
    assert (lab["queue_max"], lab["idle_timeout"], lab["idle_reclaim"]) == (5, 600.0, "always")
    assert (lab["idle_threshold"], lab["linger"]) == (0.5, 120.0)
    await ok("licence", "update", "lab", "--linger", "none", "--queue-max", "0", *sock(daemon))
    [lab] = [x for x in (await ok_json("licence", "list", *sock(daemon)))["licences"]
             if x["id"] == "lab"]  # fmt: skip
    assert (lab["linger"], lab["queue_max"]) == (None, 0)
    bad = await licd("licence", "update", "lab", "--queue-priority", "cad=x", *sock(daemon))
    assert bad.exit_code == 2 and "write GROUP=PRIORITY" in bad.stderr
    assert (await ok("queue", *sock(daemon))).strip() == "(nobody waits)"
    await ok("licence", "update", "lab", "--queue-max", "5", *sock(daemon))
    async with connected(daemon) as a, connected(daemon) as b, connected(daemon) as c:
        await take(a, host="ws-a", key="LAB-1")
        for peer, host in ((b, "ws-b"), (c, "ws-c")):
            await peer.send(
                {
                    "op": "checkout", "id": 1, "key": "LAB-1", "queue": True,
                    "holder": holder(host).to_wire(), "request": os.urandom(16).hex(),
                    "nonce": os.urandom(16),
                }
            )  # fmt: skip
            update = await peer.recv()
            assert update is not None and update["queued"] is True
        listed = (await ok_json("queue", "--licence", "lab", *sock(daemon)))["queue"]
        assert [(x["hostid"], x["position"], x["connected"]) for x in listed] == [
            ("id-ws-b", 1, True),
            ("id-ws-c", 2, True),
        ]
        lines = (await ok("queue", *sock(daemon))).splitlines()
        assert lines[0].split()[:3] == ["LICENCE", "POS", "HOST"]
        assert [line.split()[:3] for line in lines[1:]] == [
            ["lab", "1", "ws-b"],
            ["lab", "2", "ws-c"],
        ]
    unknown = await licd("queue", "--licence", "nope", *sock(daemon))
    assert unknown.exit_code == 1 and "no licence with id 'nope'" in unknown.stderr


async def test_key_show_asks_the_daemon_or_reads_the_state_dir(
    daemon: Daemon, tmp_path: Path
) -> None:
    public = daemon.signer.public.hex()
    assert (await ok("key", "show", *sock(daemon))).strip() == public
    assert (await ok_json("key", "show", *sock(daemon))) == {"key": public}
    assert (await ok("key", "show", "--state-dir", str(tmp_path))).strip() == public


def test_check_config(tmp_path: Path) -> None:
    path = tmp_path / "licd.toml"
    path.write_text(SITE_TOML.format(state=tmp_path, site="hq"))
    result = CliRunner().invoke(main, ["check-config", str(path)])
    assert result.exit_code == 0
    assert result.stdout == f"{path}: ok: listen 127.0.0.1:0; 1 licence(s)\n"
    path.write_text(SITE_TOML.format(state=tmp_path, site="hq") + "\nbogus = 1\n")
    result = CliRunner().invoke(main, ["check-config", str(path)])
    assert result.exit_code == 1 and "bogus: unknown key" in result.stderr
    # IPv6 addresses in brackets; a router's relayed licences counted apart.
    router = SITE_TOML.format(state=tmp_path, site="hq").replace(
        '"127.0.0.1:0"', '"127.0.0.1:0", "[::1]:0"'
    ) + (
        f'\n[upstream]\nservers = ["127.0.0.1:1"]\ntrust = ["{"ab" * 32}"]\n'
        '\n[[licence]]\nkey = "SITE-1"\nid = "site"\nmode = "forward"\n'
    )
    path.write_text(router)
    result = CliRunner().invoke(main, ["check-config", str(path)])
    assert result.stdout == f"{path}: ok: listen 127.0.0.1:0, [::1]:0; 1 licence(s), 1 relayed\n"


def test_cluster_status_needs_a_cluster_and_says_why_it_cannot_look(tmp_path: Path) -> None:
    path = tmp_path / "licd.toml"
    path.write_text(SITE_TOML.format(state=tmp_path, site="hq"))
    result = CliRunner().invoke(main, ["cluster", "status", "--config", str(path)])
    assert result.exit_code == 1 and "is not in a cluster" in result.stderr
    # A database nobody listens on: one line saying so, no traceback.
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        path.write_text(
            SITE_TOML.format(state=tmp_path, site="hq")
            + f'\n[store]\nbackend = "postgres"\ndsn = "postgresql://licd@127.0.0.1:{port}/l"\n'
        )
        result = CliRunner().invoke(main, ["cluster", "status", "--config", str(path)])
    assert result.exit_code == 1
    assert "cannot open the database" in result.stderr and "Traceback" not in result.output


def test_check_config_refuses_a_dsn_file_it_cannot_read(tmp_path: Path) -> None:
    path = tmp_path / "licd.toml"
    for target, problem in ((tmp_path / "missing", "No such file"), (tmp_path, "not a regular")):
        path.write_text(
            SITE_TOML.format(state=tmp_path, site="hq")
            + f'\n[store]\nbackend = "postgres"\ndsn_file = "{target}"\n'
        )
        result = CliRunner().invoke(main, ["check-config", str(path)])
        assert result.exit_code == 1
        assert f"store.dsn_file {target}: {problem}" in result.stderr


def test_check_config_passes_on_the_shipped_example() -> None:
    example = Path(__file__).resolve().parents[2] / "config.example.toml"
    result = CliRunner().invoke(main, ["check-config", str(example)])
    assert (result.exit_code, result.stderr) == (0, "")
    assert result.stdout == f"{example}: ok: listen 127.0.0.1:27500, [::1]:27500; 3 licence(s)\n"


@pytest.mark.parametrize("problem", ["missing", "not executable", "a directory"])
async def test_check_config_and_start_up_check_the_alert_hook(tmp_path: Path, problem: str) -> None:
    hook = tmp_path / "licd-alert"
    if problem == "a directory":
        hook.mkdir(mode=0o755)
        message = f"alerts.hook: {hook} is not a regular file"
    elif problem == "not executable":
        hook.write_text("#!/bin/sh\n")
        hook.chmod(0o644)
        message = f"alerts.hook: {hook} is not executable"
    else:
        message = f"alerts.hook: {hook} does not exist"
    path = tmp_path / "licd.toml"
    state = tmp_path / "state"
    site = SITE_TOML.format(state=state, site="hq")
    path.write_text(site + f'\n[alerts]\nhook = ["{hook}", "--page"]\n')
    result = await asyncio.to_thread(CliRunner().invoke, main, ["check-config", str(path)])
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == f"Error: {message}\n"  # one line, naming the key
    with pytest.raises(StartupError) as raised:  # the daemon refuses to start alike
        await Daemon.open(load_config(path))
    assert str(raised.value) == message
    assert not state.exists()  # refused before anything was made
    # Once it is an executable file, both accept it.
    if problem == "a directory":
        hook.rmdir()
    hook.write_text("#!/bin/sh\n")
    hook.chmod(0o755)
    result = await asyncio.to_thread(CliRunner().invoke, main, ["check-config", str(path)])
    assert result.exit_code == 0, result.stderr


# ------------------------------------------------------------------ cli_format


def test_durations_and_times_for_people() -> None:
    assert [fmt.duration(s) for s in (None, 0, 45.9, 183, 3720, 90000, 12 * 86400 + 5)] == [
        "-",
        "0s",
        "45s",
        "3m 03s",
        "1h 02m",
        "1d 01h",
        "12d",
    ]
    assert fmt.days_left(None) == "-" and fmt.days_left(-0.5) == "expired"
    assert fmt.days_left(0.25) == "6h 00m" and fmt.days_left(12.4) == "12d"
    assert fmt.when(None) == "-" and fmt.when(0.0) == "1970-01-01 00:00:00Z"
    assert fmt.iso(1.5) == "1970-01-01T00:00:01.500Z" and fmt.iso(None) == ""


def test_tables_align_and_right_align_numbers() -> None:
    text = fmt.table(("NAME", "N", "NOTE"), [("a", 1, None), ("bbb", 100, "x")])
    assert text.splitlines() == ["NAME  N    NOTE", "a       1  -", "bbb   100  x"]


def test_parsers() -> None:
    assert fmt.parse_feature("tier=pro") == ("tier", "pro")
    assert fmt.parse_feature("n=-4") == ("n", -4)
    assert fmt.parse_feature("r=1.5") == ("r", 1.5)
    assert fmt.parse_feature("on=TRUE") == ("on", True)
    assert fmt.parse_feature("x=inf") == ("x", "inf")
    assert fmt.parse_feature("list=a=b") == ("list", "a=b")
    assert fmt.parse_feature("empty=") == ("empty", "")
    for bad in ("novalue", "=1"):
        with pytest.raises(ValueError, match="name=value"):
            fmt.parse_feature(bad)
    assert fmt.parse_time("1970-01-01T01:00:00+01:00") == 0.0
    assert fmt.parse_time("1970-01-01T00:00:10Z") == 10.0
    with pytest.raises(ValueError, match="no time zone"):
        fmt.parse_time("1970-01-01T00:00:00")
    with pytest.raises(ValueError, match="not an ISO date-time"):
        fmt.parse_time("soon")
    assert fmt.parse_since("1h", now=10_000.0) == 6400.0
    assert fmt.parse_since("1970-01-01T00:00:10Z", now=10_000.0) == 10.0


def test_status_text_shows_counters_and_the_upstream() -> None:
    from licd.cli.format import status_text

    result = {
        "version": "0.1.0",
        "site": "site-1",
        "uptime": 60.0,
        "listen": ["127.0.0.1:27500"],
        "key": "ab" * 32,
        "connections": 2,
        "licences": [
            {
                "id": "scan",
                "product": "scan",
                "in_use": 1,
                "seats": 5,
                "available": 4,
                "expires": None,
                "days_left": None,
                "mode": "block",
                "counters": [
                    {"name": "scans", "used": 7, "limit": 10, "remaining": 3, "reset": "daily"}
                ],
            }
        ],
        "upstream": {
            "servers": ["vendor:27500"],
            "link": {
                "state": "down",
                "connected": False,
                "since": 1.79e9,
                "last_error": "refused",
                "last_error_at": 1.79e9,
                "recovered_at": None,
                "next_attempt": None,
            },
            "forwarded": 0,
            "blocks": [
                {
                    "licence": "scan",
                    "seats": 5,
                    "expires": 1.8e9,
                    "last_renewal": 1.79e9,
                    "next_renewal": 1.7901e9,
                    "revoked": False,
                    "valid": True,
                    "last_error": None,
                }
            ],
        },
    }
    text = status_text(result)
    assert "scans" in text and "7/10" in text and "daily" in text
    assert "NOT connected" in text and "refused" in text
    assert "BLOCK" in text and "valid" in text and "block" in text


async def test_licence_policies_from_the_command_line(daemon: Daemon) -> None:
    await ok(
        "licence", "add", "cad", "--key", "CAD-1", "--product", "cad", "--seats", "4",
        "--count-by", "host", "--overdraft", "1", "--max-ttl", "2d",
        "--allow", "host:lab-*", "--deny", "user:guest", "--max", "user=1",
        "--counter", "scans:100:daily:3", "--device-period", "30d",
        "--addon", '{"seats": 2, "starts": "2026-12-01T00:00:00Z", "ends": "2026-12-24T00:00:00Z"}',
        *sock(daemon),
    )  # fmt: skip
    cad = daemon.engine.licence_by_id("cad")
    assert cad is not None
    assert (cad.count_by, cad.overdraft, cad.max_ttl, cad.device_period) == (
        "host",
        1,
        2 * 86400.0,
        30 * 86400.0,
    )
    assert (cad.allow, cad.deny, dict(cad.max)) == (("host:lab-*",), ("user:guest",), {"user": 1})
    assert cad.counter[0].name == "scans" and cad.counter[0].reset == "daily"
    assert cad.addon[0].seats == 2
    await ok(
        "licence", "update", "cad", "--device-period", "none", "--clear-rules",
        "--overdraft", "0", *sock(daemon),
    )  # fmt: skip
    cad = daemon.engine.licence_by_id("cad")
    assert cad is not None
    assert (cad.device_period, cad.allow, cad.deny, cad.overdraft) == (None, (), (), 0)
    assert cad.count_by == "host"  # untouched
    bad = await licd("licence", "update", "cad", "--allow", "colour:red", *sock(daemon))
    assert bad.exit_code == 1 and "licence.allow[0]" in bad.stderr


async def test_feature_edits_keep_an_add_ons_features_out_of_the_licences_own(
    daemon: Daemon,
) -> None:
    addon = '{"seats": 5, "features": {"render": "on", "tier": "pro"}, '
    addon += '"starts": "2026-01-01T00:00:00Z", "ends": "2027-01-01T00:00:00Z"}'
    await ok(
        "licence", "add", "cad", "--key", "CAD-1", "--product", "cad", "--seats", "1",
        "--feature", "tier=basic", "--addon", addon, *sock(daemon),
    )  # fmt: skip
    await ok("licence", "update", "cad", "--feature", "extra=1", *sock(daemon))
    cad = daemon.engine.licence_by_id("cad")
    assert cad is not None
    assert cad.features == {"tier": "basic", "extra": 1}
    licences = (await ok_json("licence", "list", *sock(daemon)))["licences"]
    (listed,) = [x for x in licences if x["id"] == "cad"]
    assert listed["base_features"] == {"tier": "basic", "extra": 1}
    assert listed["features"] == {"tier": "pro", "extra": 1, "render": "on"}
