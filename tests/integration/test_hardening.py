"""Regressions for defects a code review found: integers SQLite cannot hold, admin
requests acted on before they were fully checked, a removal racing a checkout, a
consume retried after a failed commit, a frame split across reads."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from licd.clock import ManualClock
from licd.config.settings import ConfigError
from licd.core.events import Event, Kind
from licd.core.service import LicenceService
from licd.engine import Engine, Licence
from licd.engine.licence import Counter
from licd.store.base import Store
from licd.store.sqlite import SqliteStore
from licd_client.errors import BadRequest, LicdError, Unavailable, UnknownLicence
from licd_client.wire import encode
from tests.support import (
    DICOM,
    RawPeer,
    address,
    checkout_committed,
    consume_committed,
    holder,
    make_config,
    new_engine,
    running,
)

HUGE = 2**63  # a valid msgpack uint64, too large for an SQLite INTEGER


@dataclass
class Rig:
    store: Store
    engine: Engine
    clock: ManualClock
    service: LicenceService
    writer: asyncio.Task[None]


@contextlib.asynccontextmanager
async def rig(tmp_path: Path, *licences: Licence) -> AsyncIterator[Rig]:
    store = await SqliteStore.open(tmp_path / "licd.db")
    writer = asyncio.create_task(store.run())
    engine = new_engine(licences or (DICOM,))
    clock = ManualClock()
    try:
        yield Rig(store, engine, clock, LicenceService(engine, store, clock), writer)
    finally:
        await store.close()
        with contextlib.suppress(Exception):
            await writer


# ---------------------------------------------------------------- store writer crash


async def test_denied_checkout_with_huge_seats_does_not_kill_the_writer(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        with pytest.raises(UnknownLicence):
            await checkout_committed(
                r.service, "no-such-key", holder(), request="r1", at=r.clock.now(), seats=HUGE
            )
        await asyncio.wait_for(r.store.barrier(), 5.0)  # the next commit still happens
        assert not r.writer.done()


async def test_checkout_with_huge_pid_fails_alone(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        with contextlib.suppress(LicdError):
            await asyncio.wait_for(
                checkout_committed(
                    r.service,
                    DICOM.key,
                    replace(holder(), pid=HUGE),
                    request="r1",
                    at=r.clock.now(),
                ),
                5.0,
            )
        await asyncio.wait_for(r.store.barrier(), 5.0)
        assert not r.writer.done()
        assert r.engine.in_use(DICOM.id) == 0  # nothing granted on failure


# --------------------------------------------------------- remove-licence vs checkout


async def test_remove_licence_racing_a_checkout_keeps_engine_and_db_in_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with rig(tmp_path) as r:
        await r.store.put_licence(DICOM, Event(Kind.LICENCE_ADDED, r.clock.now().wall))
        # The removal's DELETE waits at a gate the test opens: the checkout is placed
        # while the removal is under way and before its DELETE is committed.
        committing, gate = asyncio.Event(), asyncio.Event()
        delete_licence = r.store.delete_licence

        async def gated_delete(licence_id: str, event: Event) -> None:
            committing.set()
            await gate.wait()
            await delete_licence(licence_id, event)

        monkeypatch.setattr(r.store, "delete_licence", gated_delete)
        removing = asyncio.create_task(r.service.remove_licence(DICOM.id))
        await asyncio.wait_for(committing.wait(), 5.0)
        # The race is on: the removal started and has not committed...
        assert not removing.done()
        assert DICOM.id in {x.id for x in await r.store.load_licences()}
        assert r.engine.licence_by_id(DICOM.id) is not None
        # ...and a checkout comes now. It must not be granted.
        with pytest.raises(UnknownLicence, match="being removed"):
            await checkout_committed(
                r.service, DICOM.key, holder(), request="r" * 22, at=r.clock.now()
            )
        assert r.engine.in_use(DICOM.id) == 0
        gate.set()
        assert await asyncio.wait_for(removing, 5.0) == []
        assert DICOM.id not in {x.id for x in await r.store.load_licences()}
        assert r.engine.licence_by_id(DICOM.id) is None
        assert await r.store.load_leases() == []


# ------------------------------------------------------------------ metered counters


async def test_retry_after_failed_consume_is_counted(tmp_path: Path) -> None:
    licence = replace(DICOM, counter=(Counter("scan", 10, dedup_window=60.0),))
    async with rig(tmp_path, licence) as r:
        grant = await checkout_committed(
            r.service, licence.key, holder(), request="r1", at=r.clock.now()
        )
        secret = grant.lease.secret

        failing = "CREATE TRIGGER full BEFORE INSERT ON counter BEGIN SELECT RAISE(ABORT, 'x'); END"
        with sqlite3.connect(r.store.where) as db:
            db.execute(failing)  # the disk refuses the counter's write
        with pytest.raises(Unavailable):
            await consume_committed(r.service, secret, "scan", 1, "barcode-1")
        with sqlite3.connect(r.store.where) as db:
            db.execute("DROP TRIGGER full")
        consumed = await consume_committed(r.service, secret, "scan", 1, "barcode-1")
        assert consumed.counted
        assert consumed.used == 1


# ------------------------------------------------------------------------ TCP server


async def test_split_frame_does_not_doom_the_connection(tmp_path: Path) -> None:
    config = make_config(tmp_path, frame_timeout=0.5, hello_timeout=1.0, idle_timeout=30.0)
    async with running(config) as daemon:
        peer = await RawPeer.connect(address(daemon))
        try:
            await peer.hello()
            frame = encode({"op": "available", "id": 7, "key": DICOM.key})
            [here] = daemon.server.connections
            await peer.send_bytes(frame[:3])
            # A round trip on another connection: by its answer the daemon has read every
            # connection that was readable before, so it holds the frame's first part.
            witness = await RawPeer.connect(address(daemon))
            await witness.hello()
            await witness.close()
            assert here.decoder.buffered
            started = here._frame_started
            assert started is not None  # a frame begun: the frame timeout runs
            assert here._deadline() <= started + config.server.frame_timeout
            await peer.send_bytes(frame[3:])
            first = await peer.recv()
            assert first is not None and first["ok"] is True
            # The frame is whole: only silence counts now, against idle_timeout, so the
            # connection outlives the frame timeout it was under a moment ago.
            loop = asyncio.get_running_loop()
            assert here._frame_started is None
            assert here._deadline() > loop.time() + config.server.idle_timeout - 5
            here._check_deadline()  # as the timer would, at any time from now on
            reply = await peer.call("available", key=DICOM.key)
            assert reply["ok"] is True
        finally:
            await peer.close()


# ------------------------------------------------------------------------------ admin


async def test_admin_request_with_unknown_key_changes_nothing(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as daemon:
        peer = await RawPeer.connect(address(daemon))
        try:
            await peer.hello()
            lease = await peer.checkout()
            assert lease["ok"] is True
        finally:
            await peer.close()
        request = {"op": "revoke", "id": 1, "handles": [lease["handle"]], "reasn": "typo"}
        with pytest.raises(LicdError):
            await daemon.admin.ops.handle(request, 0)
        assert daemon.engine.lease_by_handle(lease["handle"]) is not None


async def test_admin_licence_add_with_huge_seats_is_refused(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as daemon:
        request = {
            "op": "licence.add",
            "id": 1,
            "licence": {"id": "big", "key": "BIG-KEY", "product": "p", "seats": HUGE},
        }
        with pytest.raises(ConfigError, match="licence.seats"):  # bad_request on the wire
            await asyncio.wait_for(daemon.admin.ops.handle(request, 0), 5.0)
        await asyncio.wait_for(daemon.service.store.barrier(), 5.0)  # the writer lives
        assert daemon.engine.licence_by_id("big") is None


@pytest.mark.parametrize("after", [HUGE, 2**64 - 1, -1], ids=["2**63", "2**64-1", "-1"])
async def test_admin_audit_with_huge_after_is_a_bad_request(tmp_path: Path, after: int) -> None:
    async with running(make_config(tmp_path)) as daemon:
        request = {"op": "audit", "id": 1, "after": after}
        with pytest.raises(BadRequest, match="audit: 'after' must be") as refused:
            await asyncio.wait_for(daemon.admin.ops.handle(request, 0), 5.0)
        assert refused.value.code == "bad_request"
        await asyncio.wait_for(daemon.service.store.barrier(), 5.0)  # the writer lives
        # The largest value SQLite holds is still a fine `after`: nothing after it.
        largest = {"op": "audit", "id": 2, "after": HUGE - 1}
        reply = await asyncio.wait_for(daemon.admin.ops.handle(largest, 0), 5.0)
        assert reply["ok"] is True and reply["entries"] == []
