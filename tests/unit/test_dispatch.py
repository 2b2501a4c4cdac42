"""dispatch: failures answered through the error map (the map itself: test_errors.py),
closing the connection as it says, a relayed request's store failure among them; and
the per-peer checkout limits, on an in-process daemon.

Peers are told apart by source address: the hostile ones connect from 127.0.0.2, the
legitimate one from 127.0.0.1 (both loopback on Linux).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import SigningKey

from licd.cli.admin_client import AdminClient, AdminError
from licd.clock import ManualClock
from licd.core.dispatch import Answer, Dispatcher, Session
from licd.core.errors import ADMIN_UNAVAILABLE
from licd.core.keys import Signer
from licd.core.service import LicenceService
from licd.daemon import Daemon
from licd.deferred import Deferred
from licd.store.base import Store
from licd.store.sqlite import DB_FILE
from licd_client.errors import FrameTooLarge, TooManyConnections, Unavailable
from licd_client.messages import CheckinReply
from tests.support import DICOM, RawPeer, address, holder, make_config, new_engine, running
from tests.unit import test_router as scripted
from tests.unit.test_store import running as store_running


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
            caplog.at_level(logging.ERROR, logger="licd.core.errors"),
            pytest.raises(AdminError) as refused,
        ):
            await asyncio.to_thread(client.call, "audit")
        assert (refused.value.code, str(refused.value)) == ("unavailable", ADMIN_UNAVAILABLE)
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
        assert reply["message"] == Unavailable.default_message  # not the database's words
        await peer.close()


# ------------------------------------------------------- without sockets: the closing


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with store_running(tmp_path / "licd.db") as s:
        yield s


def dispatcher_of(store: Store) -> Dispatcher:
    service = LicenceService(new_engine([DICOM]), store, ManualClock())
    return Dispatcher(service, Signer(SigningKey.generate(), "site-1"))


async def answered(answer: Answer | Deferred[Answer]) -> Answer:
    return answer if isinstance(answer, tuple) else await answer


@pytest.mark.parametrize(
    ("hello_done", "frame", "error", "close"),
    [
        (False, {"op": "available", "id": 1, "key": DICOM.key}, "hello_required", True),
        (True, {"op": "available", "id": 1}, "bad_request", True),  # no key
        (True, {"op": "launch", "id": 1}, "bad_request", True),
        (True, {"op": "available", "id": 1, "key": "NOT-A-KEY"}, "unknown_licence", False),
        (
            True,
            {"op": "heartbeat", "id": 1, "lease": "x" * 32, "nonce": b"n" * 16},
            "lease_unknown",
            False,
        ),
    ],
)
async def test_an_error_closes_the_connection_when_the_map_says_so(
    store: Store, hello_done: bool, frame: dict[str, Any], error: str, close: bool
) -> None:
    reply, closing = await answered(dispatcher_of(store).handle(Session("?", hello_done), frame))
    assert (reply["error"], closing) == (error, close)


async def test_errors_found_before_decoding_close_by_the_same_map(store: Store) -> None:
    dispatcher = dispatcher_of(store)
    assert dispatcher.error(FrameTooLarge())[1] is True
    # A connection refused at the door is closed by the server, whatever the error.
    assert dispatcher.error(TooManyConnections()) == (
        {
            "id": None,
            "ok": False,
            "error": "too_many_connections",
            "message": "connection limit reached",
        },
        False,
    )
    dispatcher.shutting_down = True
    reply, closing = await answered(
        dispatcher.handle(Session("?", True), {"op": "available", "id": 4, "key": DICOM.key})
    )
    assert (reply["id"], reply["error"], closing) == (4, "shutting_down", False)


async def test_a_relayed_checkout_the_store_fails_is_given_back_and_unavailable(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """The router lets the store's failure to record a forwarded lease propagate: the
    lease goes back upstream, and the client is told `unavailable` in the protocol's
    words by the map, which logs the database's."""
    clock = ManualClock()
    lease = scripted.granted("L-1", clock, 90.0, lease="secret-1")
    upstream = scripted.ScriptedUpstream(lease, CheckinReply(0, released=True))
    router = scripted.router_of(store, clock, upstream, scripted.FORWARD)
    dispatcher = Dispatcher(LicenceService(router.engine, store, clock), router.signer)
    dispatcher.router = router
    with sqlite3.connect(store.where) as db:
        db.execute(
            "CREATE TRIGGER boom BEFORE INSERT ON forwarded "
            "BEGIN SELECT RAISE(ABORT, '/var/lib/licd: disk full'); END"
        )
    request = scripted.checkout(scripted.FORWARD.key).to_wire()
    with caplog.at_level(logging.ERROR, logger="licd.core.errors"):
        reply, closing = await answered(dispatcher.handle(Session("10.0.0.1", True), request))
    assert (reply["error"], reply["message"], closing) == (
        "unavailable",
        Unavailable.default_message,
        False,
    )
    assert [r.op for r in upstream.asked] == ["checkout", "checkin"]  # given back
    assert router.forwarded == {} and await store.load_forwarded() == []
    assert "event=store_error op='checkout'" in caplog.text and "disk full" in caplog.text


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
