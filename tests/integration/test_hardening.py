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

from licd.clock import FakeClock
from licd.config import ConfigError
from licd.engine import Engine, Licence
from licd.engine.licence import Counter
from licd.events import Event, Kind
from licd.service import LicenceService
from licd.store import Store
from licd_client.errors import LicdError, Unavailable, UnknownLicence
from licd_client.wire import encode
from tests.support import DICOM, RawPeer, address, holder, make_config, running

HUGE = 2**63  # a valid msgpack uint64, too large for an SQLite INTEGER


@dataclass
class Rig:
    store: Store
    engine: Engine
    clock: FakeClock
    service: LicenceService
    writer: asyncio.Task[None]


@contextlib.asynccontextmanager
async def rig(tmp_path: Path, *licences: Licence) -> AsyncIterator[Rig]:
    store = await Store.open(tmp_path / "licd.db")
    writer = asyncio.create_task(store.run())
    engine = Engine(licences or (DICOM,))
    clock = FakeClock()
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
            await r.service.checkout(
                "no-such-key", holder(), request="r1", at=r.clock.now(), seats=HUGE
            )
        await asyncio.wait_for(r.store.barrier(), 5.0)  # the next commit still happens
        assert not r.writer.done()


async def test_checkout_with_huge_pid_fails_alone(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        with contextlib.suppress(LicdError):
            await asyncio.wait_for(
                r.service.checkout(
                    DICOM.key, replace(holder(), pid=HUGE), request="r1", at=r.clock.now()
                ),
                5.0,
            )
        await asyncio.wait_for(r.store.barrier(), 5.0)
        assert not r.writer.done()
        assert r.engine.in_use(DICOM.id) == 0  # nothing granted on failure


# --------------------------------------------------------- remove-licence vs checkout


async def test_remove_licence_racing_a_checkout_keeps_engine_and_db_in_step(
    tmp_path: Path,
) -> None:
    async with rig(tmp_path) as r:
        await r.store.put_licence(DICOM, Event(Kind.LICENCE_ADDED, r.clock.now().wall))
        removing = asyncio.create_task(r.service.remove_licence(DICOM.id))
        for _ in range(3):
            await asyncio.sleep(0)  # the removal is now committing its DELETE
        with contextlib.suppress(LicdError):
            await r.service.checkout(DICOM.key, holder(), request="r1", at=r.clock.now())
        with contextlib.suppress(LicdError):
            await removing
        in_db = DICOM.id in {x.id for x in await r.store.load_licences()}
        in_engine = r.engine.licence_by_id(DICOM.id) is not None
        assert in_db == in_engine


# ------------------------------------------------------------------ metered counters


async def test_retry_after_failed_consume_is_counted(tmp_path: Path) -> None:
    licence = replace(DICOM, counter=(Counter("scan", 10, dedup_window=60.0),))
    async with rig(tmp_path, licence) as r:
        grant = await r.service.checkout(licence.key, holder(), request="r1", at=r.clock.now())
        secret = grant.lease.secret

        failing = "CREATE TRIGGER full BEFORE INSERT ON counter BEGIN SELECT RAISE(ABORT, 'x'); END"
        with sqlite3.connect(r.store.path) as db:
            db.execute(failing)  # the disk refuses the counter's write
        with pytest.raises(Unavailable):
            await r.service.consume(secret, "scan", 1, "barcode-1")
        with sqlite3.connect(r.store.path) as db:
            db.execute("DROP TRIGGER full")
        consumed = await r.service.consume(secret, "scan", 1, "barcode-1")
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
            await peer.send_bytes(frame[:3])
            await asyncio.sleep(0.1)
            await peer.send_bytes(frame[3:])
            first = await peer.recv()
            assert first is not None and first["ok"] is True
            await asyncio.sleep(1.5)  # well within idle_timeout; that frame completed long ago
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


async def test_admin_audit_with_huge_after_is_a_bad_request(tmp_path: Path) -> None:
    async with running(make_config(tmp_path)) as daemon:
        request = {"op": "audit", "id": 1, "after": HUGE}
        with contextlib.suppress(LicdError):  # bad_request is a fine answer
            await daemon.admin.ops.handle(request, 0)
