"""The admin interface against a real daemon: access control, live edits reaching
holders, revokes reaching clients, the audit log, and reloads."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import signal
import socket
import sqlite3
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from licd.cli.admin_client import AdminClient, AdminError
from licd.clock import ManualClock
from licd.config.settings import AdminConfig
from licd.core.admin import MAX_PAGE
from licd.core.errors import ADMIN_UNAVAILABLE
from licd.daemon import Daemon, StartupError
from licd_client import AsyncClient, LeaseState
from licd_client.errors import LeaseUnknown, UnknownLicence
from licd_client.wire import REPLY_LIMITS, FrameDecoder
from tests.integration.procs import DICOM_TOML, Daemons, run_licd, write_config
from tests.support import DICOM, RawPeer, address, holder, make_config, running


async def admin(daemon: Daemon, op: str, **args: Any) -> dict[str, Any]:
    client = AdminClient(daemon.admin.path, timeout=10)
    return await asyncio.to_thread(client.call, op, **args)


async def connected(daemon: Daemon) -> RawPeer:
    peer = await RawPeer.connect(address(daemon))
    await peer.hello()
    return peer


async def test_socket_is_private(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as daemon:
        mode = stat.S_IMODE(daemon.admin.path.stat().st_mode)
        assert mode == 0o660
    assert not daemon.admin.path.exists()  # removed on shutdown


@pytest.fixture
def public() -> Iterator[Path]:
    """A directory every user may traverse (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="licd-admin-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _connect_as(uid: int, path: str) -> bytes:
    """In a child process running as `uid`, connect to the socket and read what comes."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)
            os.setgid(65534)
            os.setuid(uid)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(5)
            sock.connect(path)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            os.write(w, data)
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        data = fh.read()
    os.waitpid(pid, 0)
    return data


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
async def test_a_uid_not_allowed_is_refused_before_any_command(
    tmp_path: Path, public: Path
) -> None:
    # A socket where any user can reach it, and a mode that lets the file system through:
    # only SO_PEERCRED decides.
    config = dataclasses.replace(
        make_config(tmp_path), admin=AdminConfig(socket=public / "admin.sock")
    )
    async with running(config) as daemon:
        os.chmod(daemon.admin.path, 0o666)
        data = await asyncio.to_thread(_connect_as, 65534, str(daemon.admin.path))
        decoder = FrameDecoder(1 << 20, REPLY_LIMITS)
        decoder.feed(data)
        frame = decoder.next_frame()
        assert frame is not None
        assert frame["error"] == "denied"
        assert "uid 65534" in frame["message"]
        assert decoder.next_frame() is None  # one frame, then the connection closed
        assert (await admin(daemon, "status"))["ok"] is True  # root still may


async def test_admin_edits_reach_the_holder_on_its_next_heartbeat(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as daemon:
        _, port = address(daemon)
        client = AsyncClient(f"127.0.0.1:{port}", daemon.signer.public, retry_for=0)
        lease = await client.checkout(DICOM.key)
        assert lease.features == DICOM.features
        await admin(
            daemon,
            "licence.update",
            licence=DICOM.id,
            changes={"features": {"tier": "gold"}, "seats": 1},
        )
        await lease.renew_once()
        assert lease.features == {"tier": "gold"}
        # Lowering seats below those in use revokes nobody; new checkouts wait.
        assert lease.state is LeaseState.ACTIVE
        status = await admin(daemon, "status")
        (row,) = status["licences"]
        assert (row["seats"], row["in_use"], row["available"]) == (1, 1, 0)
        await client.aclose()


async def test_revoke_is_seen_by_the_client_as_lost(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as daemon:
        _, port = address(daemon)
        lost: list[Exception] = []
        client = AsyncClient(f"127.0.0.1:{port}", daemon.signer.public, retry_for=0)
        lease = await client.checkout(DICOM.key, on_lost=lost.append)
        reply = await admin(daemon, "revoke", handles=[lease.handle], reason="seat needed")
        assert reply["revoked"] == [lease.handle]
        with pytest.raises(LeaseUnknown):
            await lease.renew_once()
        assert lease.state is LeaseState.LOST and isinstance(lost[0], LeaseUnknown)
        # on_lost is told who took the lease and why, in its text and as data.
        assert str(lost[0]) == "revoked by the administrator: seat needed"
        assert (lost[0].revoked, lost[0].reason) == (True, "seat needed")
        with pytest.raises(LeaseUnknown) as later:  # and so is whoever uses it after
            await lease.validate()
        assert str(later.value) == "the lease was lost: revoked by the administrator: seat needed"
        assert later.value.reason == "seat needed"
        (entry,) = [e for e in (await admin(daemon, "audit"))["entries"] if e["event"] == "revoke"]
        assert entry["reason"] == "seat needed" and entry["admin_uid"] == os.geteuid()
        with pytest.raises(AdminError, match="no live lease"):
            await admin(daemon, "revoke", handles=[lease.handle])
        await client.aclose()


async def test_a_revokes_reason_is_on_the_wire_for_heartbeat_and_consume(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as daemon:
        peer = await connected(daemon)
        lease = await peer.checkout()
        reason = "audit\nfinding 7"  # the wire carries it as given; the message, one line
        await admin(daemon, "revoke", handles=[lease["handle"]], reason=reason)
        hb = await peer.call("heartbeat", lease=lease["lease"], nonce=os.urandom(16))
        used = await peer.call("consume", lease=lease["lease"], counter="scans", units=1)
        for reply in (hb, used):
            assert (reply["ok"], reply["error"]) == (False, "lease_unknown")
            assert reply["message"] == "revoked by the administrator: audit\\nfinding 7"
            assert reply["detail"] == {"revoked": True, "reason": reason}
        await peer.close()


async def test_available_status_and_the_client_agree_on_reserved_seats(tmp_path: Path) -> None:
    licence = dataclasses.replace(DICOM, seats=5, reserve={"cad": 2})
    config = dataclasses.replace(make_config(tmp_path, licence), groups={"cad": ("user:bob",)})
    async with running(config) as daemon:
        peer = await connected(daemon)
        for name, user in (("ws-1", "bob"), ("ws-2", "alice")):
            assert (await peer.checkout(h=holder(name, user=user)))["ok"] is True
        wire = await peer.call("available", key=DICOM.key)
        expected = {"total": 5, "in_use": 2, "reserved": 1, "available": 2}
        assert {k: wire[k] for k in expected} == expected
        _, port = address(daemon)
        client = AsyncClient(f"127.0.0.1:{port}", daemon.signer.public, retry_for=0)
        seen = await client.available(DICOM.key)
        assert (seen.total, seen.in_use, seen.reserved, seen.available) == (5, 2, 1, 2)
        await client.aclose()
        for op, key in (("status", "licences"), ("licence.list", "licences")):
            (row,) = (await admin(daemon, op))[key]
            assert {k: row[k] for k in ("in_use", "reserved", "available")} == {
                "in_use": 2,
                "reserved": 1,
                "available": 2,
            }
        await peer.close()


async def test_audit_records_every_change_with_the_holder(tmp_path: Path) -> None:
    clock = ManualClock()
    async with running(make_config(tmp_path), clock) as daemon:
        peer = await connected(daemon)
        a = await peer.checkout(h=holder("ws-1"), seats=2)
        b = await peer.checkout(h=holder("ws-2"))
        denied = await peer.checkout(h=holder("ws-3"))
        assert denied["error"] == "seats_exhausted"
        await peer.call("checkin", lease=a["lease"])
        for _ in range(5):  # heartbeats are not logged one by one
            await peer.call("heartbeat", lease=b["lease"], nonce=os.urandom(16))
        clock.advance(DICOM.lease_ttl + DICOM.grace + 1)
        await daemon.service.reap_once(clock.now())
        entries = (await admin(daemon, "audit"))["entries"]
        kinds = [e["event"] for e in entries]
        assert kinds == [
            "licence_added",
            "checkout",
            "checkout",
            "denied",
            "checkin",
            "reclaim",
        ]
        checkout = entries[1]
        assert (checkout["host"], checkout["hostid"], checkout["user"], checkout["ip"]) == (
            "ws-1",
            "id-ws-1",
            "alice",
            "127.0.0.1",
        )
        assert entries[3]["reason"] == "seats_exhausted"
        assert entries[3]["detail"] == {"in_use": 3, "total": 3, "rule": "seats"}
        text = repr(entries)
        assert a["lease"] not in text and b["lease"] not in text and DICOM.key not in text
        later = await admin(daemon, "audit", after=entries[2]["id"])
        assert [e["event"] for e in later["entries"]] == kinds[3:]
        await peer.close()


async def test_a_page_larger_than_the_most_is_refused_by_leases_and_audit(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as daemon:
        for op in ("leases", "audit"):
            await admin(daemon, op, limit=MAX_PAGE)  # the most is allowed
            with pytest.raises(AdminError, match=f"'limit' must be at most {MAX_PAGE}"):
                await admin(daemon, op, limit=MAX_PAGE + 1)


async def test_audit_long_poll_wakes_on_a_new_entry(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as daemon:
        last = (await admin(daemon, "audit"))["last"]
        waiting = asyncio.create_task(admin(daemon, "audit", after=last, wait=30.0))
        peer = await connected(daemon)
        await peer.checkout()
        reply = await asyncio.wait_for(waiting, 10)
        assert [e["event"] for e in reply["entries"]] == ["checkout"]
        await peer.close()


async def test_removing_a_licence_with_leases_needs_force(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as daemon:
        peer = await connected(daemon)
        lease = await peer.checkout()
        with pytest.raises(AdminError, match="--force"):
            await admin(daemon, "licence.remove", licence=DICOM.id)
        reply = await admin(daemon, "licence.remove", licence=DICOM.id, force=True)
        assert reply["revoked"] == [lease["handle"]]
        hb = await peer.call("heartbeat", lease=lease["lease"], nonce=os.urandom(16))
        assert hb["error"] == "lease_unknown"
        assert hb["detail"] == {"revoked": True, "reason": "licence removed"}
        assert (await peer.checkout())["error"] == "unknown_licence"
        await peer.close()


async def test_admin_licences_survive_a_restart(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    added = {"key": "NEW-KEY-1", "id": "extra", "product": "p", "seats": 2, "expires": 2e9}
    async with running(config) as daemon:
        await admin(daemon, "licence.add", licence=added)
        with pytest.raises(AdminError, match="already has this key"):
            await admin(daemon, "licence.add", licence={**added, "id": "other"})
        with pytest.raises(AdminError, match=r"licence\.seats"):
            await admin(daemon, "licence.add", licence={**added, "id": "bad", "seats": 0})
    async with running(config) as daemon:
        assert daemon.engine.licence_by_id("extra") is not None
        peer = await connected(daemon)
        assert (await peer.checkout(key="NEW-KEY-1"))["ok"] is True
        await peer.close()


async def test_a_licence_renamed_in_the_config_keeps_its_leases_by_refusing_to_start(
    tmp_path: Path,
) -> None:
    async with running(make_config(tmp_path)) as daemon:
        peer = await connected(daemon)
        held = [(await peer.checkout(h=holder(f"ws-{n}")))["lease"] for n in range(3)]
        await peer.close()
    renamed = make_config(tmp_path, dataclasses.replace(DICOM, id="dicom-renamed"))
    with pytest.raises(StartupError) as refused:
        await Daemon.open(renamed)
    assert str(refused.value) == (
        "licence 'dicom-renamed' in the config has the key of licence 'dicom-hq' in the "
        "database: a licence keeps its id. Give it the id 'dicom-hq' again, or remove "
        "'dicom-hq' first (licd licence remove) and then reload"
    )
    # Nothing was lost, and the state directory is free for the next start.
    async with running(make_config(tmp_path)) as daemon:
        assert daemon.engine.in_use(DICOM.id) == 3
        peer = await connected(daemon)
        assert (await peer.checkout(h=holder("ws-9")))["error"] == "seats_exhausted"
        for lease in held:
            assert (await peer.call("heartbeat", lease=lease, nonce=os.urandom(16)))["ok"]
        await peer.close()


async def test_concurrent_licence_edits_each_take_effect(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as daemon:
        uid = os.geteuid()

        def update(n: int, changes: dict[str, Any]) -> dict[str, Any]:
            return {"op": "licence.update", "id": n, "licence": DICOM.id, "changes": changes}

        ops = daemon.admin.ops
        # Both start before either commits: each must merge into the other's result.
        await asyncio.gather(
            ops.handle(update(1, {"seats": 7}), uid),
            ops.handle(update(2, {"lease_ttl": 30}), uid),
        )
        licence = daemon.engine.licence_by_id(DICOM.id)
        assert licence is not None and (licence.seats, licence.lease_ttl) == (7, 30.0)
        # Feature edits too: each adds its own to what the other left.
        await asyncio.gather(
            ops.handle({**update(5, {}), "set_features": {"a": 1}}, uid),
            ops.handle({**update(6, {}), "set_features": {"b": 2}, "drop_features": ["tier"]}, uid),
        )
        licence = daemon.engine.licence_by_id(DICOM.id)
        assert licence is not None
        assert licence.features == {"modules": "core,ocr", "a": 1, "b": 2}
        # A removal and an update at once: the update after the removal finds nothing.
        outcomes: list[Any] = await asyncio.gather(
            ops.handle({"op": "licence.remove", "id": 3, "licence": DICOM.id}, uid),
            ops.handle(update(4, {"seats": 9}), uid),
            return_exceptions=True,
        )
        removed, updated = outcomes
        assert isinstance(removed, dict) and removed["removed"] == DICOM.id
        assert isinstance(updated, UnknownLicence)
        assert daemon.engine.licence_by_id(DICOM.id) is None
    async with running(
        make_config(tmp_path, dataclasses.replace(DICOM, id="other", key="K9"))
    ) as daemon:
        assert daemon.engine.licence_by_id(DICOM.id) is None  # the removal was saved


async def test_a_revoke_the_database_fails_says_nothing_was_changed(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as daemon:
        peer = await connected(daemon)
        handle = (await peer.checkout())["handle"]
        with sqlite3.connect(daemon.store.where) as db:
            db.execute(
                "CREATE TRIGGER boom BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'x'); END"
            )
        with pytest.raises(AdminError) as failed:
            await admin(daemon, "revoke", handles=[handle])
        assert str(failed.value) == ADMIN_UNAVAILABLE and failed.value.code == "unavailable"
        assert daemon.engine.in_use(DICOM.id) == 1
        await peer.close()


async def test_reload_applies_the_file_and_keeps_the_old_one_when_broken(
    tmp_path: Path,
) -> None:
    path = write_config(tmp_path, DICOM_TOML)
    config = dataclasses.replace(make_config(tmp_path / "state"), source=path)
    async with running(config) as daemon:
        path.write_text(path.read_text() + '\n[[licence]]\nkey = "K2"\nid = "two"\n')
        with pytest.raises(AdminError, match=r"licence\[1\]\.product"):
            await admin(daemon, "reload")
        assert daemon.engine.licence_by_id("two") is None
        path.write_text(path.read_text() + 'product = "p"\nseats = 4\n')
        reply = await admin(daemon, "reload")
        assert reply["licences"]["two"] == "added"
        assert reply["restart_needed"] == []
        assert daemon.engine.licence_by_id("two") is not None
        kinds = [e["event"] for e in (await admin(daemon, "audit"))["entries"]]
        assert kinds[-4:] == ["reload_failed", "licence_updated", "licence_added", "reload"]
        path.write_text(path.read_text().replace('site = "test"', 'site = "elsewhere"'))
        reply = await admin(daemon, "reload")
        assert reply["restart_needed"] == ["server.site"]
        assert daemon.signer.site == "test"  # in force until a restart


@pytest.mark.slow
def test_sighup_with_a_broken_file_keeps_serving(tmp_path: Path) -> None:
    with Daemons(tmp_path) as daemons:
        config = daemons.config(DICOM_TOML)
        proc = daemons.start(config)
        config.write_text(config.read_text() + "\nthis is not toml\n")
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGHUP)
        proc.wait_for("event=reload_failed")

        async def still_serving() -> dict[str, Any]:
            peer = await RawPeer.connect(proc.addr)
            await peer.hello()
            reply = await peer.checkout()
            await peer.close()
            return reply

        assert asyncio.run(still_serving())["ok"] is True
        config.write_text(config.read_text().replace("this is not toml", ""))
        proc.proc.send_signal(signal.SIGHUP)
        proc.wait_for(r"(?m)event=reload$")  # a SIGHUP's: no licence, no admin
        proc.terminate()


async def test_shutdown_answers_a_waiting_audit_request(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running(make_config(tmp_path)) as daemon:
        last = (await admin(daemon, "audit"))["last"]
        waiting = asyncio.create_task(admin(daemon, "audit", after=last, wait=60.0))
        await asyncio.wait_for(daemon.admin.ops.long_polling.wait(), 10)
    reply = await asyncio.wait_for(waiting, 10)  # answered at shutdown, not after 60 s
    assert reply["entries"] == []
    assert "Traceback" not in caplog.text and "CancelledError" not in caplog.text


async def test_a_policy_only_edit_is_audited_with_what_it_changed(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as daemon:
        edit = await asyncio.to_thread(
            run_licd,
            "licence",
            "update",
            DICOM.id,
            "--max",
            "user=1",
            "--overdraft",
            "2",
            "--count-by",
            "host",
            "--allow",
            "user:alice",
            "--socket",
            str(daemon.admin.path),
        )
        assert edit.returncode == 0, edit.stderr
        [entry] = [
            e for e in (await admin(daemon, "audit"))["entries"] if e["event"] == "licence_updated"
        ]
    assert entry["detail"] == {
        "source": "admin",
        "changes": {
            "max": [{}, {"user": 1}],
            "overdraft": [0, 2],
            "count_by": ["lease", "host"],
            "allow": [[], ["user:alice"]],
        },
    }
