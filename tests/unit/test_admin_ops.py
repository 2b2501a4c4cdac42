"""The admin ops `leases`, `revoke` and `groups` on an engine and a store, without a
socket: which leases they choose, how `leases` pages a daemon's own leases and a
router's, and the groups `groups` lists."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import pytest

from licd.clock import ManualClock
from licd.core.admin import AdminOps
from licd.core.entitlements import Entitlements
from licd.core.router import Router
from licd.core.service import LicenceService
from licd.store.records import Forwarded
from licd_client.errors import BadRequest, UnknownLicence
from tests.support import DICOM, checkout_committed, holder, new_engine
from tests.unit.test_store import running

HOLDERS = [("ws-1", "alice"), ("ws-1", "bob"), ("ws-2", "alice"), ("ws-2", "bob")]


@dataclass
class Daemon:
    """The little of the daemon `leases` and `revoke` read: a router if a test sets one."""

    started: float = 0.0
    uptime: float = 0.0
    listen: list[str] = field(default_factory=list)
    site: str = "test"
    public_key: bytes = b""
    connections: int = 0
    router: Router | None = None

    @property
    def entitlements(self) -> Entitlements:
        raise AssertionError("not called")

    async def reload(self, *, admin_uid: int | None = None) -> dict[str, Any]:
        raise AssertionError("not called")


@pytest.fixture
async def ops(tmp_path: Path) -> AsyncIterator[AdminOps]:
    """Admin ops over one licence with a lease for each of HOLDERS."""
    clock = ManualClock()
    async with running(tmp_path / "licd.db") as store:
        service = LicenceService(new_engine([]), store, clock)
        await service.put_licence(replace(DICOM, seats=10))
        for host, user in HOLDERS:
            await checkout_committed(
                service,
                DICOM.key,
                holder(host, user=user),
                request=f"{host}/{user}",
                at=clock.now(),
            )
        yield AdminOps(service, Daemon())


async def call(ops: AdminOps, op: str, **args: Any) -> dict[str, Any]:
    return await ops.handle({"id": 1, "op": op, **args}, uid=0)


async def listed(ops: AdminOps, **args: Any) -> list[tuple[str, str]]:
    return [(x["host"], x["user"]) for x in (await call(ops, "leases", **args))["leases"]]


async def test_leases_lists_those_of_every_criterion_given(ops: AdminOps) -> None:
    assert sorted(await listed(ops)) == sorted(HOLDERS)
    assert sorted(await listed(ops, licence=DICOM.id)) == sorted(HOLDERS)
    assert sorted(await listed(ops, host="ws-1")) == [("ws-1", "alice"), ("ws-1", "bob")]
    assert sorted(await listed(ops, user="bob")) == [("ws-1", "bob"), ("ws-2", "bob")]
    assert await listed(ops, host="ws-2", user="alice") == [("ws-2", "alice")]
    with pytest.raises(UnknownLicence, match="no licence with id 'cad'"):
        await call(ops, "leases", licence="cad")


async def test_leases_pages_in_handle_order(ops: AdminOps) -> None:
    every = [x["handle"] for x in (await call(ops, "leases"))["leases"]]
    assert every == sorted(every) and len(every) == 4
    first = await call(ops, "leases", limit=3)
    assert [x["handle"] for x in first["leases"]] == every[:3]
    assert first["next"] == every[2]
    rest = await call(ops, "leases", limit=3, after=first["next"])
    assert ([x["handle"] for x in rest["leases"]], rest["next"]) == (every[3:], None)
    assert (await call(ops, "leases", limit=4))["next"] is None  # all on one page


class Relay:
    """What `leases` reads of a site router: its relayed licences, its forwarded leases."""

    def __init__(self, *forwarded: Forwarded) -> None:
        self.modes = {"upstream-cad": "forward"}
        self.forwarded = list(forwarded)

    def is_relayed(self, licence_id: str) -> bool:
        return licence_id in self.modes

    def forwarded_listing(self) -> list[Forwarded]:
        return self.forwarded


async def test_a_routers_forwarded_leases_are_listed_and_paged_with_its_own(
    ops: AdminOps,
) -> None:
    mine = [x["handle"] for x in (await call(ops, "leases", host="ws-1"))["leases"]]
    # A forwarded lease whose handle sorts between the two of ws-1's own.
    up = Forwarded("s", mine[0] + "0", "upstream-cad", holder("ws-1"), None, 1, 0.0, 90.0)
    assert isinstance(ops.daemon, Daemon)
    ops.daemon.router = cast(Router, Relay(up))
    first = await call(ops, "leases", host="ws-1", limit=2)
    assert [(x["handle"], x["state"]) for x in first["leases"]] == [
        (mine[0], "live"),
        (up.handle, "forwarded"),
    ]
    rest = await call(ops, "leases", host="ws-1", limit=2, after=first["next"])
    assert ([x["handle"] for x in rest["leases"]], rest["next"]) == ([mine[1]], None)
    # A relayed licence is known although the engine has none of its leases.
    only = await call(ops, "leases", licence="upstream-cad")
    assert [x["handle"] for x in only["leases"]] == [up.handle]


async def test_revoke_by_host_and_user_takes_the_leases_of_either(ops: AdminOps) -> None:
    revoked = (await call(ops, "revoke", host="ws-1", user="bob", handles=[]))["revoked"]
    assert sorted(await listed(ops)) == [("ws-2", "alice")]
    assert len(revoked) == 3
    await call(ops, "revoke", user="alice", handles=[])
    assert await listed(ops) == []


async def test_groups_lists_the_groups_in_force_by_name(ops: AdminOps) -> None:
    assert await call(ops, "groups") == {"id": 1, "ok": True, "groups": {}}
    ops.service.engine.groups = {"lab": ("ip:10.0.0.0/8",), "cad": ("user:alice", "host:ws-*")}
    listed = (await call(ops, "groups"))["groups"]
    assert listed == {"cad": ["user:alice", "host:ws-*"], "lab": ["ip:10.0.0.0/8"]}
    assert list(listed) == ["cad", "lab"]
    with pytest.raises(BadRequest, match="unknown"):
        await call(ops, "groups", licence="cad")  # it takes no argument
