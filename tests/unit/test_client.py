"""Tests of the asyncio client (client.py, lease.py) against the fake daemon.

Time is a ManualClock: the renewal task and retry loops sleep on it and the tests step
it, so nothing here waits on real timers except bounded waits for socket I/O.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
from pathlib import Path

import pytest
from nacl.signing import SigningKey

import licd_client.lease
from licd_client import errors, messages, tokens
from licd_client.backoff import Backoff
from licd_client.client import AsyncClient, resolve_anchors, resolve_servers
from licd_client.clock import ManualClock
from licd_client.connection import blocking_checkin
from licd_client.lease import AsyncLease, LeaseState, _checkin_held_at_exit
from tests.fakelicd import LICENCE, FakeLicd
from tests.unit.test_dependencies import imports

KEY = LICENCE.key


def state(lease: AsyncLease) -> LeaseState:
    """The lease's state, read afresh (it changes behind mypy's back)."""
    return lease.state


def checkouts(fake: FakeLicd) -> list[messages.Checkout]:
    return [r for r in fake.requests if isinstance(r, messages.Checkout)]


def heartbeats(fake: FakeLicd) -> list[messages.Heartbeat]:
    return [r for r in fake.requests if isinstance(r, messages.Heartbeat)]


async def step_until(clock: ManualClock, event: asyncio.Event, steps: int = 100) -> int:
    """Step the clock, one sleeper at a time, until `event` is set; the steps taken."""
    for n in range(1, steps + 1):
        await clock.step()
        waiter = asyncio.ensure_future(event.wait())
        sleeper = asyncio.ensure_future(clock.wait_for_sleeper())
        await asyncio.wait({waiter, sleeper}, timeout=5, return_when=asyncio.FIRST_COMPLETED)
        for task in (waiter, sleeper):
            task.cancel()
        await asyncio.gather(waiter, sleeper, return_exceptions=True)
        if event.is_set():
            return n
    raise AssertionError(f"not set after {steps} steps")


# --------------------------------------------------------------- checkout, verify


async def test_checkout_returns_a_verified_lease(
    fake: FakeLicd, client: AsyncClient, clock: ManualClock
) -> None:
    lease = await client.checkout(KEY, app="scanner")
    try:
        assert state(lease) is LeaseState.ACTIVE and lease.valid
        assert lease.handle == "L0001"
        assert lease.seats == 1
        assert lease.features == {"tier": "pro", "ocr": True}
        assert lease.remaining() == 30.0
        assert lease.deadline == clock.now() + 30.0
        assert lease.renew_at == clock.now() + 10.0
        assert lease.statement is not None and lease.statement.nonce is not None
        assert lease.lease_id in fake.leases
        assert lease.lease_id not in repr(lease)
        (req,) = checkouts(fake)
        assert len(req.nonce) == 16 and req.nonce == lease.statement.nonce
        assert len(req.request) == 32 and int(req.request, 16) >= 0
        assert req.holder.app == "scanner"
        assert client.hello is not None and client.hello.key == fake.public_key
        assert client.leases == [lease]
    finally:
        await lease.release()


async def test_each_checkout_sends_fresh_nonce_and_request_key(
    fake: FakeLicd, client: AsyncClient
) -> None:
    a = await client.checkout(KEY)
    b = await client.checkout(KEY)
    first, second = checkouts(fake)
    assert first.nonce != second.nonce and first.request != second.request
    assert a.lease_id != b.lease_id
    await client.aclose()
    assert fake.leases == {}


@pytest.mark.parametrize("where", [0, 40, -1])
async def test_a_token_with_a_flipped_byte_is_rejected_and_checked_in(
    fake: FakeLicd, client: AsyncClient, where: int
) -> None:
    fake.tamper = lambda t: t[:where] + bytes([t[where] ^ 0x01]) + t[where:][1:]
    with pytest.raises(errors.TokenInvalid):
        await client.checkout(KEY)
    assert fake.leases == {}  # the seat was given back
    assert fake.ops()[-1] == "checkin"
    assert client.leases == []


async def test_a_token_signed_by_another_key_is_rejected(
    fake: FakeLicd, client: AsyncClient
) -> None:
    fake.token_key = SigningKey.generate()
    with pytest.raises(errors.TokenInvalid, match="signature"):
        await client.checkout(KEY)
    assert fake.leases == {}


async def test_a_token_with_the_wrong_nonce_is_rejected(
    fake: FakeLicd, client: AsyncClient
) -> None:
    fake.nonce_override = bytes(16)
    with pytest.raises(errors.TokenInvalid, match="nonce"):
        await client.checkout(KEY)
    assert fake.leases == {}


@pytest.mark.parametrize("protocols", [(1, 2), (1,)], ids=["protocol_2", "older_daemon"])
async def test_batched_tokens_verify_with_their_proof(
    fake: FakeLicd, client: AsyncClient, protocols: tuple[int, ...]
) -> None:
    """On protocol 2 the daemon may batch: the lease keeps the payload as its token and the
    statement its proof. An older daemon (hello again with 1) never batches."""
    fake.protocols, fake.batch_size, fake.batch_index = protocols, 5, 4
    lease = await client.checkout(KEY)
    try:
        assert client.hello is not None and client.hello.protocol == max(protocols)
        st = lease.statement
        assert st is not None and lease.valid
        if protocols == (1,):
            assert st.proof is None
            return
        assert st.proof is not None and st.proof.payload == lease.token
        assert (st.proof.batch.index, st.proof.batch.size) == (4, 5)
        fake.batch_index = 0
        await lease.renew_once()
        renewed = lease.statement
        assert renewed is not None and renewed.proof is not None
        assert renewed.proof.batch.index == 0 and renewed.proof.payload == lease.token
    finally:
        await lease.release()


async def test_a_batched_token_signed_by_another_key_is_rejected(
    fake: FakeLicd, client: AsyncClient
) -> None:
    fake.batch_size, fake.token_key = 2, SigningKey.generate()
    with pytest.raises(errors.TokenInvalid, match="signature"):
        await client.checkout(KEY)
    assert fake.leases == {}


async def test_a_delegated_token_verifies_through_its_chain(
    fake: FakeLicd, clock: ManualClock
) -> None:
    vendor = SigningKey.generate()
    fake.delegator, fake.token_key = vendor, SigningKey.generate()
    vendor_hex = tokens.key_to_text(bytes(vendor.verify_key))
    async with AsyncClient(fake.address, f"{fake.key_hex},{vendor_hex}", clock=clock) as c:
        lease = await c.checkout(KEY)
        assert len(lease.chain) == 1 and lease.valid
    # Trusting only the daemon's own key, the router's token does not verify.
    async with AsyncClient(fake.address, fake.key_hex, clock=clock) as c:
        with pytest.raises(errors.TokenInvalid):
            await c.checkout(KEY)
    assert fake.leases == {}


async def test_without_a_server_key_no_seat_is_taken(
    fake: FakeLicd, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LICD_SERVER_KEY", raising=False)
    async with AsyncClient(fake.address) as c:
        with pytest.raises(errors.TokenInvalid, match="LICD_SERVER_KEY"):
            await c.checkout(KEY)
        assert (await c.available(KEY)).available == 3  # what needs no token still works
    assert checkouts(fake) == []


async def test_seats_exhausted_is_raised_with_the_daemons_message(
    fake: FakeLicd, client: AsyncClient
) -> None:
    lease = await client.checkout(KEY, seats=3)
    with pytest.raises(errors.SeatsExhausted) as info:
        await client.checkout(KEY)
    assert info.value.message == "maximum allowed concurrent licences reached"
    assert info.value.detail == {"in_use": 3, "total": 3}
    assert len(checkouts(fake)) == 2  # not retried without `wait`
    await lease.release()


async def test_checkout_with_wait_retries_until_a_seat_frees(
    fake: FakeLicd, client: AsyncClient, clock: ManualClock
) -> None:
    async with AsyncClient(fake.address, fake.key_hex) as other:  # real clock
        holder = await other.checkout(KEY, seats=3)
        task = asyncio.create_task(client.checkout(KEY, wait=60))
        await clock.wait_for_sleeper()  # it was refused and is backing off
        assert not task.done()
        await holder.release()
        await clock.step()
        lease = await asyncio.wait_for(task, 5)
    assert lease.valid and len(checkouts(fake)) == 3
    await lease.release()


async def test_a_lost_checkout_reply_is_retried_with_the_same_request_key(
    fake: FakeLicd, client: AsyncClient, clock: ManualClock
) -> None:
    fake.drop_reply = {"checkout"}
    task = asyncio.create_task(client.checkout(KEY))
    await clock.step()  # the backoff before the retry
    lease = await asyncio.wait_for(task, 5)
    first, second = checkouts(fake)
    assert first.request == second.request
    assert first.nonce != second.nonce
    assert list(fake.leases) == [lease.lease_id]  # one seat, not two
    assert (await client.available(KEY)).in_use == 1
    assert fake.ops().count("hello") == 2  # it reconnected
    await lease.release()


async def test_a_checkout_cancelled_after_it_was_sent_checks_in_the_lease_it_got(
    fake: FakeLicd, client: AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    answer = fake._answer
    tasks: list[asyncio.Task[AsyncLease]] = []

    def cancel_then_answer(req: messages.Request) -> dict[str, object]:
        if isinstance(req, messages.Checkout):
            tasks[0].cancel()  # the request is out, its reply not yet read: Ctrl-C now
        return answer(req)

    monkeypatch.setattr(fake, "_answer", cancel_then_answer)
    tasks.append(asyncio.create_task(client.checkout(KEY)))
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(tasks[0], 5)
    assert fake.ops()[-2:] == ["checkout", "checkin"]
    assert fake.leases == {}  # given back before the cancellation went on
    assert client.leases == []


async def test_retries_give_up_after_the_budget(fake: FakeLicd, clock: ManualClock) -> None:
    await fake.stop()
    c = AsyncClient(fake.address, fake.key_hex, clock=clock, retry_for=10.0)
    start = clock.now()
    task = asyncio.create_task(c.available(KEY))
    while not task.done():
        await clock.step()
        await asyncio.wait({task}, timeout=0.05)
    with pytest.raises(errors.ConnectionLost, match="cannot reach"):
        task.result()
    assert clock.now() - start <= 10.0
    await c.aclose()


async def test_rate_limited_waits_at_least_retry_after(
    fake: FakeLicd, client: AsyncClient, clock: ManualClock
) -> None:
    fake.fail["available"] = errors.RateLimited(retry_after=2.5)
    task = asyncio.create_task(client.available(KEY))
    assert await clock.wait_for_sleeper() == clock.now() + 2.5
    del fake.fail["available"]
    await clock.step()
    reply = await asyncio.wait_for(task, 5)
    assert (reply.total, reply.in_use, reply.available) == (3, 0, 3)


async def test_a_fatal_hello_error_is_raised_as_is(fake: FakeLicd, client: AsyncClient) -> None:
    fake.fail["hello"] = errors.UnsupportedProtocol(detail={"supported": [2]})
    with pytest.raises(errors.UnsupportedProtocol):
        await client.available(KEY)
    assert fake.ops() == ["hello"]


# ------------------------------------------------------------------------ renewal


async def test_renewal_at_renew_in_updates_the_lease(
    fake: FakeLicd, client: AsyncClient, clock: ManualClock
) -> None:
    renewed: list[AsyncLease] = []
    event = asyncio.Event()

    async def on_renewed(lease: AsyncLease) -> None:  # async callbacks are awaited
        renewed.append(lease)
        event.set()

    lease = await client.checkout(KEY, on_renewed=on_renewed)
    start = clock.now()
    assert await clock.wait_for_sleeper() == start + 10.0  # renew_in, not earlier
    assert heartbeats(fake) == []
    fake.licences[KEY].features = {"tier": "basic"}  # an admin's edit
    await clock.step()
    await asyncio.wait_for(event.wait(), 5)
    assert renewed == [lease]
    (hb,) = heartbeats(fake)
    assert hb.lease == lease.lease_id
    assert clock.now() == start + 10.0
    assert lease.deadline == start + 40.0 and lease.renew_at == start + 20.0
    assert lease.features == {"tier": "basic"}
    assert state(lease) is LeaseState.ACTIVE
    await lease.release()


async def test_reconnects_after_a_daemon_restart_and_keeps_the_lease(
    fake: FakeLicd, client: AsyncClient, clock: ManualClock
) -> None:
    renewed = asyncio.Event()
    lease = await client.checkout(KEY, on_renewed=lambda _: renewed.set())
    lease_id, handle = lease.lease_id, lease.handle
    await fake.stop()
    await clock.step()  # renewal due: the daemon is down
    await clock.wait_for_sleeper()  # backing off
    assert state(lease) is LeaseState.DEGRADED
    assert lease.valid  # an outage shorter than the lease is tolerated
    await fake.start()  # same port, same leases
    await step_until(clock, renewed)
    assert state(lease) is LeaseState.ACTIVE
    assert (lease.lease_id, lease.handle) == (lease_id, handle)
    assert heartbeats(fake)[-1].lease == lease_id
    assert fake.ops().count("hello") == 2
    assert list(fake.leases) == [lease_id]
    await lease.release()
    assert fake.leases == {}


async def test_lease_unknown_fires_on_lost(
    fake: FakeLicd, client: AsyncClient, clock: ManualClock
) -> None:
    lost: list[Exception] = []
    event = asyncio.Event()

    def on_lost(reason: Exception) -> None:
        lost.append(reason)
        event.set()

    lease = await client.checkout(KEY, on_lost=on_lost)
    fake.leases.clear()  # revoked by an admin
    await clock.step()
    await asyncio.wait_for(event.wait(), 5)
    assert len(lost) == 1 and isinstance(lost[0], errors.LeaseUnknown)
    assert state(lease) is LeaseState.LOST and not lease.valid
    assert lease.lost_reason is lost[0]
    with pytest.raises(errors.LeaseUnknown):
        await lease.validate()
    assert clock.sleepers == []  # the renewal task has stopped
    assert client.leases == []
    await lease.release()  # harmless
    assert state(lease) is LeaseState.RELEASED


async def test_failed_renewals_fire_on_expiring_then_on_lost_at_the_deadline(
    fake: FakeLicd, client: AsyncClient, clock: ManualClock
) -> None:
    expiring: list[tuple[float, bool]] = []
    lost: list[Exception] = []
    event = asyncio.Event()

    def on_lost(reason: Exception) -> None:
        lost.append(reason)
        event.set()

    lease = await client.checkout(
        KEY,
        on_expiring=lambda remaining: expiring.append((remaining, lease.valid)),
        on_lost=on_lost,
    )
    start = clock.now()
    await fake.stop()
    await step_until(clock, event)
    assert len(expiring) == 1  # once per outage
    remaining, was_valid = expiring[0]
    assert 0 < remaining <= 10.0 and was_valid
    assert isinstance(lost[0], errors.LeaseUnknown) and "lapsed" in str(lost[0])
    assert clock.now() == start + 30.0  # lost exactly at the local deadline
    assert not lease.valid and lease.remaining() == 0
    await lease.release()


def heartbeat_times(
    fake: FakeLicd, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> list[float]:
    """The lease-clock times at which the fake answers heartbeats, filled in as it does."""
    times: list[float] = []
    answer = fake._answer

    def timed(req: messages.Request) -> dict[str, object]:
        if isinstance(req, messages.Heartbeat):
            times.append(clock.now())
        return answer(req)

    monkeypatch.setattr(fake, "_answer", timed)
    return times


async def test_renewals_wait_retry_after_wake_for_on_expiring_and_stop_at_the_deadline(
    fake: FakeLicd, client: AsyncClient, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon that keeps saying "wait 8 s": each retry waits that (the jittered delay is
    shorter), but not past the start of the last third (on_expiring, and a retry then)
    nor past the local deadline, where the lease is lost without another try."""
    times = heartbeat_times(fake, clock, monkeypatch)
    expiring: list[float] = []
    lost = asyncio.Event()
    await client.checkout(
        KEY, on_expiring=lambda left: expiring.append(clock.now()), on_lost=lambda _: lost.set()
    )
    fake.fail["heartbeat"] = errors.RateLimited(retry_after=8.0)
    await step_until(clock, lost)
    assert times == [1010.0, 1018.0, 1020.0, 1028.0]  # checked out at 1000, ttl 30
    assert expiring == [1020.0]
    assert clock.now() == 1030.0


async def test_a_renewal_failing_after_the_deadline_loses_the_lease_at_once(
    fake: FakeLicd, client: AsyncClient, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    answer = fake._answer

    def slow(req: messages.Request) -> dict[str, object]:
        if isinstance(req, messages.Heartbeat):
            clock.advance(25.0)  # the reply comes 5 s after the lease's deadline
        return answer(req)

    monkeypatch.setattr(fake, "_answer", slow)
    lost = asyncio.Event()
    await client.checkout(KEY, on_lost=lambda _: lost.set())
    fake.fail["heartbeat"] = errors.RateLimited(retry_after=8.0)
    await step_until(clock, lost)
    assert clock.now() == 1035.0  # not at the retry, 8 s on


async def test_renewal_retries_back_off_with_jitter_and_start_over_after_a_success(
    fake: FakeLicd, client: AsyncClient, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    times = heartbeat_times(fake, clock, monkeypatch)
    lease = await client.checkout(KEY)
    # The client's delays, as its own random source (seeded 1, not drawn yet) makes them.
    draws = random.Random(1)
    outage = Backoff().delays(draws)
    first, second = next(outage), next(outage)
    fake.fail["heartbeat"] = errors.Unavailable()
    assert await clock.step() == 1010.0  # renew_in: fails
    assert await clock.wait_for_sleeper() == pytest.approx(1010.0 + first)
    await clock.step()  # fails again: the next, longer step
    assert await clock.wait_for_sleeper() == pytest.approx(1010.0 + first + second)
    del fake.fail["heartbeat"]
    renewed = await clock.step()
    assert await clock.wait_for_sleeper() == pytest.approx(renewed + 10.0)  # renew_in again
    assert state(lease) is LeaseState.ACTIVE
    fake.fail["heartbeat"] = errors.Unavailable()
    await clock.step()  # fails
    # A new outage: the backoff starts over from its first, shortest step.
    again = next(Backoff().delays(draws))  # from 0..0.1 again, not 0..0.4
    assert await clock.wait_for_sleeper() == pytest.approx(renewed + 10.0 + again)
    assert times == pytest.approx([1010.0, 1010.0 + first, renewed, renewed + 10.0])
    await lease.release()


async def test_a_bad_token_on_renewal_loses_the_lease(
    fake: FakeLicd, client: AsyncClient, clock: ManualClock
) -> None:
    event = asyncio.Event()
    lost: list[Exception] = []

    def on_lost(reason: Exception) -> None:
        lost.append(reason)
        event.set()

    lease = await client.checkout(KEY, on_lost=on_lost)
    fake.token_key = SigningKey.generate()
    await clock.step()
    await asyncio.wait_for(event.wait(), 5)
    assert isinstance(lost[0], errors.TokenInvalid)
    assert state(lease) is LeaseState.LOST
    assert fake.leases == {}  # checked in, never used


async def test_callback_errors_do_not_stop_renewal(
    fake: FakeLicd, client: AsyncClient, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    calls = []

    def broken(_: AsyncLease) -> None:
        calls.append(1)
        raise RuntimeError("app bug")

    lease = await client.checkout(KEY, on_renewed=broken)
    await clock.step()
    await clock.wait_for_sleeper()
    await clock.step()
    await clock.wait_for_sleeper()
    assert calls == [1, 1] and state(lease) is LeaseState.ACTIVE
    assert "on_renewed callback failed" in caplog.text
    await lease.release()


# ------------------------------------------------------------------- validation


async def test_strict_validate_asks_the_daemon(
    fake: FakeLicd, client: AsyncClient, clock: ManualClock
) -> None:
    lease = await client.checkout(KEY, mode="strict")
    await lease.validate()
    assert len(heartbeats(fake)) == 1
    await fake.stop()
    with pytest.raises(errors.ConnectionLost):
        await lease.validate()
    assert state(lease) is LeaseState.DEGRADED
    await fake.start()
    await lease.validate()
    assert state(lease) is LeaseState.ACTIVE
    await lease.release()
    assert fake.leases == {}


async def test_lease_mode_validate_trusts_the_lease_clock(
    fake: FakeLicd, client: AsyncClient, clock: ManualClock
) -> None:
    lease = await client.checkout(KEY)
    await fake.stop()
    await lease.validate()  # no daemon needed
    assert heartbeats(fake) == []
    clock.advance(30.0)  # slept through the whole lease
    with pytest.raises(errors.LeaseUnknown):
        await lease.validate()
    assert not lease.valid and state(lease) is LeaseState.LOST
    await lease.release()


# ---------------------------------------------------------------------- release


async def test_release_is_idempotent(
    fake: FakeLicd, client: AsyncClient, clock: ManualClock
) -> None:
    lease = await client.checkout(KEY)
    await lease.release()
    await lease.release()
    assert fake.ops().count("checkin") == 1
    assert fake.leases == {} and state(lease) is LeaseState.RELEASED and not lease.valid
    assert clock.sleepers == []  # no renewal task left
    with pytest.raises(errors.LeaseUnknown, match="released"):
        await lease.validate()


async def test_release_retries_a_checkin_whose_reply_was_lost(
    fake: FakeLicd, client: AsyncClient, clock: ManualClock
) -> None:
    lease = await client.checkout(KEY)
    fake.drop_reply = {"checkin"}  # checked in, but the reply never comes
    task = asyncio.create_task(lease.release())
    async with asyncio.timeout(5):  # the renewal task is gone once the checkin is out
        while "checkin" not in fake.ops():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    await clock.step()  # the backoff before the retry
    await asyncio.wait_for(task, 5)
    assert fake.ops().count("checkin") == 2  # the retry found the lease gone: done
    assert fake.leases == {} and state(lease) is LeaseState.RELEASED


async def test_context_managers_check_in(fake: FakeLicd, clock: ManualClock) -> None:
    async with AsyncClient(fake.address, fake.key_hex, clock=clock) as c:
        async with await c.checkout(KEY) as lease:
            assert fake.leases
        assert state(lease) is LeaseState.RELEASED and fake.leases == {}
        await c.checkout(KEY, seats=2)
        assert len(fake.leases) == 1
    assert fake.leases == {}  # closing the client checked the rest in


async def test_release_without_a_daemon_does_not_raise(
    fake: FakeLicd, client: AsyncClient, clock: ManualClock
) -> None:
    lease = await client.checkout(KEY)
    await fake.stop()
    task = asyncio.create_task(lease.release())
    while not task.done():
        await clock.step()
        await asyncio.wait({task}, timeout=0.05)
    task.result()
    assert state(lease) is LeaseState.RELEASED


async def test_exit_hook_checks_in_held_leases_without_a_loop(
    fake: FakeLicd, client: AsyncClient
) -> None:
    lease = await client.checkout(KEY)
    await asyncio.to_thread(_checkin_held_at_exit)
    assert fake.leases == {}
    await lease.release()
    # And the blocking helper reports what happened.
    assert await asyncio.to_thread(blocking_checkin, [("127.0.0.1", fake.port)], "nope")
    await fake.stop()
    assert not await asyncio.to_thread(blocking_checkin, [("127.0.0.1", fake.port)], "x")


# ------------------------------------------------------------------ configuration


def test_servers_come_from_the_argument_or_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("LICD_SERVER", raising=False)
    assert resolve_servers(None) == [("127.0.0.1", 27500)]
    monkeypatch.setenv("LICD_SERVER", "a:1, b ,[::1]:3")
    assert resolve_servers(None) == [("a", 1), ("b", 27500), ("::1", 3)]
    assert resolve_servers("c:4") == [("c", 4)]
    assert resolve_servers([("d", 5), "e:6"]) == [("d", 5), ("e", 6)]
    for bad in ("a:0", "a:x", ":5", "[::1", ""):
        with pytest.raises(ValueError):
            resolve_servers(bad)


def test_server_keys_come_from_the_argument_or_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = bytes(range(32)), bytes(32)
    monkeypatch.setenv("LICD_SERVER_KEY", f"{a.hex()},{b.hex()}")
    assert resolve_anchors(None) == [a, b]
    assert resolve_anchors(a) == [a]
    assert resolve_anchors([a.hex().upper()]) == [a]
    monkeypatch.delenv("LICD_SERVER_KEY")
    assert resolve_anchors(None) == []
    for bad in ("abc", "zz" * 32, b"short", "00 00 " + "00" * 29):
        with pytest.raises(ValueError):
            resolve_anchors(bad)


def test_the_client_package_imports_no_daemon_code() -> None:
    code = (
        "import sys, licd_client, licd_client.cli; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('licd', 'aiosqlite', 'click')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_lease_knows_its_client_only_as_a_lease_owner() -> None:
    """lease.py reaches its client through `LeaseOwner` alone: it imports nothing of
    client.py, not even for typing, so the two cannot grow into each other again."""
    source = Path(licd_client.lease.__file__).read_text(encoding="utf-8")
    modules = {i.module for i in imports(source, "licd_client")}
    assert "licd_client.messages" in modules  # the walk sees the lease's imports...
    assert "licd_client.client" not in modules  # ...and none of client.py
