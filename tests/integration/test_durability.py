"""Acknowledged means durable: SIGKILL a real daemon under load, restart, audit the seats.

Clients keep a ledger of what the daemon *told* them: a checkout or checkin is
acknowledged when its ok reply arrived. A request sent but unanswered at the kill is
unknown: it may or may not have landed. After each restart on the same state directory:
every acknowledged, unreleased lease renews with its old secret; no acknowledged release
comes back; in use is at least the known leases' seats and at most those plus the
unknown checkouts', and never above the licence's seats. The unknown checkouts are then
resolved exactly by retrying them with their idempotency key, so every seat in use is
accounted for and the licence ends each round empty.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from licd_client.messages import Holder
from tests.integration.procs import DaemonProcess, Daemons, TomlValue, lease_fields
from tests.support import RawPeer, holder

pytestmark = pytest.mark.slow

SEATS = 5
LICENCE: dict[str, TomlValue] = {
    "key": "DURA-BLE0-KEY1",
    "id": "durable",
    "product": "stress",
    "seats": SEATS,
    "lease_ttl": 60,
    "grace": 15,
}
KEY = str(LICENCE["key"])
CLIENTS = 8
ROUNDS = 8
KILL_AFTER = (0.15, 0.6)  # seconds of load before the SIGKILL, drawn per round
REPLY_TIMEOUT = 10.0  # a live daemon answers well within this; a dead one closes at once
SEED = int(os.environ.get("LICD_DURABILITY_SEED", "0")) or random.randrange(1, 1 << 30)


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    with Daemons(tmp_path) as d:
        yield d


async def connected(addr: tuple[str, int]) -> RawPeer:
    peer = await RawPeer.connect(addr)
    await peer.hello()
    return peer


@dataclass
class Ledger:
    """What the clients were told, and what was left unanswered at the kill."""

    held: dict[str, int] = field(default_factory=dict)  # secret -> seats, acked, not released
    released: set[str] = field(default_factory=set)  # acked checkins (every round so far)
    unknown_checkins: dict[str, int] = field(default_factory=dict)  # secret -> seats
    unknown_checkouts: list[tuple[str, Holder, int]] = field(default_factory=list)
    acked_checkouts: int = 0
    acked_checkins: int = 0
    refused: int = 0  # seats_exhausted answers
    unanswered: int = 0  # requests unanswered at a kill
    landed: int = 0  # of those, the ones the daemon had committed

    def new_round(self) -> None:
        assert not self.held and not self.unknown_checkins and not self.unknown_checkouts
        self.unknown_checkins = {}
        self.unknown_checkouts = []


class Lost(Exception):
    """The daemon closed the connection (it was killed)."""


class LoadClient:
    """Checks out and in at random over one connection until the daemon dies."""

    def __init__(self, n: int, ledger: Ledger, rng: random.Random) -> None:
        self.holder = holder(f"load-{n}", user=f"user{n}")
        self.ledger = ledger
        self.rng = rng
        self.mine: list[str] = []  # secrets this client holds, oldest first
        self.next_id = 0

    async def ask(self, peer: RawPeer, op: str, **args: Any) -> dict[str, Any]:
        self.next_id += 1
        await peer.send({"op": op, "id": self.next_id, **args})
        reply = await peer.recv(within=REPLY_TIMEOUT)
        if reply is None:
            raise Lost()
        assert reply["id"] == self.next_id, reply
        return reply

    async def run(self, addr: tuple[str, int], killed: asyncio.Event) -> None:
        ledger = self.ledger
        peer = await connected(addr)
        exhausted = False
        pending_out: tuple[str, Holder, int] | None = None
        pending_in: tuple[str, int] | None = None
        try:
            while not killed.is_set():
                if self.mine and (exhausted or self.rng.random() < 0.45):
                    secret = self.mine.pop(0)
                    pending_in = (secret, ledger.held.pop(secret))
                    reply = await self.ask(peer, "checkin", lease=secret)
                    if reply.get("error") == "shutting_down":  # refused: still held
                        ledger.held[secret] = pending_in[1]
                        pending_in = None
                        break
                    assert reply.get("ok") is True and reply["released"] is True, reply
                    ledger.released.add(secret)
                    ledger.acked_checkins += 1
                    pending_in = None
                    exhausted = False
                    continue
                seats = 2 if self.rng.random() < 0.2 else 1
                request = os.urandom(16).hex()
                pending_out = (request, self.holder, seats)
                reply = await self.ask(
                    peer,
                    "checkout",
                    key=KEY,
                    holder=self.holder.to_wire(),
                    seats=seats,
                    request=request,
                    nonce=os.urandom(16),
                )
                pending_out = None
                if reply.get("error") == "shutting_down":  # refused: nothing granted
                    break
                if reply.get("ok") is True:
                    secret, granted = lease_fields(reply)
                    assert granted == seats
                    ledger.held[secret] = seats
                    ledger.acked_checkouts += 1
                    self.mine.append(secret)
                    exhausted = False
                else:
                    assert reply["error"] == "seats_exhausted", reply
                    ledger.refused += 1
                    exhausted = True
                    if not self.mine:  # nothing to give back: let the others move
                        await asyncio.sleep(self.rng.uniform(0, 0.003))
        except (Lost, ConnectionError, OSError):
            pass
        finally:
            if pending_out is not None:
                ledger.unknown_checkouts.append(pending_out)
            if pending_in is not None:
                ledger.unknown_checkins[pending_in[0]] = pending_in[1]
            self.mine.clear()
            await peer.close()


async def heartbeat(peer: RawPeer, secret: str) -> dict[str, Any]:
    return await peer.call("heartbeat", lease=secret, nonce=os.urandom(16))


def brief(reply: dict[str, Any]) -> dict[str, Any]:
    """A reply without its token, for assertion messages."""
    return {k: v for k, v in reply.items() if k not in ("token", "chain")}


async def in_use(peer: RawPeer) -> int:
    reply = await peer.call("available", key=KEY)
    assert reply["ok"] is True and reply["total"] == SEATS, reply
    assert 0 <= reply["in_use"] <= SEATS, f"over-allocated: {reply}"
    assert reply["available"] == SEATS - reply["in_use"], reply
    return int(reply["in_use"])


async def checkin(peer: RawPeer, secret: str) -> None:
    reply = await peer.call("checkin", lease=secret)
    assert reply["ok"] is True and reply["released"] is True, reply


async def audit_and_release(daemon: DaemonProcess, ledger: Ledger) -> None:
    """After a restart: check the ledger against the daemon, then release every seat."""
    peer = await connected(daemon.addr)
    # Acknowledged and not released: still there, with the seats it was granted.
    for secret, seats in ledger.held.items():
        reply = await heartbeat(peer, secret)
        assert reply["ok"] is True, f"acknowledged lease lost: {brief(reply)}"
        assert reply["seats"] == seats
    # Acknowledged released: never back.
    for secret in ledger.released:
        reply = await heartbeat(peer, secret)
        assert reply.get("error") == "lease_unknown", f"released lease resurrected: {brief(reply)}"
    # Unanswered checkins: either way, but find out which.
    survivors: dict[str, int] = {}
    for secret, seats in ledger.unknown_checkins.items():
        reply = await heartbeat(peer, secret)
        if reply["ok"] is True:
            survivors[secret] = seats
        else:
            assert reply["error"] == "lease_unknown", reply
    ledger.unanswered += len(ledger.unknown_checkins) + len(ledger.unknown_checkouts)
    known = sum(ledger.held.values()) + sum(survivors.values())
    unknown = sum(seats for _, _, seats in ledger.unknown_checkouts)
    used = await in_use(peer)
    assert known <= used <= known + unknown, (known, used, unknown, ledger)

    # Give back every known lease; what is left are unanswered checkouts that landed.
    for secret in [*ledger.held, *survivors]:
        await checkin(peer, secret)
        ledger.released.add(secret)
    leftover = await in_use(peer)
    assert leftover == used - known

    # Resolve each unanswered checkout exactly: a retry with its idempotency key returns
    # the lease it created, if it did (taking no new seat), or makes a new one.
    landed_seats = landed_leases = 0
    queue = list(ledger.unknown_checkouts)
    for _ in range(len(queue) ** 2 + 1):
        if not queue:
            break
        request, who, seats = queue.pop(0)
        before = await in_use(peer)
        reply = await peer.checkout(KEY, who, request=request, seats=seats)
        if reply["ok"] is not True:
            # Full of landed leases not yet resolved: they are released first.
            assert reply["error"] == "seats_exhausted" and before > 0, reply
            queue.append((request, who, seats))
            continue
        secret, granted = lease_fields(reply)
        assert granted == seats
        after = await in_use(peer)
        if after == before:
            landed_seats += seats
            landed_leases += 1
        else:
            assert after == before + seats, (before, after, seats)
        await checkin(peer, secret)
        ledger.released.add(secret)
    assert not queue, "unanswered checkouts could not be resolved"
    assert landed_seats == leftover, (landed_seats, leftover)
    assert await in_use(peer) == 0
    await peer.close()

    restored = len(ledger.held) + len(survivors) + landed_leases
    ledger.landed += len(ledger.unknown_checkins) - len(survivors) + landed_leases
    assert f"event=restored leases={restored}" in daemon.stderr(), daemon.stderr()
    ledger.held.clear()
    ledger.unknown_checkins.clear()
    ledger.unknown_checkouts.clear()


async def rounds_under_load(daemons: Daemons, rounds: int, *, graceful: bool) -> Ledger:
    """`rounds` times: load, stop at a random moment (SIGKILL, or SIGTERM if `graceful`),
    restart on the same state directory, audit and release."""
    rng = random.Random(SEED)
    print(f"LICD_DURABILITY_SEED={SEED}")
    config = daemons.config(LICENCE)
    ledger = Ledger()
    started = time.monotonic()
    daemon = await daemons.astart(config)
    for _ in range(rounds):
        ledger.new_round()
        stopping = asyncio.Event()
        clients = [LoadClient(n, ledger, random.Random(rng.random())) for n in range(CLIENTS)]
        tasks = [asyncio.create_task(c.run(daemon.addr, stopping)) for c in clients]
        done, _ = await asyncio.wait(tasks, timeout=rng.uniform(*KILL_AFTER))
        for task in done:
            task.result()  # a client that stopped before the kill failed: show why
        if graceful:
            # Clients keep talking while the daemon drains; it must still exit cleanly.
            await daemon.aterminate()
        else:
            daemon.kill()
        stopping.set()
        async with asyncio.timeout(REPLY_TIMEOUT + 5):
            await asyncio.gather(*tasks)

        daemon = await daemons.astart(config)
        await audit_and_release(daemon, ledger)

    await daemon.aterminate()
    elapsed = time.monotonic() - started
    print(
        f"rounds={rounds} checkouts={ledger.acked_checkouts} checkins={ledger.acked_checkins}"
        f" refused={ledger.refused} unanswered={ledger.unanswered} landed={ledger.landed}"
        f" elapsed={elapsed:.1f}s"
    )
    # The load was real: plenty of acknowledged work, and the licence ran full.
    assert ledger.acked_checkouts >= 10 * rounds
    assert ledger.acked_checkins >= 5 * rounds
    assert ledger.refused > 0
    for text in (d.stderr() for d in daemons.started):
        assert "Traceback" not in text, text
    return ledger


async def test_sigkill_under_load_loses_and_resurrects_nothing(daemons: Daemons) -> None:
    await rounds_under_load(daemons, ROUNDS, graceful=False)


async def test_sigterm_under_load_keeps_every_acknowledged_change(daemons: Daemons) -> None:
    await rounds_under_load(daemons, 2, graceful=True)


async def test_acknowledged_checkout_and_checkin_survive_an_immediate_sigkill(
    daemons: Daemons,
) -> None:
    config = daemons.config(LICENCE)
    daemon = await daemons.astart(config)
    released: list[str] = []
    for _ in range(2):
        peer = await connected(daemon.addr)
        request = os.urandom(16).hex()
        secret, seats = lease_fields(await peer.checkout(KEY, request=request, seats=2))
        daemon.kill()  # nothing between the ack and the kill
        await peer.close()

        daemon = await daemons.astart(config)
        peer = await connected(daemon.addr)
        reply = await heartbeat(peer, secret)
        assert reply["ok"] is True and reply["seats"] == seats, brief(reply)
        assert await in_use(peer) == seats
        # A client that never saw the ack retries with its idempotency key: same lease.
        again = await peer.checkout(KEY, request=request, seats=2)
        assert lease_fields(again) == (secret, seats)
        assert await in_use(peer) == seats
        for gone in released:
            assert (await heartbeat(peer, gone))["error"] == "lease_unknown"

        await checkin(peer, secret)
        released.append(secret)
        daemon.kill()  # the same for a release
        await peer.close()

        daemon = await daemons.astart(config)
        peer = await connected(daemon.addr)
        assert (await heartbeat(peer, secret))["error"] == "lease_unknown"
        assert await in_use(peer) == 0
        assert re.search(r"event=restored leases=0\b", daemon.stderr())
        await peer.close()
    await daemon.aterminate()
