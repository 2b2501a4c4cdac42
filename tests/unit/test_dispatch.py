"""dispatch: the one error map, and the per-peer checkout limits, on an in-process daemon.

Peers are told apart by source address: the hostile ones connect from 127.0.0.2, the
legitimate one from 127.0.0.1 (both loopback on Linux).
"""

from __future__ import annotations

import ast
import asyncio
import logging
import secrets
import sqlite3
from pathlib import Path

import pytest

import licd
from licd.cli.admin_client import AdminClient, AdminError
from licd.clock import ManualClock
from licd.daemon import Daemon
from licd.store.sqlite import DB_FILE
from tests.support import DICOM, RawPeer, address, holder, make_config, running

LICD_DIR = Path(licd.__file__).resolve().parent


async def peer_from(daemon: Daemon, source: str) -> RawPeer:
    reader, writer = await asyncio.open_connection(*address(daemon), local_addr=(source, 0))
    peer = RawPeer(reader, writer)
    await peer.hello()
    return peer


async def checkout(peer: RawPeer, key: str = DICOM.key, host: str = "ws-1") -> dict[str, object]:
    return await peer.checkout(key, holder(host), request=secrets.token_hex(16))


async def test_a_store_error_is_unavailable_never_internal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A database error on a real request (the admin `audit` read of a database whose
    audit table is gone) reaches the client as `unavailable`, logged as a store error."""
    async with running(make_config(tmp_path)) as daemon:
        with sqlite3.connect(tmp_path / DB_FILE) as db:
            db.execute("ALTER TABLE audit RENAME TO audit_gone")
        client = AdminClient(daemon.admin.path, timeout=10)
        with (
            caplog.at_level(logging.ERROR, logger="licd.core.dispatch"),
            pytest.raises(AdminError) as refused,
        ):
            await asyncio.to_thread(client.call, "audit")
        assert refused.value.code == "unavailable"
        assert "event=store_error" in caplog.text and "internal_error" not in caplog.text


async def test_a_failed_commit_answers_a_checkout_unavailable(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as daemon:
        with sqlite3.connect(tmp_path / DB_FILE) as db:
            db.execute(
                "CREATE TRIGGER boom BEFORE INSERT ON lease BEGIN SELECT RAISE(ABORT, 'disk'); END"
            )
        peer = await peer_from(daemon, "127.0.0.1")
        reply = await checkout(peer)
        assert (reply["ok"], reply["error"]) == (False, "unavailable")
        await peer.close()


def test_only_dispatch_turns_exceptions_into_error_frames() -> None:
    """`error_frame` (an exception to a wire error) is called in licd/core/dispatch.py only;
    everything else goes through `dispatch.error_reply` or `Dispatcher.error`."""
    callers = []
    for path in sorted(LICD_DIR.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                if name == "error_frame":
                    callers.append(path.relative_to(LICD_DIR).as_posix())
            if isinstance(node, ast.Dict):  # nor does anyone write an error reply by hand
                keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
                assert not {"ok", "error"} <= keys, path
    assert set(callers) == {"core/dispatch.py"}


async def test_a_peer_over_its_denied_budget_is_rate_limited_and_not_audited(
    tmp_path: Path,
) -> None:
    clock = ManualClock()
    config = make_config(tmp_path, denied_rate=1.0, denied_burst=3)
    async with running(config, clock) as daemon:
        hostile = await peer_from(daemon, "127.0.0.2")
        legit = await peer_from(daemon, "127.0.0.1")
        answers = [(await checkout(hostile, key="NOT-A-KEY"))["error"] for _ in range(5)]
        assert answers == ["unknown_licence"] * 3 + ["rate_limited"] * 2
        limited = await checkout(hostile)  # even a good checkout: the engine is not asked
        assert limited["error"] == "rate_limited"
        assert limited["retry_after"] == pytest.approx(1.0)
        assert daemon.engine.in_use(DICOM.id) == 0
        granted = await checkout(legit)  # another address has its own budget
        assert granted["ok"] is True, granted
        clock.advance(1.0)  # a token back
        assert (await checkout(hostile, key="NOT-A-KEY"))["error"] == "unknown_licence"
        assert (await checkout(hostile, key="NOT-A-KEY"))["error"] == "rate_limited"
        await daemon.store.barrier()
        denials = [e for e in await daemon.store.audit() if e.event.kind.value == "denied"]
        assert len(denials) == 1  # the first; the rest counted, written when their interval ends
        await hostile.close()
        await legit.close()


async def test_granted_checkouts_have_a_budget_of_their_own(tmp_path: Path) -> None:
    clock = ManualClock()
    config = make_config(tmp_path, checkout_rate=2.0, checkout_burst=2)
    async with running(config, clock) as daemon:
        peer = await peer_from(daemon, "127.0.0.1")
        assert (await checkout(peer, host="a"))["ok"] is True
        assert (await checkout(peer, host="b"))["ok"] is True
        third = await checkout(peer, host="c")
        assert (third["error"], third["retry_after"]) == ("rate_limited", pytest.approx(0.5))
        assert daemon.engine.in_use(DICOM.id) == 2
        # Denials are counted apart: the grant budget being spent does not make them
        # free, and they do not spend it either.
        clock.advance(0.5)
        assert (await checkout(peer, key="NOT-A-KEY"))["error"] == "unknown_licence"
        assert (await checkout(peer, host="c"))["ok"] is True
        await peer.close()


async def test_denials_are_published_one_by_one_but_audited_once_per_interval(
    tmp_path: Path,
) -> None:
    """Metrics and alerts see every denial; the audit log gets the first at once and
    the rest as one entry with their count once the interval is over."""
    clock = ManualClock()
    async with running(make_config(tmp_path), clock) as daemon:
        seen: list[str | None] = []
        daemon.service.events.subscribe(
            lambda e: seen.append(e.reason) if e.kind.value == "denied" else None
        )
        peer = await peer_from(daemon, "127.0.0.2")
        for n in range(50):
            assert (await checkout(peer, key=f"WRONG-{n}"))["error"] == "unknown_licence"
        assert seen == ["unknown_licence"] * 50
        clock.advance(daemon.config.audit.denial_interval)
        daemon.service.flush_denials(clock.now())
        await daemon.store.barrier()
        denials = [e.event for e in await daemon.store.audit() if e.event.kind.value == "denied"]
        assert [(e.ip, e.licence, e.detail.get("count")) for e in denials] == [
            ("127.0.0.2", None, None),
            ("127.0.0.2", None, 49),
        ]
        assert all("WRONG" not in repr(e) for e in denials)  # keys are never audited
        await peer.close()
