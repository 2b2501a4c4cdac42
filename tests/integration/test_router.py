"""Site routers (docs/protocol.md section 5) against a vendor licd, all on 127.0.0.1.

Every daemon runs in the test's event loop (`tests.support.running`) on one shared
`ManualClock`, so "a day later" is `clock.advance(86400)`. The relay's own keeper loop
sleeps in real time: it takes the first block as the router starts (the tests wait for
that with a bounded wait) and then sleeps for minutes, so every later renewal is driven
here by calling `Router.renew_block` directly. The link's keeper also waits in real time:
a test that waits for it to dial again shortens its backoff and polls status within a
deadline, or steps its sleep (`Naps`). No test sleeps and hopes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from nacl.signing import SigningKey

import licd_client
from licd.cli.admin_client import AdminClient
from licd.cli.format import when
from licd.clock import ManualClock
from licd.config.settings import Config, RelayedLicence, UpstreamConfig
from licd.core.events import Event, Kind
from licd.core.router import BlockState, Router
from licd.daemon import Daemon
from licd.engine import Licence
from licd.engine.licence import Counter
from licd.shells.upstream import KEEPALIVE, REDIAL, STEADY, LinkPhase, Redial, UpstreamLink
from licd.store.keyfile import key_path, load_key
from licd_client import AsyncClient, AsyncLease, LeaseState, errors, messages, tokens
from licd_client.backoff import Backoff
from licd_client.entitlements import LicenceUsage, make_usage_report
from licd_client.errors import Denied, TokenInvalid, UpstreamUnavailable
from licd_client.messages import Checkout, Hello
from tests.fakelicd import FakeLicd
from tests.integration.procs import run_licd
from tests.support import DICOM, RawPeer, address, holder, make_config, reserved_port, running

WAIT = 10.0  # bound on every wait for a background step

VENDOR = Licence(
    key="VEND-DICOM-0001",
    id="vendor-dicom",
    product="dicom",
    seats=5,
    lease_ttl=90.0,
    grace=15.0,
    features={"tier": "pro"},
    max_ttl=35 * 86400.0,
    delegable=True,
)
BLOCK = RelayedLicence(
    key=VENDOR.key,
    id="site-dicom",
    mode="block",
    block_seats=3,
    block_ttl=3600.0,
    renew_every=600.0,
    lease_ttl=90.0,
    grace=15.0,
)
#: A block that an outage test can outlive in a few clock steps.
SHORT_BLOCK = dataclasses.replace(
    BLOCK, block_ttl=600.0, renew_every=200.0, lease_ttl=60.0, grace=10.0
)
FORWARD = RelayedLicence(key=VENDOR.key, id="site-dicom-fwd", mode="forward")


# ----------------------------------------------------------------------------- helpers


async def until(predicate: Callable[[], object], what: str, within: float = WAIT) -> None:
    """Wait (bounded) until `predicate()` is true; fail naming `what` otherwise. The
    relay's keeper and the reaper publish nothing a test could wait on, so their state
    is polled, every 10 ms, within a deadline."""
    try:
        async with asyncio.timeout(within):
            while not predicate():  # noqa: ASYNC110
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out after {within}s waiting for {what}") from None


async def link_becomes(daemon: Daemon, state: str) -> dict[str, Any]:
    """The router's link as `licd status --json` shows it, once it is `state`: status is
    polled through the admin socket every 20 ms within WAIT (the link's keeper works in
    the background and publishes nothing a test could wait on)."""
    link: dict[str, Any] | None = None
    try:
        async with asyncio.timeout(WAIT):
            while True:
                link = (await admin(daemon, "status"))["upstream"]["link"]
                assert link is not None
                if link["state"] == state:
                    return link
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(
            f"timed out after {WAIT}s waiting for a link {state}: {link}"
        ) from None


class Site:
    """A daemon in this event loop on a fixed port, which a test can stop and start
    again (same state directory, same address), as an outage would."""

    def __init__(self, config: Config, clock: ManualClock) -> None:
        self.config = config
        self.clock = clock
        self._stack: contextlib.AsyncExitStack | None = None
        self._daemon: Daemon | None = None

    @property
    def daemon(self) -> Daemon:
        assert self._daemon is not None, "not running"
        return self._daemon

    async def start(self) -> Daemon:
        assert self._stack is None
        stack = contextlib.AsyncExitStack()
        self._daemon = await stack.enter_async_context(running(self.config, self.clock))
        self._stack = stack
        return self._daemon

    async def stop(self) -> None:
        stack, self._stack = self._stack, None
        self._daemon = None
        if stack is not None:
            await stack.aclose()


def fixed_port(config: Config) -> Config:
    """`config` listening on a port of its own, so a restart keeps the address."""
    server = dataclasses.replace(config.server, listen=(("127.0.0.1", reserved_port()),))
    return dataclasses.replace(config, server=server)


def vendor_config(state_dir: Path, *licences: Licence) -> Config:
    return fixed_port(make_config(state_dir, *(licences or (VENDOR,)), site="vendor"))


def router_config(
    state_dir: Path,
    upstream: str,
    trust: bytes,
    *relayed: RelayedLicence,
    site: str = "site-1",
) -> Config:
    up = UpstreamConfig(servers=(upstream,), trust=(trust,))
    base = make_config(state_dir, DICOM, site=site)  # a local licence beside the relayed
    return dataclasses.replace(base, upstream=up, relayed=relayed or (BLOCK,))


def server_of(daemon: Daemon) -> str:
    return "{}:{}".format(*address(daemon))


def relay_of(daemon: Daemon) -> Router:
    relay = daemon.router
    assert relay is not None, "not a router"
    return relay


def link_of(daemon: Daemon) -> UpstreamLink:
    """The router's upstream link: the composition root's `UpstreamLink`."""
    link = relay_of(daemon).link
    assert isinstance(link, UpstreamLink)
    return link


def block_state(router: Daemon, licence_id: str = BLOCK.id) -> BlockState:
    return relay_of(router).blocks[licence_id]


async def block_taken(router: Daemon, licence_id: str = BLOCK.id) -> BlockState:
    state = block_state(router, licence_id)
    await until(lambda: state.block is not None, f"the router's block of {licence_id}")
    return state


async def block_refused(router: Daemon, licence_id: str = BLOCK.id) -> BlockState:
    state = block_state(router, licence_id)
    await until(lambda: state.last_error is not None, f"a refused block of {licence_id}")
    assert state.block is None
    return state


async def admin(daemon: Daemon, op: str, **args: Any) -> dict[str, Any]:
    client = AdminClient(daemon.admin.path, timeout=WAIT)
    return await asyncio.to_thread(client.call, op, **args)


@contextlib.asynccontextmanager
async def peer(daemon: Daemon) -> AsyncIterator[RawPeer]:
    p = await RawPeer.connect(address(daemon))
    try:
        await p.hello()
        yield p
    finally:
        await p.close()


@contextlib.asynccontextmanager
async def client_of(daemon: Daemon, trust: bytes) -> AsyncIterator[AsyncClient]:
    """A client library instance trusting only `trust`, on a manual lease clock (its
    leases renew only when the test calls `renew_once`). Its leases are checked in on
    exit, so the daemon must be able to answer then: a retryable error would have the
    checkin wait on the manual clock for ever."""
    client = AsyncClient(
        [server_of(daemon)], [trust], retry_for=0.0, clock=licd_client.ManualClock()
    )
    try:
        yield client
    finally:
        await client.aclose()


def state_of(lease: AsyncLease) -> LeaseState:
    return lease.state  # read afresh: a call in between may have changed it


def verify(reply: dict[str, Any], nonce: bytes, anchor: bytes) -> tokens.Statement:
    assert reply["ok"] is True, reply
    return tokens.verify_lease(
        [anchor], reply["chain"], reply["token"], nonce=nonce, handle=reply["handle"]
    )


async def checkout(p: RawPeer, host: str, **args: Any) -> tuple[dict[str, Any], bytes]:
    nonce = os.urandom(16)
    reply = await p.checkout(VENDOR.key, holder(host), nonce=nonce, **args)
    return reply, nonce


def payload(statement: bytes) -> dict[str, Any]:
    body: dict[str, Any] = msgpack.unpackb(statement[tokens.SIGNATURE_LEN :], raw=False)
    return body


def flip(blob: bytes, at: int) -> bytes:
    return blob[:at] + bytes([blob[at] ^ 0x01]) + blob[at + 1 :]


async def vendor_checkouts(vendor: Daemon) -> list[Event]:
    """The checkout events of the vendor's audit log."""
    entries = await vendor.store.audit(limit=1000)
    return [e.event for e in entries if e.event.kind is Kind.CHECKOUT]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def sites() -> AsyncIterator[list[Site]]:
    """Sites a test starts are stopped at its end, routers before their vendor."""
    started: list[Site] = []
    yield started
    for site in reversed(started):
        await site.stop()


async def start(sites: list[Site], config: Config, clock: ManualClock) -> Site:
    site = Site(config, clock)
    await site.start()
    sites.append(site)
    return site


async def vendor_and_router(
    sites: list[Site], tmp_path: Path, clock: ManualClock, *relayed: RelayedLicence
) -> tuple[Site, Site]:
    vendor = await start(sites, vendor_config(tmp_path / "v"), clock)
    rcfg = router_config(
        tmp_path / "r", server_of(vendor.daemon), vendor.daemon.signer.public, *relayed
    )
    router = await start(sites, rcfg, clock)
    return vendor, router


# ------------------------------------------------------------------ block mode: trust


async def test_client_trusting_only_the_vendor_accepts_a_sub_lease(
    sites: list[Site], tmp_path: Path, clock: ManualClock
) -> None:
    vendor, router = await vendor_and_router(sites, tmp_path, clock)
    state = await block_taken(router.daemon)
    assert state.block is not None
    vendor_key, router_key = vendor.daemon.signer.public, router.daemon.signer.public

    # The client library, trusting the vendor's key alone.
    async with client_of(router.daemon, vendor_key) as client:
        lease = await client.checkout(VENDOR.key)
        assert lease.state is LeaseState.ACTIVE
        assert lease.statement is not None
        assert lease.statement.iss == router_key  # the router signed the sub-lease
        assert lease.chain == [state.block.token]  # vendor trusted directly: [block token]
        block = tokens.open_statement(lease.chain[0], vendor_key)
        assert block.delegate == router_key
        assert block.seats == BLOCK.block_seats
        assert lease.features == VENDOR.features
        await lease.renew_once()  # a heartbeat's token verifies too
        assert lease.state is LeaseState.ACTIVE

    # A raw reply, verified by hand.
    async with peer(router.daemon) as p:
        reply, nonce = await checkout(p, "machine-a")
        leaf = verify(reply, nonce, vendor_key)
        assert leaf.payload["lic"] == BLOCK.id
        assert leaf.payload["site"] == "site-1"
        assert leaf.exp <= tokens.open_statement(reply["chain"][-1], vendor_key).exp
        # The router's key alone is no anchor a vendor-trusting client would have: only
        # the chain makes the token acceptable.
        with pytest.raises(TokenInvalid):
            tokens.verify_lease([vendor_key], [], reply["token"], nonce=nonce)

        # Tampered chain: one byte flipped, in the signature or in the signed payload.
        for at in (0, len(reply["chain"][0]) - 1):
            tampered = [flip(reply["chain"][0], at), *reply["chain"][1:]]
            with pytest.raises(TokenInvalid, match=r"chain\[0\]: bad signature"):
                tokens.verify_lease([vendor_key], tampered, reply["token"], nonce=nonce)


async def test_client_rejects_a_sub_lease_of_an_expired_block(
    sites: list[Site], tmp_path: Path, clock: ManualClock
) -> None:
    vendor, router = await vendor_and_router(sites, tmp_path, clock)
    await block_taken(router.daemon)
    vendor_key = vendor.daemon.signer.public
    async with peer(router.daemon) as p:
        reply, nonce = await checkout(p, "machine-a")
    leaf = verify(reply, nonce, vendor_key)
    block = tokens.open_statement(reply["chain"][-1], vendor_key)

    # A sub-lease issued after its block expired: signed with the router's own key (as a
    # router that kept issuing past its block would), the chain otherwise genuine.
    router_signing = load_key(key_path(tmp_path / "r"))
    late = {**payload(reply["token"]), "iat": block.exp + 1, "exp": block.exp + 1 + 90}
    late_token = tokens.sign(router_signing, late)
    with pytest.raises(TokenInvalid, match="expires after the statement that delegated"):
        tokens.verify_lease([vendor_key], reply["chain"], late_token, nonce=nonce)
    # Nor one dated before its block began.
    early = {**late, "iat": block.iat - 60, "exp": block.iat + 30}
    early_token = tokens.sign(router_signing, early)
    with pytest.raises(TokenInvalid, match=r"chain\[0\] was not valid when the token was issued"):
        tokens.verify_lease([vendor_key], reply["chain"], early_token, nonce=nonce)
    # A genuine sub-lease checked once the block is over no longer verifies either.
    with pytest.raises(TokenInvalid, match=r"chain\[0\] is not valid now"):
        tokens.verify_chain([vendor_key], reply["chain"], reply["token"], at=block.exp + 1)
    assert leaf.iat <= block.exp

    # The client library refuses what a router would send with an expired block in its
    # chain, and gives the seat back.
    vendor_signing = load_key(key_path(tmp_path / "v"))
    now = clock.now().wall
    expired_block = tokens.sign(
        vendor_signing,
        {**payload(reply["chain"][-1]), "iat": now - 7200, "exp": now - 3600},
    )
    relay = relay_of(router.daemon)
    genuine = relay.signer.chains[BLOCK.id]
    relay.signer.chains[BLOCK.id] = [expired_block]
    try:
        in_use = router.daemon.engine.in_use(BLOCK.id)
        async with client_of(router.daemon, vendor_key) as client:
            with pytest.raises(TokenInvalid):
                await client.checkout(VENDOR.key)
        assert router.daemon.engine.in_use(BLOCK.id) == in_use  # checked back in
        # ... and a tampered chain the same way.
        relay.signer.chains[BLOCK.id] = [flip(genuine[0], 100)]
        async with client_of(router.daemon, vendor_key) as client:
            with pytest.raises(TokenInvalid, match="bad signature"):
                await client.checkout(VENDOR.key)
        assert router.daemon.engine.in_use(BLOCK.id) == in_use
    finally:
        relay.signer.chains[BLOCK.id] = genuine


# ------------------------------------------------------------ block mode: the bounds


async def test_sub_leases_never_outlive_the_block_nor_exceed_its_seats(
    sites: list[Site], tmp_path: Path, clock: ManualClock
) -> None:
    vendor, router = await vendor_and_router(sites, tmp_path, clock)
    state = await block_taken(router.daemon)
    assert state.block is not None
    block_expires = state.block.expires
    assert block_expires == clock.now().wall + BLOCK.block_ttl
    vendor_key = vendor.daemon.signer.public

    async with peer(router.daemon) as p:
        assert (await checkout(p, "machine-x", seats=4))[0]["error"] == "seats_exhausted"
        for host in ("machine-a", "machine-b", "machine-c"):
            reply, nonce = await checkout(p, host)
            leaf = verify(reply, nonce, vendor_key)
            assert reply["expires"] <= block_expires and leaf.exp <= block_expires
        refused, _ = await checkout(p, "machine-d")
        assert refused["ok"] is False and "token" not in refused
        assert refused["error"] == "seats_exhausted"
        assert refused["message"] == "maximum allowed concurrent licences reached"
        assert refused["detail"] == {"in_use": 3, "total": 3, "rule": "seats"}
        # The vendor counts the block, not the sub-leases.
        assert vendor.daemon.engine.in_use(VENDOR.id) == BLOCK.block_seats

    # Half a minute before the block ends, a 90 s sub-lease is cut to the block's end.
    clock.advance(block_expires - clock.now().wall - 30)
    async with peer(router.daemon) as p:
        assert router.daemon.engine.in_use(BLOCK.id) <= BLOCK.block_seats
        await until(lambda: router.daemon.engine.in_use(BLOCK.id) == 0, "lapsed sub-leases")
        reply, nonce = await checkout(p, "machine-e")
        leaf = verify(reply, nonce, vendor_key)
        assert reply["expires"] == block_expires == leaf.exp
        assert reply["ttl"] == pytest.approx(30.0)
        heartbeat = await p.call("heartbeat", lease=reply["lease"], nonce=nonce)
        assert heartbeat["ok"] is True and heartbeat["expires"] == block_expires


async def test_two_routers_never_hand_out_more_than_the_vendor_licence(
    sites: list[Site], tmp_path: Path, clock: ManualClock
) -> None:
    vendor = await start(sites, vendor_config(tmp_path / "v"), clock)  # 5 seats
    upstream, trust = server_of(vendor.daemon), vendor.daemon.signer.public
    a = await start(sites, router_config(tmp_path / "a", upstream, trust, site="site-a"), clock)
    await block_taken(a.daemon)
    b = await start(sites, router_config(tmp_path / "b", upstream, trust, site="site-b"), clock)
    state_b = await block_refused(b.daemon)  # 3 + 3 > 5
    assert state_b.last_error == "maximum allowed concurrent licences reached"
    small = dataclasses.replace(BLOCK, block_seats=2)
    c = await start(
        sites, router_config(tmp_path / "c", upstream, trust, small, site="site-c"), clock
    )
    await block_taken(c.daemon)  # 3 + 2 = 5: fits exactly

    status_b = (await admin(b.daemon, "status"))["upstream"]
    assert status_b["blocks"] == [
        {
            "licence": BLOCK.id,
            "seats": None,
            "expires": None,
            "last_renewal": None,
            "next_renewal": status_b["blocks"][0]["next_renewal"],  # the next retry
            "revoked": False,
            "valid": False,
            "last_error": "maximum allowed concurrent licences reached",
        }
    ]

    assert status_b["blocks"][0]["next_renewal"] is not None
    granted = 0
    for router, tries in ((a, 4), (b, 3), (c, 3)):
        async with peer(router.daemon) as p:
            for i in range(tries):
                reply, nonce = await checkout(p, f"{router.config.server.site}-{i}")
                if reply["ok"]:
                    verify(reply, nonce, vendor.daemon.signer.public)
                    granted += 1
                else:
                    assert "token" not in reply
                    # B has no block: retry later; A and C: their blocks are in use.
                    expected = "upstream_unavailable" if router is b else "seats_exhausted"
                    assert reply["error"] == expected, reply
    assert granted == 5
    assert vendor.daemon.engine.in_use(VENDOR.id) == 5
    held = (await admin(vendor.daemon, "leases"))["leases"]
    assert sorted((x["instance"], x["seats"]) for x in held) == [("site-a", 3), ("site-c", 2)]


# ------------------------------------------------------------- block mode: outages


METERED = dataclasses.replace(VENDOR, counter=(Counter("scans", 10, "never"),))
METERED_FWD = dataclasses.replace(METERED, key="VEND-FWD-0001", id="vendor-fwd")


async def test_metered_units_are_counted_upstream_in_both_modes(
    sites: list[Site], tmp_path: Path, clock: ManualClock
) -> None:
    """A block sub-lease's and a forwarded lease's `consume` reach the vendor's counter,
    which is the one limit; a sub-lease's dedup key is its own upstream."""
    vendor = await start(sites, vendor_config(tmp_path / "v", METERED, METERED_FWD), clock)
    vendor_key = vendor.daemon.signer.public
    fwd_mode = RelayedLicence(key=METERED_FWD.key, id="site-fwd", mode="forward")
    rcfg = router_config(tmp_path / "r", server_of(vendor.daemon), vendor_key, BLOCK, fwd_mode)
    router = await start(sites, rcfg, clock)
    state = await block_taken(router.daemon)
    assert state.block is not None

    def counted(licence: Licence = METERED) -> int:
        [c] = licence.counter
        return vendor.daemon.engine.counters.state(licence.id, c, clock.now()).used

    async with client_of(router.daemon, vendor_key) as client:
        sub = await client.checkout(VENDOR.key)  # a sub-lease of the block
        assert sub.chain == [state.block.token]
        reply = await sub.consume("scans", 4, dedup="job-1")
        assert (reply.used, reply.remaining, reply.counted) == (4, 6, True)
        assert (await sub.consume("scans", 4, dedup="job-1")).counted is False
        other = await client.checkout(VENDOR.key)  # another holder, the same dedup key
        assert (await other.consume("scans", 1, dedup="job-1")).counted is True
        assert counted() == 5
    async with peer(router.daemon) as p:  # forward mode: the vendor's lease itself
        nonce = os.urandom(16)
        fwd = await p.checkout(METERED_FWD.key, holder("machine-f"), nonce=nonce)
        assert fwd["ok"] is True, fwd
        done = await p.call("consume", lease=fwd["lease"], counter="scans", units=10)
        assert (done["used"], done["remaining"]) == (10, 0)
        over = await p.call("consume", lease=fwd["lease"], counter="scans", units=1)
        assert over["error"] == "quota_exhausted"
        assert (counted(), counted(METERED_FWD)) == (5, 10)
        # Upstream gone: no unit is counted offline.
        await vendor.stop()
        gone = await p.call("consume", lease=fwd["lease"], counter="scans", units=1)
        assert gone["error"] == "upstream_unavailable"


async def test_outage_shorter_than_the_block_goes_unnoticed(
    sites: list[Site], tmp_path: Path, clock: ManualClock
) -> None:
    vendor, router = await vendor_and_router(sites, tmp_path, clock, SHORT_BLOCK)
    state = await block_taken(router.daemon)
    assert state.block is not None
    handle, first_expiry = state.block.handle, state.block.expires
    vendor_key = vendor.daemon.signer.public
    relay = relay_of(router.daemon)
    upstream = server_of(vendor.daemon)

    async with client_of(router.daemon, vendor_key) as client:
        lease = await client.checkout(VENDOR.key)
        await vendor.stop()
        stopped = clock.now().wall
        assert (await link_becomes(router.daemon, "down"))["since"] == stopped
        for _ in range(10):  # 400 s without upstream, past the renewal due at 200 s
            clock.advance(40)
            await lease.renew_once()  # the sub-lease heartbeat keeps working
            assert lease.state is LeaseState.ACTIVE
        with pytest.raises(UpstreamUnavailable):
            await relay.renew_block(state)
        link = (await admin(router.daemon, "status"))["upstream"]["link"]
        assert (link["state"], link["connected"], link["since"]) == ("down", False, stopped)
        assert link["last_error_at"] == clock.now().wall  # the renewal's failure
        assert link["last_error"].startswith(f"cannot reach the licence daemon ({upstream}: ")
        async with peer(router.daemon) as p:  # new checkouts still served from the block
            reply, nonce = await checkout(p, "machine-new")
            assert verify(reply, nonce, vendor_key).exp <= first_expiry
            assert (await p.call("checkin", lease=reply["lease"]))["released"] is True

        await vendor.start()  # same address, same database
        await relay.renew_block(state)
        assert state.block is not None
        assert state.block.handle == handle  # the same block, renewed
        assert state.block.expires == clock.now().wall + SHORT_BLOCK.block_ttl > first_expiry
        assert relay.link.state.connected is True
        assert vendor.daemon.engine.in_use(VENDOR.id) == SHORT_BLOCK.block_seats
        for _ in range(3):
            clock.advance(40)
            await lease.renew_once()
            assert lease.state is LeaseState.ACTIVE
            assert lease.chain == [state.block.token]  # the renewed block's token
    assert len(await vendor_checkouts(vendor.daemon)) == 1


async def test_outage_longer_than_the_block_stops_new_checkouts(
    sites: list[Site], tmp_path: Path, clock: ManualClock
) -> None:
    vendor, router = await vendor_and_router(sites, tmp_path, clock, SHORT_BLOCK)
    state = await block_taken(router.daemon)
    assert state.block is not None
    block_expires = state.block.expires
    vendor_key = vendor.daemon.signer.public

    async with client_of(router.daemon, vendor_key) as client, peer(router.daemon) as p:
        lease = await client.checkout(VENDOR.key)
        await vendor.stop()
        while clock.now().wall + 50 < block_expires:
            clock.advance(50)
            await lease.renew_once()
            assert lease.expires <= block_expires
        assert lease.expires == block_expires  # the last renewal was cut to the block
        clock.advance(block_expires - clock.now().wall + 1)
        refused, _ = await checkout(p, "machine-late")
        assert refused["ok"] is False and "token" not in refused
        assert refused["error"] == "licence_expired"
        status = (await admin(router.daemon, "status"))["upstream"]["blocks"][0]
        assert status["valid"] is False and status["expires"] == block_expires

        # Upstream back: the next renewal brings the same block back, and service.
        await vendor.start()
        relay = relay_of(router.daemon)
        await relay.renew_block(state)
        assert state.block is not None and state.block.expires > clock.now().wall
        reply, nonce = await checkout(p, "machine-later")
        verify(reply, nonce, vendor_key)


async def test_restarted_router_resumes_its_stored_block(
    sites: list[Site], tmp_path: Path, clock: ManualClock
) -> None:
    vendor, router = await vendor_and_router(sites, tmp_path, clock)
    state = await block_taken(router.daemon)
    assert state.block is not None
    block = state.block
    assert len(await vendor_checkouts(vendor.daemon)) == 1

    await router.stop()
    clock.advance(60)
    await router.start()
    resumed = block_state(router.daemon)
    assert resumed.block is not None  # installed before the router answered anybody
    assert (resumed.block.handle, resumed.block.token) == (block.handle, block.token)
    assert vendor.daemon.engine.in_use(VENDOR.id) == BLOCK.block_seats
    async with peer(router.daemon) as p:
        reply, nonce = await checkout(p, "machine-a")
        verify(reply, nonce, vendor.daemon.signer.public)
        assert reply["chain"] == [block.token]
    assert len(await vendor_checkouts(vendor.daemon)) == 1  # no second block asked for
    assert vendor.daemon.engine.in_use(VENDOR.id) == BLOCK.block_seats


async def test_restarted_router_keeps_its_sub_leases(
    sites: list[Site], tmp_path: Path, clock: ManualClock
) -> None:
    vendor, router = await vendor_and_router(sites, tmp_path, clock)
    await block_taken(router.daemon)
    held: list[dict[str, Any]] = []
    async with peer(router.daemon) as p:
        for host in ("machine-a", "machine-b", "machine-c"):
            held.append((await checkout(p, host))[0])
    await router.stop()
    clock.advance(30)
    await router.start()
    async with peer(router.daemon) as p:
        # A fourth seat while three sub-leases' tokens are valid would over-allocate.
        fourth, _ = await checkout(p, "machine-d")
        assert fourth["ok"] is False and fourth["error"] == "seats_exhausted", fourth
        for lease in held:  # and every holder renews as before
            nonce = os.urandom(16)
            beat = await p.call("heartbeat", lease=lease["lease"], nonce=nonce)
            verify(beat, nonce, vendor.daemon.signer.public)
    assert vendor.daemon.engine.in_use(VENDOR.id) == BLOCK.block_seats


# ----------------------------------------------------------------------- forward mode


async def test_forward_mode_seed000_across_two_sites(
    sites: list[Site], tmp_path: Path, clock: ManualClock
) -> None:
    vendor_licence = dataclasses.replace(VENDOR, seats=3, delegable=False, max_ttl=None)
    vendor = await start(sites, vendor_config(tmp_path / "v", vendor_licence), clock)
    upstream, trust = server_of(vendor.daemon), vendor.daemon.signer.public
    site1 = await start(
        sites, router_config(tmp_path / "s1", upstream, trust, FORWARD, site="site-1"), clock
    )
    site2 = await start(
        sites, router_config(tmp_path / "s2", upstream, trust, FORWARD, site="site-2"), clock
    )

    async with peer(site1.daemon) as p1, peer(site2.daemon) as p2:
        leases: dict[str, dict[str, Any]] = {}
        for p, machine in ((p1, "machine-a"), (p1, "machine-b"), (p2, "machine-c")):
            reply, nonce = await checkout(p, machine)
            leaf = verify(reply, nonce, trust)  # the vendor's token, passed through
            assert reply["chain"] == [] and leaf.iss == trust
            assert leaf.payload["site"] == "vendor" and leaf.payload["lic"] == VENDOR.id
            leases[machine] = reply

        refused, _ = await checkout(p2, "machine-d")
        assert refused["ok"] is False and "token" not in refused
        assert refused["error"] == "seats_exhausted"
        assert refused["message"] == "maximum allowed concurrent licences reached"
        assert refused["detail"] == {"in_use": 3, "total": 3, "rule": "seats"}

        # `licd leases` on site 1 lists its own holders; the seats are held upstream.
        listed = await asyncio.to_thread(
            run_licd, "leases", "--socket", str(site1.daemon.admin.path), "--json"
        )
        assert listed.returncode == 0, listed.stderr
        rows = json.loads(listed.stdout)["leases"]
        assert sorted((r["host"], r["state"]) for r in rows) == [
            ("machine-a", "forwarded"),
            ("machine-b", "forwarded"),
        ]
        assert {r["handle"] for r in rows} == {
            leases[m]["handle"] for m in ("machine-a", "machine-b")
        }
        assert all("lease" not in r for r in rows)  # never the secret
        vendor_rows = (await admin(vendor.daemon, "leases"))["leases"]
        assert sorted(r["host"] for r in vendor_rows) == ["machine-a", "machine-b", "machine-c"]

        beat = await p1.call("heartbeat", lease=leases["machine-b"]["lease"], nonce=os.urandom(16))
        assert beat["ok"] is True and beat["handle"] == leases["machine-b"]["handle"]

        checked_in = await p1.call("checkin", lease=leases["machine-a"]["lease"])
        assert checked_in["ok"] is True and checked_in["released"] is True
        reply, nonce = await checkout(p2, "machine-d")
        verify(reply, nonce, trust)
        rows = (await admin(site1.daemon, "leases"))["leases"]
        assert [r["host"] for r in rows] == ["machine-b"]
        rows = (await admin(site2.daemon, "leases"))["leases"]
        assert sorted(r["host"] for r in rows) == ["machine-c", "machine-d"]

        # Upstream gone: no new seat; holders keep the tokens they have.
        assert (await p2.call("checkin", lease=leases["machine-c"]["lease"]))["released"]
        async with client_of(site1.daemon, trust) as client:
            held = await client.checkout(VENDOR.key)
            await vendor.stop()
            for p in (p1, p2):
                gone, _ = await checkout(p, "machine-e")
                assert gone["ok"] is False and "token" not in gone
                assert gone["error"] == "upstream_unavailable"
            nonce = os.urandom(16)
            beat = await p1.call("heartbeat", lease=leases["machine-b"]["lease"], nonce=nonce)
            assert beat["error"] == "upstream_unavailable"
            with pytest.raises(UpstreamUnavailable):
                await held.renew_once()
            assert held.state is LeaseState.DEGRADED and held.valid  # on its own clock
            status = (await admin(site1.daemon, "status"))["upstream"]
            assert status["link"]["connected"] is False
            assert status["modes"] == {FORWARD.id: "forward"}
            await vendor.start()  # back: the same lease renews (and can be checked in)
            await held.renew_once()
            assert state_of(held) is LeaseState.ACTIVE


# ------------------------------------------------------------- bad upstream answers


Answer = Callable[["MisbehavingUpstream", Checkout], dict[str, Any]]


class MisbehavingUpstream(FakeLicd):
    """A fake upstream that speaks the framing and hello, and answers each checkout with
    whatever `answer` makes of it."""

    def __init__(self, answer: Answer, clock: ManualClock) -> None:
        super().__init__()
        self.site = "fake-vendor"
        self.answer = answer
        self.clock = clock  # the routers' clock: its tokens are dated on it

    def _answer(self, req: Any) -> dict[str, Any]:
        if isinstance(req, Checkout):
            return self.answer(self, req)
        return super()._answer(req)


_ASKED = object()


def block_reply(
    fake: MisbehavingUpstream,
    req: Checkout,
    *,
    seats: int | None = None,
    token_seats: int | None = None,
    delegate: object = _ASKED,
    nonce: bytes | None = None,
    token: bytes | None = None,
) -> dict[str, Any]:
    """A checkout reply of `fake`, signed with its key; by default a faithful block."""
    now, ttl = fake.clock.now().wall, req.ttl or 3600.0
    seats = req.seats if seats is None else seats
    body: dict[str, Any] = {
        "typ": "lease",
        "iss": fake.public_key,
        "iat": now,
        "exp": now + ttl,
        "lid": "blockhandle1",
        "lic": "vendor-dicom",
        "product": "dicom",
        "seats": seats if token_seats is None else token_seats,
        "features": {},
        "holder": {"host": req.holder.host, "hostid": req.holder.hostid, "user": "licd"},
        "nonce": req.nonce if nonce is None else nonce,
        "site": fake.site,
    }
    granted_to = req.delegate if delegate is _ASKED else delegate
    if granted_to is not None:
        body["del"] = granted_to
    return {
        "id": req.id,
        "ok": True,
        "lease": "a-block-secret-of-the-fake-upstream",
        "handle": "blockhandle1",
        "token": tokens.sign(fake.signing_key, body) if token is None else token,
        "chain": [],
        "expires": now + ttl,
        "ttl": ttl,
        "renew_in": ttl / 3,
        "seats": seats,
        "features": {},
    }


BAD_ANSWERS: dict[str, Answer] = {
    "malformed": lambda f, r: {"id": r.id, "ok": True, "lease": 7, "token": "x"},
    "garbage_token": lambda f, r: block_reply(f, r, token=os.urandom(120)),
    "wrong_nonce": lambda f, r: block_reply(f, r, nonce=os.urandom(16)),
    "no_delegation": lambda f, r: block_reply(f, r, delegate=None),
    "delegates_elsewhere": lambda f, r: block_reply(f, r, delegate=os.urandom(32)),
    "more_seats": lambda f, r: block_reply(f, r, seats=r.seats + 2),
    "token_seats_differ": lambda f, r: block_reply(f, r, token_seats=r.seats + 2),
}


async def test_faithful_fake_upstream_gives_a_block(
    sites: list[Site], tmp_path: Path, clock: ManualClock
) -> None:
    """The control for the bad answers below: the fake, answering properly, works."""
    async with MisbehavingUpstream(block_reply, clock) as fake:
        router = await start(
            sites, router_config(tmp_path / "r", fake.address, fake.public_key), clock
        )
        state = await block_taken(router.daemon)
        assert state.block is not None and state.block.seats == BLOCK.block_seats
        async with peer(router.daemon) as p:
            reply, nonce = await checkout(p, "machine-a")
            verify(reply, nonce, fake.public_key)
        await router.stop()


#: Where each bad answer's cause must show: the block's or the link's last error.
WHY = {
    "malformed": "checkout reply: 'lease' must be a string",
    "garbage_token": "bad signature",
    "wrong_nonce": "nonce is not the one this client sent",
    "no_delegation": "the block does not delegate to this router's key",
    "delegates_elsewhere": "the block does not delegate to this router's key",
    "more_seats": "a block of 5 seats, more than the 3 asked",
    "token_seats_differ": "the block token's seats differ from the reply's",
}


@pytest.mark.parametrize("answer", sorted(BAD_ANSWERS))
async def test_bad_upstream_answer_is_refused_and_logged(
    sites: list[Site],
    tmp_path: Path,
    clock: ManualClock,
    caplog: pytest.LogCaptureFixture,
    answer: str,
) -> None:
    async with MisbehavingUpstream(BAD_ANSWERS[answer], clock) as fake:
        router = await start(
            sites, router_config(tmp_path / "r", fake.address, fake.public_key), clock
        )
        relay = relay_of(router.daemon)
        state = await block_refused(router.daemon)
        assert WHY[answer] in f"{state.last_error} | {relay.link.state.last_error}"
        assert any(WHY[answer] in r.getMessage() for r in caplog.records)
        with pytest.raises(UpstreamUnavailable):
            await relay.take_block(state)
        assert state.block is None
        assert router.daemon.engine.licence_by_id(BLOCK.id) is None
        async with peer(router.daemon) as p:
            refused, _ = await checkout(p, "machine-a")
            assert refused["ok"] is False and "token" not in refused
        status = (await admin(router.daemon, "status"))["upstream"]["blocks"][0]
        assert status["valid"] is False and status["last_error"]
        await router.stop()


@pytest.mark.parametrize("mode", ["block", "forward"])
async def test_upstream_signing_with_an_untrusted_key_is_refused(
    sites: list[Site],
    tmp_path: Path,
    clock: ManualClock,
    caplog: pytest.LogCaptureFixture,
    mode: str,
) -> None:
    vendor = await start(sites, vendor_config(tmp_path / "v"), clock)
    other = bytes(SigningKey.generate().verify_key)  # the router trusts another key
    relayed = BLOCK if mode == "block" else FORWARD
    rcfg = router_config(tmp_path / "r", server_of(vendor.daemon), other, relayed)
    router = await start(sites, rcfg, clock)
    relay = relay_of(router.daemon)
    if mode == "block":
        state = await block_refused(router.daemon)
        assert state.last_error == "the upstream licence server's answer did not verify"
    async with peer(router.daemon) as p:
        refused, _ = await checkout(p, "machine-a")
        assert refused["ok"] is False and "token" not in refused
        if mode == "forward":
            assert refused["error"] == "upstream_unavailable"
    assert relay.link.state.last_error == (
        "upstream token refused: the server's key is not the trusted one: the token's "
        f"signature is by key fingerprint {vendor.daemon.signer.public.hex()[:16]}, "
        f"the trusted key fingerprint is {other.hex()[:16]}"
    )
    assert any("event=upstream_token_refused" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("mode", ["block", "forward"])
async def test_refused_upstream_lease_is_given_back(
    sites: list[Site], tmp_path: Path, clock: ManualClock, mode: str
) -> None:
    vendor = await start(sites, vendor_config(tmp_path / "v"), clock)
    other = bytes(SigningKey.generate().verify_key)
    relayed = BLOCK if mode == "block" else FORWARD
    rcfg = router_config(tmp_path / "r", server_of(vendor.daemon), other, relayed)
    router = await start(sites, rcfg, clock)
    """A lease the router refuses is checked in upstream at once: a misconfigured
    router must not drain the vendor's licence for a whole block_ttl, retry by retry."""
    if mode == "block":
        await block_refused(router.daemon)
    else:
        async with peer(router.daemon) as p:
            assert (await checkout(p, "machine-a"))[0]["error"] == "upstream_unavailable"
            assert vendor.daemon.engine.in_use(VENDOR.id) == 0
    await until(lambda: vendor.daemon.engine.in_use(VENDOR.id) == 0, "the seats given back")
    entries = await vendor.daemon.store.audit(limit=1000)
    taken = [e.event.handle for e in entries if e.event.kind is Kind.CHECKOUT]
    returned = [e.event.handle for e in entries if e.event.kind is Kind.CHECKIN]
    assert taken and set(taken) <= set(returned)


async def test_router_without_a_block_answers_upstream_unavailable(
    sites: list[Site], tmp_path: Path, clock: ManualClock
) -> None:
    nobody = f"127.0.0.1:{reserved_port()}"  # no upstream listening there
    rcfg = router_config(tmp_path / "r", nobody, bytes(SigningKey.generate().verify_key))
    router = await start(sites, rcfg, clock)
    state = await block_refused(router.daemon)
    assert state.last_error == "the upstream licence server cannot be reached"
    async with peer(router.daemon) as p:
        refused, _ = await checkout(p, "machine-a")
    assert refused["ok"] is False and "token" not in refused
    assert refused["error"] == "upstream_unavailable"


# --------------------------------------------------------------------- upstream side


async def test_vendor_refuses_a_block_of_a_non_delegable_licence(
    sites: list[Site], tmp_path: Path, clock: ManualClock
) -> None:
    licence = dataclasses.replace(VENDOR, delegable=False)
    vendor = await start(sites, vendor_config(tmp_path / "v", licence), clock)
    rcfg = router_config(tmp_path / "r", server_of(vendor.daemon), vendor.daemon.signer.public)
    router = await start(sites, rcfg, clock)
    state = await block_refused(router.daemon)
    assert state.last_error == "this licence may not be delegated to a site router"
    with pytest.raises(Denied):
        await relay_of(router.daemon).take_block(state)
    assert vendor.daemon.engine.in_use(VENDOR.id) == 0
    async with peer(vendor.daemon) as p:  # any client asking for a delegation
        reply, _ = await checkout(p, "machine-a", delegate=os.urandom(32))
        assert reply["ok"] is False and reply["error"] == "denied" and "token" not in reply
        plain, nonce = await checkout(p, "machine-a")  # without one: an ordinary lease
        verify(plain, nonce, vendor.daemon.signer.public)
    async with peer(router.daemon) as p:
        refused, _ = await checkout(p, "machine-b")
        assert refused["ok"] is False and "token" not in refused


async def test_vendor_caps_the_block_at_max_ttl_and_lists_it_as_one_lease(
    sites: list[Site], tmp_path: Path, clock: ManualClock
) -> None:
    licence = dataclasses.replace(VENDOR, max_ttl=1000.0)
    vendor = await start(sites, vendor_config(tmp_path / "v", licence), clock)
    long = dataclasses.replace(BLOCK, block_ttl=5000.0)  # asks for more than allowed
    rcfg = router_config(
        tmp_path / "r", server_of(vendor.daemon), vendor.daemon.signer.public, long
    )
    router = await start(sites, rcfg, clock)
    state = await block_taken(router.daemon)
    assert state.block is not None
    assert state.block.expires == state.block.renewed + 1000.0
    block = tokens.open_statement(state.block.token, vendor.daemon.signer.public)
    assert block.exp - block.iat == 1000.0
    async with peer(router.daemon) as p:  # sub-leases are the router's business
        for host in ("machine-a", "machine-b"):
            assert (await checkout(p, host))[0]["ok"] is True

    status = await admin(vendor.daemon, "status")
    [row] = [x for x in status["licences"] if x["id"] == VENDOR.id]
    assert (row["in_use"], row["seats"], row["available"]) == (3, 5, 2)
    assert status["upstream"] is None  # the vendor itself relays nothing
    [lease] = (await admin(vendor.daemon, "leases"))["leases"]
    assert lease["licence"] == VENDOR.id
    assert lease["seats"] == BLOCK.block_seats
    assert (lease["app"], lease["instance"], lease["user"]) == ("licd-router", "site-1", "licd")
    assert lease["expires"] == state.block.expires
    assert "lease" not in lease  # never the secret


# ---------------------------------------------------------------------- router status


async def test_router_status_shows_link_blocks_and_modes(
    sites: list[Site], tmp_path: Path, clock: ManualClock
) -> None:
    other = Licence(key="VEND-OTHER-0002", id="vendor-other", product="viewer", seats=2)
    vendor = await start(sites, vendor_config(tmp_path / "v", VENDOR, other), clock)
    forward = RelayedLicence(key=other.key, id="site-viewer", mode="forward")
    started = clock.now().wall
    rcfg = router_config(
        tmp_path / "r", server_of(vendor.daemon), vendor.daemon.signer.public, BLOCK, forward
    )
    router = await start(sites, rcfg, clock)
    state = await block_taken(router.daemon)
    assert state.block is not None

    status = await admin(router.daemon, "status")
    up = status["upstream"]
    assert up["servers"] == [server_of(vendor.daemon)]
    assert up["link"] == {
        "state": "connected",
        "connected": True,
        "since": started,
        "last_error": None,
        "last_error_at": None,
        "recovered_at": None,
        "next_attempt": None,
    }
    assert up["modes"] == {BLOCK.id: "block", forward.id: "forward"}
    assert up["blocks"] == [
        {
            "licence": BLOCK.id,
            "seats": BLOCK.block_seats,
            "expires": started + BLOCK.block_ttl,
            "last_renewal": started,
            "next_renewal": started + BLOCK.renew_every,
            "revoked": False,
            "valid": True,
            "last_error": None,
        }
    ]
    assert up["forwarded"] == 0
    modes = {x["id"]: (x["mode"], x["seats"], x["expires"]) for x in status["licences"]}
    assert modes == {
        DICOM.id: ("local", DICOM.seats, None),
        BLOCK.id: ("block", BLOCK.block_seats, started + BLOCK.block_ttl),
    }

    async with peer(router.daemon) as p:
        nonce = os.urandom(16)
        reply = await p.checkout(other.key, holder("machine-v"), nonce=nonce)
        verify(reply, nonce, vendor.daemon.signer.public)
    assert (await admin(router.daemon, "status"))["upstream"]["forwarded"] == 1

    # A renewal later, then upstream gone: the link says so, the block stays valid.
    clock.advance(BLOCK.renew_every)
    await relay_of(router.daemon).renew_block(state)
    renewed = clock.now().wall
    await vendor.stop()
    await link_becomes(router.daemon, "down")  # by itself, at once
    clock.advance(30)
    with pytest.raises(UpstreamUnavailable):
        await relay_of(router.daemon).renew_block(state)
    up = (await admin(router.daemon, "status"))["upstream"]
    assert (up["link"]["state"], up["link"]["connected"]) == ("down", False)
    assert up["link"]["since"] == renewed  # when upstream went, not when a request noticed
    assert up["link"]["last_error"].startswith(
        f"cannot reach the licence daemon ({up['servers'][0]}: "
    )
    assert (up["link"]["last_error_at"], up["link"]["recovered_at"]) == (renewed + 30, None)
    [block] = up["blocks"]
    assert block["valid"] is True
    assert block["last_renewal"] == renewed
    assert block["next_renewal"] == renewed + BLOCK.renew_every
    assert block["expires"] == renewed + BLOCK.block_ttl


# ---------------------------------------------------------------- a revoked block


async def test_block_revoked_upstream_stops_issuing(
    sites: list[Site], tmp_path: Path, clock: ManualClock
) -> None:
    vendor, router = await vendor_and_router(sites, tmp_path, clock)
    state = await block_taken(router.daemon)
    assert state.block is not None
    async with peer(router.daemon) as p:
        held, nonce = await checkout(p, "machine-a")
        verify(held, nonce, vendor.daemon.signer.public)
        revoked = await admin(vendor.daemon, "revoke", handles=[state.block.handle])
        assert revoked["revoked"] == [state.block.handle]
        await relay_of(router.daemon).renew_block(state)  # upstream: lease_unknown
        assert state.block.revoked is True
        refused, _ = await checkout(p, "machine-b")
        assert refused["ok"] is False and "token" not in refused
        assert refused["error"] == "seats_exhausted"  # the block's seats are now 0
        # The sub-lease already out keeps renewing, within the block's end.
        nonce = os.urandom(16)
        beat = await p.call("heartbeat", lease=held["lease"], nonce=nonce)
        verify(beat, nonce, vendor.daemon.signer.public)
        assert beat["expires"] <= state.block.expires
    [block] = (await admin(router.daemon, "status"))["upstream"]["blocks"]
    assert (block["revoked"], block["valid"]) == (True, False)
    assert block["last_error"] == "upstream revoked the block: issuing stopped"


async def test_revoked_block_is_replaced_once_its_sub_leases_ran_out(
    sites: list[Site], tmp_path: Path, clock: ManualClock
) -> None:
    vendor, router = await vendor_and_router(sites, tmp_path, clock)
    state = await block_taken(router.daemon)
    assert state.block is not None
    old_handle = state.block.handle
    async with peer(router.daemon) as p:
        held, _ = await checkout(p, "machine-a")
    await admin(vendor.daemon, "revoke", handles=[old_handle])
    await relay_of(router.daemon).renew_block(state)
    assert state.block.revoked is True
    # Issuing stopped; the block now ends with the last sub-lease it has.
    assert state.block.expires == held["expires"]
    assert vendor.daemon.engine.in_use(VENDOR.id) == 0

    # Past that, the keeper takes a fresh block. It sleeps in real time, so a restart
    # (which loads the stored, revoked block) is what makes it look now.
    await router.stop()
    clock.advance(held["expires"] - clock.now().wall + 1)
    await router.start()
    fresh = block_state(router.daemon)
    await until(lambda: fresh.block is not None and not fresh.block.revoked, "a new block")
    assert fresh.block is not None and fresh.block.handle != old_handle
    assert vendor.daemon.engine.in_use(VENDOR.id) == BLOCK.block_seats
    assert len(await vendor_checkouts(vendor.daemon)) == 2
    async with peer(router.daemon) as p:
        reply, nonce = await checkout(p, "machine-b")
        verify(reply, nonce, vendor.daemon.signer.public)
        assert reply["chain"] == [fresh.block.token]


# ------------------------------------------------- upstream's errors: decisions or faults

#: Text an upstream puts in its error messages, which must never reach a local client.
UPSTREAM_TEXT = "upstream's own words\x1b[2J"
#: Errors that are upstream's fault (or the link's), not a decision about the request.
FAULTS = ("bad_request", "hello_required", "frame_too_large", "unavailable", "internal")


def upstream_failed(caplog: pytest.LogCaptureFixture, kind: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith(f"event=upstream_failed kind={kind} ")
    ]


async def test_upstream_faults_reach_local_clients_as_upstream_unavailable(
    sites: list[Site], tmp_path: Path, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with FakeLicd() as fake:
        rcfg = router_config(tmp_path / "r", fake.address, fake.public_key, FORWARD)
        router = await start(sites, rcfg, clock)
        async with peer(router.daemon) as p:
            for code in FAULTS:
                fake.fail["checkout"] = errors.from_wire(code, UPSTREAM_TEXT)
                for _ in range(3):
                    reply, _ = await checkout(p, "machine-a")  # 128-bit request keys
                    assert reply["ok"] is False and "token" not in reply
                    assert reply["error"] == "upstream_unavailable", reply
                    assert reply["message"] == (
                        f"the upstream licence server failed the request ({code})"
                    )
                    assert "detail" not in reply and "retry_after" not in reply
                # Logged once for the three, with upstream's detail; the link says it too.
                [line] = upstream_failed(caplog, code)
                assert repr(f"{code}: {UPSTREAM_TEXT}") in line
                link = relay_of(router.daemon).link.state
                assert link.last_error == f"{code}: {UPSTREAM_TEXT}"
                assert link.connected  # upstream answered: the link is up all along
            # The local client's connection stayed open through all of it.
            answer = await p.call("available", key=DICOM.key)
            assert answer["ok"] is True, answer
        assert fake.ops().count("checkout") == 3 * len(FAULTS)


async def test_upstream_decisions_reach_local_clients_as_they_are(
    sites: list[Site], tmp_path: Path, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with FakeLicd() as fake:
        rcfg = router_config(tmp_path / "r", fake.address, fake.public_key, FORWARD)
        router = await start(sites, rcfg, clock)
        decisions = [
            errors.RateLimited("slow down", retry_after=12.5),
            errors.SeatsExhausted(detail={"in_use": 3, "total": 3}),
            errors.Denied("a policy excludes this holder"),
            errors.UnknownLicence(),
            errors.LicenceExpired(),
        ]
        async with peer(router.daemon) as p:
            for decision in decisions:
                fake.fail["checkout"] = decision
                reply, _ = await checkout(p, "machine-a")
                expected = messages.error_frame(reply["id"], decision)
                assert reply == expected
        assert not any("event=upstream_failed" in r.getMessage() for r in caplog.records)
        assert relay_of(router.daemon).link.state.connected is True


async def test_upstream_fault_on_a_block_renewal_keeps_the_block(
    sites: list[Site], tmp_path: Path, clock: ManualClock
) -> None:
    async with MisbehavingUpstream(block_reply, clock) as fake:
        router = await start(
            sites, router_config(tmp_path / "r", fake.address, fake.public_key), clock
        )
        state = await block_taken(router.daemon)
        block = state.block
        assert block is not None
        fake.fail["heartbeat"] = errors.HelloRequired(UPSTREAM_TEXT)
        with pytest.raises(UpstreamUnavailable) as raised:
            await relay_of(router.daemon).renew_block(state)
        assert raised.value.code == "upstream_unavailable"
        assert UPSTREAM_TEXT not in raised.value.message
        assert state.block is block and not block.revoked
        async with peer(router.daemon) as p:  # still served from the block
            reply, nonce = await checkout(p, "machine-a")
            verify(reply, nonce, fake.public_key)
        await router.stop()


# ----------------------------------------------------- block time: the monotonic clock


async def test_router_restarted_with_its_clock_a_day_behind_stops_serving_in_time(
    sites: list[Site], tmp_path: Path, clock: ManualClock
) -> None:
    vendor, router = await vendor_and_router(sites, tmp_path, clock)
    state = await block_taken(router.daemon)
    assert state.block is not None
    granted = state.block.expires  # taken now, for BLOCK.block_ttl = 3600 s
    clock.advance(1000)
    await router.daemon.clock_guard.checkpoint()  # what it does every minute
    await vendor.stop()  # no renewal from here on
    await router.stop()
    clock.set_wall(clock.now().wall - 86400)  # the router comes back a day behind
    await router.start()
    left = granted - (clock.now().wall + 86400)  # 2600 s of the block's real life
    assert left == BLOCK.block_ttl - 1000

    async with peer(router.daemon) as p:
        # The clock is behind the latest time the router has seen: no new seat of the
        # vendor's block until it is right (its life counts down all the same).
        held, _ = await checkout(p, "machine-a")
        assert held["ok"] is False and held["error"] == "unavailable"
        assert "clock is 86400 s behind" in held["message"]
        clock.advance(100)
        clock.set_wall(clock.now().wall + 86400)  # NTP puts it right
        await router.daemon.clock_guard.check()
        left -= 100
        assert (await checkout(p, "machine-a"))[0]["ok"] is True
        clock.advance(left - 1)
        assert (await checkout(p, "machine-b"))[0]["ok"] is True
        clock.advance(2)  # the block's real life is over; its wall expiry a day away
        refused, _ = await checkout(p, "machine-c")
        assert refused["ok"] is False and "token" not in refused
        assert refused["error"] == "licence_expired"
    [block] = (await admin(router.daemon, "status"))["upstream"]["blocks"]
    assert block["valid"] is False and block["expires"] == granted


async def test_block_renewal_is_brought_forward_to_half_its_remaining_life(
    sites: list[Site], tmp_path: Path, clock: ManualClock
) -> None:
    licence = dataclasses.replace(VENDOR, max_ttl=1000.0)  # less than the router asks
    vendor = await start(sites, vendor_config(tmp_path / "v", licence), clock)
    rcfg = router_config(tmp_path / "r", server_of(vendor.daemon), vendor.daemon.signer.public)
    router = await start(sites, rcfg, clock)
    state = await block_taken(router.daemon)
    assert BLOCK.renew_every == 600.0  # later than half of the 1000 s granted
    for _ in range(2):
        [block] = (await admin(router.daemon, "status"))["upstream"]["blocks"]
        assert block["expires"] == block["last_renewal"] + 1000.0
        assert block["next_renewal"] == block["last_renewal"] + 500.0
        clock.advance(500)
        await relay_of(router.daemon).renew_block(state)


async def test_forwarded_records_lapse_on_the_monotonic_clock(
    sites: list[Site], tmp_path: Path, clock: ManualClock
) -> None:
    vendor, router = await vendor_and_router(sites, tmp_path, clock, FORWARD)
    relay = relay_of(router.daemon)
    async with peer(router.daemon) as p:
        reply, _ = await checkout(p, "machine-a")
    assert reply["ok"] is True and reply["ttl"] == VENDOR.lease_ttl
    clock.set_wall(clock.now().wall + 86400)  # set forward: its holder may still renew
    await relay.prune_forwarded(grace=60.0)
    assert list(relay.forwarded) == [reply["lease"]]
    clock.advance(VENDOR.lease_ttl + 60)
    await relay.prune_forwarded(grace=60.0)
    assert list(relay.forwarded) == [reply["lease"]]  # not yet past expiry + grace
    clock.advance(1)
    await relay.prune_forwarded(grace=60.0)
    assert relay.forwarded == {}


class Stop(Exception):
    """Ends a keeper loop run by a test."""


async def test_keeper_stops_serving_at_the_deadline_when_the_clock_is_set_back_meanwhile(
    sites: list[Site], tmp_path: Path, clock: ManualClock
) -> None:
    vendor, router = await vendor_and_router(sites, tmp_path, clock)
    state = await block_taken(router.daemon)
    deadline = state.deadline
    relay, engine = relay_of(router.daemon), router.daemon.engine
    await vendor.stop()  # no renewal: the block runs out
    naps: list[float] = []

    def serving() -> bool:
        licence = engine.licence_by_id(BLOCK.id)
        now = router.daemon.service.now().wall  # the daemon's clock: never set back
        return licence is not None and licence.validity_error(now) is None

    async def sleep(seconds: float) -> None:
        """The keeper's wait, on the test's clock, 10 s at a time: whenever monotonic
        time is past the block's deadline, the engine must refuse the block."""
        if not naps:
            clock.set_wall(clock.now().wall - 86400)  # an admin sets the clock back
        naps.append(seconds)
        if clock.now().mono >= deadline:
            raise Stop
        end = clock.now().mono + seconds
        while clock.now().mono < end:
            clock.advance(min(10.0, end - clock.now().mono))
            assert not (clock.now().mono > deadline + 1e-6 and serving()), naps

    relay.sleep = sleep
    relay.rng = random.Random(13)  # the retries' jitter, the same every run
    with pytest.raises(Stop):
        await relay.run_block(state)  # a second keeper, on this clock; the first sleeps
    assert clock.now().mono == pytest.approx(deadline) and not serving()
    assert len(naps) > 2  # it slept, tried to renew, and slept again


# ------------------------------------------------------------------------------ logs


def log_lines(caplog: pytest.LogCaptureFixture, start: str, level: int = logging.INFO) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= level and r.getMessage().startswith(start)
    ]


async def test_forward_mode_checkout_and_checkin_are_logged_once_each(
    sites: list[Site], tmp_path: Path, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    _, router = await vendor_and_router(sites, tmp_path, clock, FORWARD)
    async with peer(router.daemon) as p:
        reply, _ = await checkout(p, "machine-a")
        assert reply["ok"] is True, reply
        assert (await p.call("checkin", lease=reply["lease"]))["released"] is True
    common = f"licence={FORWARD.id} lease={reply['handle']} seats=1 host=machine-a user=alice"
    assert log_lines(caplog, f"event=checkout licence={FORWARD.id} ") == [
        f"event=checkout {common} ip=127.0.0.1"
    ]
    assert log_lines(caplog, f"event=checkin licence={FORWARD.id} ") == [
        f"event=checkin {common} ip=127.0.0.1"
    ]


async def test_an_upstream_outage_logs_one_warning_not_one_per_request(
    sites: list[Site], tmp_path: Path, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    other = dataclasses.replace(VENDOR, key="VEND-DICOM-0002", id="vendor-dicom-2")
    block = dataclasses.replace(BLOCK, key=other.key)
    vendor = await start(sites, vendor_config(tmp_path / "v", VENDOR, other), clock)
    upstream, trust = server_of(vendor.daemon), vendor.daemon.signer.public
    router = await start(
        sites, router_config(tmp_path / "r", upstream, trust, FORWARD, block), clock
    )
    state = await block_taken(router.daemon)
    async with peer(router.daemon) as p:
        held, _ = await checkout(p, "machine-a")
        assert held["ok"] is True
        before = len(caplog.records)
        await vendor.stop()
        for n in range(10):
            gone, _ = await checkout(p, f"machine-{n}")
            assert gone["error"] == "upstream_unavailable"
            beat = await p.call("heartbeat", lease=held["lease"], nonce=os.urandom(16))
            assert beat["error"] == "upstream_unavailable"
            if n < 3:  # block mode goes on from its block (of 3 seats), saying nothing
                served = await p.checkout(block.key, holder(f"local-{n}"), nonce=os.urandom(16))
                assert served["ok"] is True, served
        for _ in range(3):  # the block keeper's retries, one line each at most
            with contextlib.suppress(UpstreamUnavailable):
                await relay_of(router.daemon).renew_block(state)
    records = caplog.records[before:]
    warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    [line] = warnings
    assert line.startswith("event=upstream_failed kind=unreachable "), warnings
    assert [r.getMessage() for r in records].count("event=upstream_disconnected") == 1


# ------------------------------------------------------------ the link, by itself


async def link_status_text(router: Daemon) -> str:
    """`licd status` on the router, as a person reads it."""
    shown = await asyncio.to_thread(run_licd, "status", "--socket", str(router.admin.path))
    assert shown.returncode == 0, shown.stderr
    return shown.stdout


async def test_the_link_comes_back_by_itself_and_status_tells_the_truth(
    sites: list[Site], tmp_path: Path, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    started = clock.now().wall
    vendor, router = await vendor_and_router(sites, tmp_path, clock)
    await block_taken(router.daemon)  # the router's one request upstream in this test
    vendor_key = vendor.daemon.signer.public
    assert (await link_becomes(router.daemon, "connected"))["since"] == started
    link = link_of(router.daemon)
    link.redial.backoff = Backoff(base=0.05, cap=0.2)  # the keeper's waits are real
    naps: list[float] = []

    async def sleep(seconds: float) -> None:
        naps.append(seconds)
        await asyncio.sleep(seconds)

    link.sleep = sleep

    # Upstream stops: the router says so at once, and since when, with no request made.
    clock.advance(100)
    before = len(caplog.records)
    await vendor.stop()
    stopped = clock.now().wall
    down = await link_becomes(router.daemon, "down")
    assert (down["connected"], down["since"], down["recovered_at"]) == (False, stopped, None)
    assert down["last_error"].startswith("cannot reach the licence daemon (")
    assert down["last_error_at"] == stopped
    # It keeps dialling, a backoff step apart, logging the outage once.
    await until(lambda: len(naps) >= 3, "three attempts to reach upstream")
    assert all(0 <= x <= 0.2 for x in naps), naps
    text = await link_status_text(router.daemon)
    assert f"NOT connected since {when(stopped)}" in text
    assert f"last error  {when(stopped)}  cannot reach the licence daemon (" in text

    # Upstream back: connected within a step, still without a request; the error stays
    # shown with its time, and when the link recovered.
    clock.advance(50)
    await vendor.start()
    back = await link_becomes(router.daemon, "connected")
    assert back["since"] == stopped + 50 == back["recovered_at"]
    assert stopped <= back["last_error_at"] <= stopped + 50
    assert back["next_attempt"] is None
    text = await link_status_text(router.daemon)
    assert f"connected since {when(stopped + 50)}" in text
    assert f"(recovered at {when(stopped + 50)})" in text
    lines = [r.getMessage() for r in caplog.records[before:]]
    assert lines.count("event=upstream_disconnected") == 1
    assert lines.count("event=upstream_connected") == 1
    failed = [x for x in lines if x.startswith("event=upstream_failed ")]
    assert len(failed) == 1 and "kind=unreachable" in failed[0], failed
    assert len(await vendor_checkouts(vendor.daemon)) == 1  # the block, nothing since

    # The router restarted while upstream is away: its block works, and status shows
    # the link down since the restart, never "since -".
    await vendor.stop()
    await router.stop()
    clock.advance(10)
    restarted = clock.now().wall
    await router.start()
    link = (await admin(router.daemon, "status"))["upstream"]["link"]
    assert link["state"] in ("connecting", "down") and link["since"] == restarted
    link_of(router.daemon).redial = Redial(Backoff(base=0.05, cap=0.2))
    down = await link_becomes(router.daemon, "down")
    assert down["since"] == restarted and down["last_error_at"] == restarted
    status = (await admin(router.daemon, "status"))["upstream"]
    [block] = status["blocks"]
    assert (block["valid"], block["seats"]) == (True, BLOCK.block_seats)
    assert block["expires"] == started + BLOCK.block_ttl
    assert block["next_renewal"] == started + BLOCK.renew_every
    text = await link_status_text(router.daemon)
    assert f"NOT connected since {when(restarted)}" in text and "since -" not in text
    async with peer(router.daemon) as p:
        reply, nonce = await checkout(p, "machine-a")
        verify(reply, nonce, vendor_key)
    clock.advance(5)
    await vendor.start()
    back = await link_becomes(router.daemon, "connected")
    assert back["since"] == restarted + 5 == back["recovered_at"]
    assert len(await vendor_checkouts(vendor.daemon)) == 1  # the block resumed


class HangingUp(FakeLicd):
    """A fake upstream that can hang up on its clients and go on listening, as a licd
    closing an idle connection does."""

    def hang_up(self) -> None:
        for writer in list(self._writers):
            writer.close()


class Naps:
    """The link keeper's sleep, stepped by the test: a nap lasts until `wake`, which
    first moves the clock on by its length. A nap the keeper gave up (its connection
    ended) is skipped."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self._asked: asyncio.Queue[tuple[float, asyncio.Future[None]]] = asyncio.Queue()
        self._current: tuple[float, asyncio.Future[None]] | None = None

    async def sleep(self, seconds: float) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._asked.put_nowait((seconds, done))
        await done

    async def next(self) -> float:
        """How long the keeper's next nap is (it is in it now), within WAIT."""
        async with asyncio.timeout(WAIT):
            while True:
                seconds, done = await self._asked.get()
                if not done.done():
                    self._current = (seconds, done)
                    return seconds

    def wake(self) -> None:
        assert self._current is not None
        (seconds, done), self._current = self._current, None
        self.clock.advance(seconds)
        done.set_result(None)


async def test_the_link_keeper_keeps_alive_and_redials_with_backoff(
    clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    naps = Naps(clock)
    expected = list(itertools.islice(REDIAL.delays(random.Random(5)), 5))

    def events(name: str) -> int:
        return sum(r.getMessage().startswith(f"event=upstream_{name}") for r in caplog.records)

    fake = HangingUp()
    async with fake:
        config = UpstreamConfig(servers=(fake.address,), trust=(fake.public_key,))
        link = UpstreamLink(config, clock, "site-1", None, rng=random.Random(5), sleep=naps.sleep)
        keeper = asyncio.create_task(link.run())
        try:
            # Dialled at once; then a keepalive hello every KEEPALIVE seconds.
            t0 = clock.now().wall
            assert await naps.next() == KEEPALIVE
            assert (link.state.phase, link.state.since) == (LinkPhase.CONNECTED, t0)
            assert fake.ops() == ["hello"]
            naps.wake()
            assert await naps.next() == KEEPALIVE
            assert fake.ops() == ["hello"] * 2
            # The dial's hello and the keepalive's both settle on protocol 1, whose tokens a
            # local client of either version can verify (a forwarded one goes on to it).
            assert [r.protocol for r in fake.requests if isinstance(r, Hello)] == [1, 1]

            # Upstream hangs up on a connection open for a while: dialled again at once,
            # and the link never was down.
            fake.hang_up()
            assert await naps.next() == KEEPALIVE
            assert fake.ops() == ["hello"] * 3
            assert (link.state.phase, link.state.since, link.state.last_error) == (
                LinkPhase.CONNECTED,
                t0,
                None,
            )
            assert (events("connected"), events("disconnected")) == (1, 0)

            # Upstream gone: dialled at once, then a backoff step after each failure.
            clock.advance(STEADY)
            await fake.stop()
            stopped = clock.now()
            for n in range(4):
                assert await naps.next() == expected[n]
                status = link.state.to_json(clock.now())
                assert (status["state"], status["since"]) == ("down", stopped.wall)
                assert status["next_attempt"] == clock.now().wall + expected[n]
                assert status["last_error"].startswith("cannot reach the licence daemon (")
                if n < 3:
                    naps.wake()
            assert (events("disconnected"), events("failed")) == (1, 1)  # one line, 4 tries

            # Back: connected at the next attempt, the error shown as recovered.
            await fake.start()
            naps.wake()
            assert await naps.next() == KEEPALIVE
            status = link.state.to_json(clock.now())
            assert status["state"] == "connected" and status["next_attempt"] is None
            assert status["since"] == status["recovered_at"] == clock.now().wall
            assert status["last_error_at"] < status["since"]
            assert events("connected") == 2

            # Hung up on at once: no tight loop, the next step of the same backoff.
            fake.hang_up()
            assert await naps.next() == expected[4]
            assert (link.state.phase, link.state.last_error) == (
                LinkPhase.DOWN,
                "the upstream licence server closed the connection",
            )
            naps.wake()
            assert await naps.next() == KEEPALIVE
            assert link.state.connected and events("failed") == 1
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            await link.close()


async def test_a_block_unrenewed_for_renewals_missed_times_renew_every_is_reported_once(
    sites: list[Site], tmp_path: Path, clock: ManualClock
) -> None:
    vendor = await start(sites, vendor_config(tmp_path / "v"), clock)
    rcfg = router_config(
        tmp_path / "r", server_of(vendor.daemon), vendor.daemon.signer.public, SHORT_BLOCK
    )
    rcfg = dataclasses.replace(rcfg, alerts=dataclasses.replace(rcfg.alerts, renewals_missed=2))
    router = await start(sites, rcfg, clock)
    state = await block_taken(router.daemon)
    assert state.block is not None
    renewed = state.block.renewed
    relay = relay_of(router.daemon)
    told: list[Event] = []
    router.daemon.service.events.subscribe(
        lambda e: told.append(e) if e.kind is Kind.RENEWAL_FAILED else None
    )
    await vendor.stop()  # no renewal from here on

    async def sleep(seconds: float) -> None:
        """The keeper's wait, on the test's clock: 2,000 s of outage, many attempts."""
        if clock.now().wall - renewed >= 2000:
            raise Stop
        clock.advance(min(seconds, 10.0))

    relay.sleep = sleep
    relay.rng = random.Random(5)
    with pytest.raises(Stop):
        await relay.run_block(state)
    [event] = told  # one for the outage, however many attempts failed
    assert event.licence == SHORT_BLOCK.id
    # At the first failed attempt from 400 s on (retries are at most 300 s apart).
    assert 2 * SHORT_BLOCK.renew_every <= event.time - renewed < 2 * SHORT_BLOCK.renew_every + 300
    assert event.detail["last_renewal"] == renewed and event.detail["missed"] == 2
    assert event.reason is not None and "cannot be reached" in event.reason
    audit = await router.daemon.store.audit(limit=1000)
    assert [e.event.kind for e in audit].count(Kind.RENEWAL_FAILED) == 1
    # A renewal re-arms it.
    await vendor.start()
    await relay.renew_block(state)
    assert state.overdue_told is False


async def test_a_block_renewal_tells_the_vendor_the_sites_use(
    sites: list[Site], tmp_path: Path, clock: ManualClock
) -> None:
    vendor, router = await vendor_and_router(sites, tmp_path, clock)
    state = await block_taken(router.daemon)
    assert state.block is not None
    async with peer(router.daemon) as p:
        for host in ("machine-a", "machine-b"):
            assert (await checkout(p, host))[0]["ok"] is True
        refused = await p.checkout("NO-SUCH-KEY", holder("machine-c"))
        assert refused["error"] == "unknown_licence"  # not the block's: not counted
        clock.advance(60)
        await relay_of(router.daemon).renew_block(state)
    await vendor.daemon.store.barrier()  # the report is written with the next batch
    entries = await vendor.daemon.store.audit(limit=1000)
    [report] = [e.event for e in entries if e.event.kind is Kind.SITE_USAGE]
    assert (report.licence, report.handle) == (VENDOR.id, state.block.handle)
    d = report.detail
    assert (d["site"], d["block"], d["peak"], d["denials"]) == ("site-1", BLOCK.id, 2, 0)
    assert d["slot"] == 3600 and [n for _, n in d["peaks"]] == [2]


async def test_a_usage_report_must_be_the_block_holders_own(
    sites: list[Site], tmp_path: Path, clock: ManualClock
) -> None:
    vendor = await start(sites, vendor_config(tmp_path / "v"), clock)
    router_key, other = SigningKey.generate(), SigningKey.generate()
    usage = LicenceUsage("site-dicom", 3600.0, ((clock.now().wall, 1),))
    forged = make_usage_report(other, site="site-x", made=clock.now().wall, usage=usage)
    own = make_usage_report(router_key, site="site-x", made=clock.now().wall, usage=usage)
    async with peer(vendor.daemon) as p:
        block = await p.checkout(VENDOR.key, delegate=bytes(router_key.verify_key), ttl=3600)
        plain = await p.checkout(VENDOR.key)
    for lease, report, why in (
        (block["lease"], forged, "usage: bad signature"),
        (block["lease"], b"junk", "usage: "),
        (plain["lease"], own, "only a site router's block lease"),
    ):
        async with peer(vendor.daemon) as p:  # a bad_request closes the connection
            reply = await p.call("heartbeat", lease=lease, nonce=os.urandom(16), usage=report)
            assert reply["error"] == "bad_request" and why in reply["message"], reply
    async with peer(vendor.daemon) as p:
        good = await p.call("heartbeat", lease=block["lease"], nonce=os.urandom(16), usage=own)
        assert good["ok"] is True
    await vendor.daemon.store.barrier()
    entries = await vendor.daemon.store.audit(limit=1000)
    assert [e.event.detail["site"] for e in entries if e.event.kind is Kind.SITE_USAGE] == [
        "site-x"
    ]


async def test_the_vendor_hears_of_a_silent_site_long_before_its_block_ends(
    sites: list[Site], tmp_path: Path, clock: ManualClock
) -> None:
    config = vendor_config(tmp_path / "v")
    config = dataclasses.replace(
        config, alerts=dataclasses.replace(config.alerts, site_silent=1800)
    )
    vendor = await start(sites, config, clock)
    rcfg = router_config(tmp_path / "r", server_of(vendor.daemon), vendor.daemon.signer.public)
    router = await start(sites, rcfg, clock)
    await block_taken(router.daemon)
    await router.stop()  # the site goes silent; its block runs for BLOCK.block_ttl
    clock.advance(1800)
    assert [a.kind for a in vendor.daemon.alerts.check()] == []
    clock.advance(1)
    [alert] = vendor.daemon.alerts.check()
    assert (alert.kind, alert.licence, alert.detail["site"]) == ("site_silent", VENDOR.id, "site-1")
