"""The engine's rules, on a fake clock: seats, idempotency, expiry, reclaim, restore."""

from __future__ import annotations

from dataclasses import replace

import pytest

from licd.clock import ManualClock
from licd.engine import Engine, LeasePhase, Licence, SeatLease
from licd.engine.endings import MAX_REASON, Endings, revoked
from licd.engine.engine import RENEW_BURST, renew_rate
from licd_client.errors import (
    BadRequest,
    Denied,
    LeaseUnknown,
    LicenceExpired,
    LicenceNotYetValid,
    RateLimited,
    SeatsExhausted,
    UnknownLicence,
)
from licd_client.safetext import one_line
from tests.support import DICOM, holder, new_engine


def live(engine: Engine, clock: ManualClock, host: str, *, seats: int = 1) -> SeatLease:
    grant = engine.checkout(
        DICOM.key, holder(host), request=f"req-{host}", at=clock.now(), seats=seats
    )
    engine.confirm(grant.lease)
    return grant.lease


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def engine() -> Engine:
    return new_engine([DICOM])


def test_seed_000_three_seats_then_exhausted(engine: Engine, clock: ManualClock) -> None:
    a = live(engine, clock, "machine-a")
    live(engine, clock, "machine-b")
    live(engine, clock, "machine-c")
    with pytest.raises(SeatsExhausted) as err:
        live(engine, clock, "machine-d")
    assert err.value.message == "maximum allowed concurrent licences reached"
    assert err.value.detail == {"in_use": 3, "total": 3, "rule": "seats"}
    released = engine.begin_release(a.secret)
    assert released is a
    # Until the release is committed the seat stays counted.
    with pytest.raises(SeatsExhausted):
        live(engine, clock, "machine-d")
    engine.released(a)
    assert live(engine, clock, "machine-d").holder.host == "machine-d"
    assert engine.in_use(DICOM.id) == 3


def test_multi_seat_checkout_counts_every_seat(engine: Engine, clock: ManualClock) -> None:
    live(engine, clock, "server", seats=2)
    assert engine.available(DICOM.key, clock.now()).available == 1
    with pytest.raises(SeatsExhausted):
        live(engine, clock, "other", seats=2)
    live(engine, clock, "small", seats=1)
    assert engine.available(DICOM.key, clock.now()).in_use == 3


def test_checkout_is_idempotent_on_request(engine: Engine, clock: ManualClock) -> None:
    first = engine.checkout(DICOM.key, holder("a"), request="r1", at=clock.now())
    engine.confirm(first.lease)
    clock.advance(10)
    again = engine.checkout(DICOM.key, holder("a"), request="r1", at=clock.now())
    assert again.lease is first.lease
    assert not again.fresh
    assert again.lease.expires == clock.now().wall + DICOM.lease_ttl
    assert engine.in_use(DICOM.id) == 1
    # Another holder's identical request key is another checkout.
    other = engine.checkout(DICOM.key, holder("b"), request="r1", at=clock.now())
    assert other.lease is not first.lease
    assert engine.in_use(DICOM.id) == 2


def test_aborted_checkout_frees_its_seats(engine: Engine, clock: ManualClock) -> None:
    grant = engine.checkout(DICOM.key, holder("a"), request="r", at=clock.now(), seats=3)
    assert grant.lease.state is LeasePhase.PENDING
    assert engine.in_use(DICOM.id) == 3
    engine.abort(grant.lease)
    assert engine.in_use(DICOM.id) == 0
    with pytest.raises(LeaseUnknown):
        engine.heartbeat(grant.lease.secret, clock.now())


def test_pending_lease_cannot_be_renewed_or_released(engine: Engine, clock: ManualClock) -> None:
    grant = engine.checkout(DICOM.key, holder("a"), request="r", at=clock.now())
    with pytest.raises(LeaseUnknown):
        engine.heartbeat(grant.lease.secret, clock.now())
    assert engine.begin_release(grant.lease.secret) is None


def test_unknown_licence_and_lease(engine: Engine, clock: ManualClock) -> None:
    with pytest.raises(UnknownLicence):
        engine.checkout("NOPE", holder(), request="r", at=clock.now())
    with pytest.raises(UnknownLicence):
        engine.available("NOPE", clock.now())
    with pytest.raises(LeaseUnknown):
        engine.heartbeat("no-such-secret", clock.now())
    assert engine.begin_release("no-such-secret") is None


def test_validity_window(clock: ManualClock) -> None:
    now = clock.now().wall
    early = replace(DICOM, key="EARLY", id="early", not_before=now + 100)
    late = replace(DICOM, key="LATE", id="late", expires=now)
    engine = new_engine([early, late])
    with pytest.raises(LicenceNotYetValid):
        engine.checkout("EARLY", holder(), request="r", at=clock.now())
    with pytest.raises(LicenceExpired):
        engine.checkout("LATE", holder(), request="r", at=clock.now())
    clock.advance(100)
    assert engine.checkout("EARLY", holder(), request="r", at=clock.now()).fresh


def test_expiry_never_passes_the_licence(clock: ManualClock) -> None:
    licence = replace(DICOM, expires=clock.now().wall + 50)
    engine = new_engine([licence])
    grant = engine.checkout(licence.key, holder(), request="r", at=clock.now())
    engine.confirm(grant.lease)
    assert grant.lease.expires == licence.expires
    assert grant.ttl == 50
    assert grant.renew_in == pytest.approx(50 / 3)
    clock.advance(40)
    renewed = engine.heartbeat(grant.lease.secret, clock.now())
    assert renewed.lease.expires == licence.expires
    assert renewed.ttl == 10
    clock.advance(10)
    with pytest.raises(LicenceExpired):
        engine.heartbeat(grant.lease.secret, clock.now())


def test_ttl_shorter_than_licence_but_never_longer(engine: Engine, clock: ManualClock) -> None:
    short = engine.checkout(DICOM.key, holder("a"), request="r1", at=clock.now(), ttl=10)
    assert short.ttl == 10
    long = engine.checkout(DICOM.key, holder("b"), request="r2", at=clock.now(), ttl=1e6)
    assert long.ttl == DICOM.lease_ttl


def test_reclaim_only_after_expiry_plus_grace(engine: Engine, clock: ManualClock) -> None:
    lease = live(engine, clock, "crashed")
    clock.advance(DICOM.lease_ttl + DICOM.grace - 0.001)
    assert engine.due(clock.now()) == []
    clock.advance(0.002)
    assert engine.due(clock.now()) == [lease]
    assert lease.state is LeasePhase.RELEASING
    assert engine.in_use(DICOM.id) == 1  # until the deletion commits
    engine.released(lease)
    assert engine.in_use(DICOM.id) == 0


def test_heartbeat_postpones_reclaim(engine: Engine, clock: ManualClock) -> None:
    lease = live(engine, clock, "a")
    for _ in range(5):
        clock.advance(DICOM.lease_ttl - 1)
        engine.heartbeat(lease.secret, clock.now())
        assert engine.due(clock.now()) == []
    # A heartbeat inside the grace period still renews: the seat was not reused.
    clock.advance(DICOM.lease_ttl + DICOM.grace / 2)
    engine.heartbeat(lease.secret, clock.now())
    clock.advance(DICOM.lease_ttl + DICOM.grace + 1)
    assert engine.due(clock.now()) == [lease]


def test_wall_clock_jump_frees_nothing(engine: Engine, clock: ManualClock) -> None:
    live(engine, clock, "a")
    clock.set_wall(clock.wall + 10 * 86400)
    assert engine.due(clock.now()) == []


def test_failed_reclaim_is_retried(engine: Engine, clock: ManualClock) -> None:
    lease = live(engine, clock, "a")
    clock.advance(DICOM.lease_ttl + DICOM.grace + 1)
    assert engine.due(clock.now()) == [lease]
    engine.cancel_release(lease)
    assert lease.state is LeasePhase.LIVE
    assert engine.due(clock.now()) == [lease]


def test_restore_extends_every_deadline(engine: Engine, clock: ManualClock) -> None:
    lease = live(engine, clock, "a")
    kept = SeatLease(
        secret=lease.secret,
        handle=lease.handle,
        licence_id=lease.licence_id,
        holder=lease.holder,
        request=lease.request,
        seats=lease.seats,
        ttl=lease.ttl,
        created=lease.created,
        expires=lease.expires,
        last_heartbeat=lease.last_heartbeat,
    )
    orphan = replace(kept, secret="x", handle="y", licence_id="gone")
    # The daemon was down for longer than the lease: it still gets ttl + grace.
    clock.advance(10 * DICOM.lease_ttl)
    fresh = new_engine([DICOM])
    assert fresh.restore([kept, orphan], clock.now()) == [orphan]
    assert fresh.in_use(DICOM.id) == 1
    clock.advance(DICOM.lease_ttl + DICOM.grace - 1)
    assert fresh.due(clock.now()) == []
    assert fresh.heartbeat(kept.secret, clock.now()).lease is kept
    clock.advance(DICOM.lease_ttl + DICOM.grace + 1)
    assert fresh.due(clock.now()) == [kept]


def test_restore_after_the_clock_was_set_back_keeps_no_seat_past_ttl_and_grace(
    clock: ManualClock,
) -> None:
    # The daemon stopped; its wall clock was then set back a day. The stored expiry now
    # looks a day away, but a holder that died with the daemon must not keep its seat.
    licence = replace(DICOM, lease_ttl=10)
    engine = new_engine([licence])
    stored = SeatLease(
        secret="s",
        handle="h",
        licence_id=licence.id,
        holder=holder(),
        request="r",
        seats=1,
        ttl=10,
        created=clock.wall,
        expires=clock.wall + 86_400 + 10,
        last_heartbeat=clock.wall + 86_400,
    )
    engine.restore([stored], clock.now())
    clock.advance(10 + licence.grace - 1)
    assert engine.due(clock.now()) == []
    clock.advance(2)
    assert engine.due(clock.now()) == [stored]


def test_handles_and_secrets_are_unique_and_unrelated(clock: ManualClock) -> None:
    # A random source that repeats itself: the engine draws again until a value is new.
    draws = iter([bytes(12), bytes(24), bytes(12), bytes(12), b"\1" * 12, bytes(24), b"\xff" * 24])
    asked: list[int] = []

    def random_bytes(n: int) -> bytes:
        asked.append(n)
        return next(draws)

    engine = Engine([replace(DICOM, seats=10)], random_bytes=random_bytes)
    a = engine.checkout(DICOM.key, holder("a"), request="1", at=clock.now()).lease
    b = engine.checkout(DICOM.key, holder("b"), request="2", at=clock.now()).lease
    assert (a.handle, b.handle) == ("a" * 12, "b" * 12)  # 5 random bits a character
    assert (a.secret, b.secret) == ("A" * 32, "_" * 32)  # URL-safe base64 of 24 bytes
    assert asked == [12, 24, 12, 12, 12, 24, 24]  # b's handle and secret drawn again
    real = new_engine([replace(DICOM, seats=100)])
    leases = [
        real.checkout(DICOM.key, holder(str(i)), request=str(i), at=clock.now()).lease
        for i in range(100)
    ]
    assert len({x.handle for x in leases}) == 100
    assert all(x.handle not in x.secret and len(x.secret) >= 22 for x in leases)


def test_licence_repr_hides_the_key() -> None:
    assert DICOM.key not in repr(DICOM)
    assert isinstance(DICOM, Licence)


def test_max_ttl_bounds_what_a_client_may_ask(clock: ManualClock) -> None:
    licence = replace(DICOM, max_ttl=2 * 86400.0)
    engine = new_engine([licence])
    default = engine.checkout(licence.key, holder("a"), request="1", at=clock.now())
    assert default.ttl == licence.lease_ttl  # no ttl asked: the default
    long = engine.checkout(licence.key, holder("b"), request="2", at=clock.now(), ttl=86400)
    assert long.ttl == 86400  # offline use for a day: allowed
    capped = engine.checkout(licence.key, holder("c"), request="3", at=clock.now(), ttl=1e7)
    assert capped.ttl == 2 * 86400.0


def test_only_a_delegable_licence_gives_blocks(clock: ManualClock) -> None:
    router_key = b"r" * 32
    engine = new_engine([DICOM, replace(DICOM, key="D2", id="d2", delegable=True)])
    with pytest.raises(Denied, match="delegated"):
        engine.checkout(DICOM.key, holder(), request="b", at=clock.now(), delegate=router_key)
    grant = engine.checkout("D2", holder(), request="b", at=clock.now(), delegate=router_key)
    assert grant.lease.delegate == router_key


def test_licence_edits_apply_to_the_next_renewal(engine: Engine, clock: ManualClock) -> None:
    lease = live(engine, clock, "a")
    live(engine, clock, "b")
    old = engine.put_licence(replace(DICOM, seats=1, features={"tier": "gold"}))
    assert old == DICOM
    grant = engine.heartbeat(lease.secret, clock.now())
    assert grant.licence.features == {"tier": "gold"}
    assert engine.in_use(DICOM.id) == 2  # lowering seats revokes nobody
    with pytest.raises(SeatsExhausted):
        live(engine, clock, "c")
    with pytest.raises(BadRequest, match="already has this key"):
        engine.put_licence(replace(DICOM, id="other"))


def test_revoke_by_handle_then_remove_the_licence(engine: Engine, clock: ManualClock) -> None:
    lease = live(engine, clock, "a")
    with pytest.raises(BadRequest, match="still has leases"):
        engine.remove_licence(DICOM.id)
    assert engine.begin_revoke(lease.handle) is lease
    engine.released(lease)
    assert engine.remove_licence(DICOM.id) == DICOM
    with pytest.raises(UnknownLicence):
        engine.checkout(DICOM.key, holder(), request="x", at=clock.now())


def refusal(engine: Engine, clock: ManualClock, lease: SeatLease) -> LeaseUnknown:
    """What a heartbeat of `lease` is answered now; a consume is answered the same."""
    with pytest.raises(LeaseUnknown) as heartbeat:
        engine.heartbeat(lease.secret, clock.now())
    with pytest.raises(LeaseUnknown) as consume:
        engine.consume(lease.secret, "scans", 1, None, clock.now())
    assert (consume.value.message, consume.value.detail) == (
        heartbeat.value.message,
        heartbeat.value.detail,
    )
    return heartbeat.value


def test_a_revoked_lease_tells_its_holder_why_until_its_deadline(
    engine: Engine, clock: ManualClock
) -> None:
    lease = live(engine, clock, "a")
    clock.advance(30)
    engine.heartbeat(lease.secret, clock.now())  # the deadline is now + ttl + grace
    assert engine.begin_revoke(lease.handle, "seat needed") is lease
    said = refusal(engine, clock, lease)  # while the revoke commits, too
    assert said.message == "revoked by the administrator: seat needed"
    assert said.detail == {"revoked": True, "reason": "seat needed"}
    engine.released(lease)
    assert engine.in_use(DICOM.id) == 0
    clock.advance(DICOM.lease_ttl + DICOM.grace - 1)
    assert engine.due(clock.now()) == []
    assert refusal(engine, clock, lease).message == said.message
    clock.advance(1)
    engine.due(clock.now())  # the reaper's round forgets it: its holder has given up
    said = refusal(engine, clock, lease)
    assert (said.message, said.detail) == (LeaseUnknown.default_message, None)
    assert len(engine.endings) == 0


def test_a_revoke_without_a_reason_or_with_a_long_odd_one(
    engine: Engine, clock: ManualClock
) -> None:
    plain, odd = live(engine, clock, "a"), live(engine, clock, "b")
    reason = "line one\nline two \x1b[31m" + "x" * 300
    for lease, why in ((plain, ""), (odd, reason)):
        engine.begin_revoke(lease.handle, why)
        engine.released(lease)
    said = refusal(engine, clock, plain)
    assert said.message == "revoked by the administrator"
    assert said.detail == {"revoked": True, "reason": ""}
    said = refusal(engine, clock, odd)
    assert said.detail is not None
    cut = said.detail["reason"]  # data, as given, but bounded
    assert len(cut) == MAX_REASON and cut == reason[: MAX_REASON - 1] + "…"
    # The message is one line: what a terminal would act on is shown escaped.
    assert said.message == "revoked by the administrator: " + one_line(cut)
    assert "\n" not in said.message and "\x1b" not in said.message


def test_a_revoke_that_failed_to_commit_leaves_the_lease_as_it_was(
    engine: Engine, clock: ManualClock
) -> None:
    lease = live(engine, clock, "a")
    engine.begin_revoke(lease.handle, "seat needed")
    engine.cancel_release(lease)
    engine.heartbeat(lease.secret, clock.now())  # live again
    engine.begin_release(lease.secret)  # its holder then checks it in
    engine.released(lease)
    assert refusal(engine, clock, lease).detail is None  # not revoked after all
    assert len(engine.endings) == 0


def test_a_reclaimed_lease_says_so_for_one_more_lease_length(
    engine: Engine, clock: ManualClock
) -> None:
    lease = live(engine, clock, "a")
    clock.advance(DICOM.lease_ttl + DICOM.grace)
    assert engine.due(clock.now()) == [lease]
    engine.released(lease)
    said = refusal(engine, clock, lease)
    assert said.message.startswith("the lease was reclaimed: it was not renewed")
    assert said.detail == {"reclaimed": True}
    clock.advance(DICOM.lease_ttl)
    engine.due(clock.now())
    assert refusal(engine, clock, lease).detail is None


def test_endings_kept_are_bounded_and_the_soonest_to_go_go_first() -> None:
    endings = Endings(cap=2)
    first, second, third = revoked("1"), revoked("2"), revoked("3")
    endings.remember("s1", first, until=30.0)
    endings.remember("s2", second, until=10.0)
    endings.remember("s3", third, until=20.0)
    assert len(endings) == 2
    assert endings.find("s2", 0.0) is None  # the one due to go soonest made room
    assert (endings.find("s1", 0.0), endings.find("s3", 0.0)) == (first, third)
    assert endings.find("s3", 20.0) is None  # not after its time, even before a sweep
    endings.forget_until(20.0)
    assert len(endings) == 1 and endings.find("s1", 29.9) == first


# ------------------------------------------------ attacks: retries, floods, piles of leases


def test_a_retry_while_the_first_attempt_commits_joins_it(
    engine: Engine, clock: ManualClock
) -> None:
    first = engine.checkout(DICOM.key, holder("a"), request="r1", at=clock.now())
    assert first.lease.state is LeasePhase.PENDING  # not yet committed
    retry = engine.checkout(DICOM.key, holder("a"), request="r1", at=clock.now())
    assert retry.lease is first.lease and not retry.fresh
    assert engine.in_use(DICOM.id) == 1


def test_a_retry_must_repeat_seats_and_ttl(engine: Engine, clock: ManualClock) -> None:
    first = engine.checkout(DICOM.key, holder("a"), request="r1", at=clock.now(), ttl=30)
    seats_ttl: list[tuple[int, float | None]] = [(2, 30), (1, 40), (1, None)]
    for seats, ttl in seats_ttl:
        with pytest.raises(BadRequest, match="other seats or ttl"):
            engine.checkout(
                DICOM.key, holder("a"), request="r1", at=clock.now(), seats=seats, ttl=ttl
            )
    engine.confirm(first.lease)
    same = engine.checkout(DICOM.key, holder("a"), request="r1", at=clock.now(), ttl=30)
    assert same.lease is first.lease
    assert engine.in_use(DICOM.id) == 1


def test_a_restored_lease_is_retried_with_its_own_seats(clock: ManualClock) -> None:
    engine = new_engine([DICOM])
    lease = live(engine, clock, "a", seats=2)
    restored = new_engine([DICOM])
    lease.asked = None  # what a restart keeps: the lease, not the request
    restored.restore([lease], clock.now())
    again = restored.checkout(
        DICOM.key, holder("a"), request=lease.request, at=clock.now(), seats=2
    )
    assert again.lease is lease
    with pytest.raises(BadRequest):
        restored.checkout(DICOM.key, holder("a"), request=lease.request, at=clock.now())


def test_a_retry_goes_back_only_to_the_same_holder_and_address(
    engine: Engine, clock: ManualClock
) -> None:
    first = engine.checkout(DICOM.key, holder("a"), request="r1", at=clock.now(), ip="10.0.0.1")
    engine.confirm(first.lease)
    victim = holder("a")
    for thief, ip in (
        (replace(victim, host="evil"), "10.0.0.1"),  # same hostid, another machine
        (replace(victim, user="mallory"), "10.0.0.1"),
        (replace(victim, pid=victim.pid + 1), "10.0.0.1"),
        (victim, "10.6.6.6"),  # every field copied, from elsewhere
    ):
        with pytest.raises(Denied, match="another holder"):
            engine.checkout(DICOM.key, thief, request="r1", at=clock.now(), ip=ip)
    again = engine.checkout(DICOM.key, victim, request="r1", at=clock.now(), ip="10.0.0.1")
    assert again.lease is first.lease
    assert engine.in_use(DICOM.id) == 1


def test_a_device_lease_goes_back_only_to_its_machine_and_user(clock: ManualClock) -> None:
    licence = replace(DICOM, device_period=86_400.0)
    engine = new_engine([licence])
    mine = holder("scanner")
    first = engine.checkout(licence.key, mine, request="boot-1", at=clock.now())
    engine.confirm(first.lease)
    # The app restarts: a new process, a new request key; the same device gets its lease.
    restarted = replace(mine, pid=mine.pid + 1)
    again = engine.checkout(licence.key, restarted, request="boot-2", at=clock.now())
    assert again.lease is first.lease
    with pytest.raises(Denied, match="another host or user"):
        engine.checkout(licence.key, replace(mine, host="evil"), request="x", at=clock.now())
    assert engine.in_use(licence.id) == 1


def test_one_unit_holds_at_most_leases_per_unit_leases(clock: ManualClock) -> None:
    licence = replace(DICOM, seats=1, count_by="host", leases_per_unit=3)
    engine = new_engine([licence])
    leases = []
    for i in range(3):
        grant = engine.checkout(licence.key, holder("a"), request=f"r{i}", at=clock.now())
        engine.confirm(grant.lease)
        leases.append(grant.lease)
    assert engine.in_use(licence.id) == 1
    with pytest.raises(Denied, match="at most 3 leases share one seat"):
        engine.checkout(licence.key, holder("a"), request="r3", at=clock.now())
    # A retry of one it holds is no new lease: still answered.
    assert (
        engine.checkout(licence.key, holder("a"), request="r0", at=clock.now()).lease is leases[0]
    )
    released = engine.begin_release(leases[0].secret)
    assert released is not None
    engine.released(released)
    engine.confirm(engine.checkout(licence.key, holder("a"), request="r3", at=clock.now()).lease)
    assert engine.in_use(licence.id) == 1


def test_heartbeats_on_one_lease_keep_one_reclaim_entry(engine: Engine, clock: ManualClock) -> None:
    lease = live(engine, clock, "a")
    for _ in range(20_000):
        clock.advance(1.0)
        engine.heartbeat(lease.secret, clock.now())
    assert engine.scheduled == 1
    clock.advance(DICOM.lease_ttl + DICOM.grace + 1)
    assert engine.due(clock.now()) == [lease]


def test_churn_keeps_the_reclaim_heap_in_proportion_to_the_leases(
    engine: Engine, clock: ManualClock
) -> None:
    keep = live(engine, clock, "keeper")
    for i in range(5_000):
        grant = engine.checkout(DICOM.key, holder("a"), request=f"c{i}", at=clock.now())
        engine.confirm(grant.lease)
        released = engine.begin_release(grant.lease.secret)
        assert released is not None
        engine.released(released)
    assert engine.scheduled <= 2 * 1 + 64 + 1
    clock.advance(DICOM.lease_ttl + DICOM.grace + 1)
    assert engine.due(clock.now()) == [keep]


def test_a_heartbeat_loop_is_rate_limited(engine: Engine, clock: ManualClock) -> None:
    lease = live(engine, clock, "a")
    for _ in range(RENEW_BURST):
        engine.heartbeat(lease.secret, clock.now())
    with pytest.raises(RateLimited) as err:
        engine.heartbeat(lease.secret, clock.now())
    assert err.value.retry_after == pytest.approx(1 / renew_rate(DICOM.lease_ttl))
    expires = lease.expires
    clock.advance(err.value.retry_after or 0)
    assert engine.heartbeat(lease.secret, clock.now()).lease.expires > expires
    # A holder that renews as told (every renew_in) is never refused, even a short lease.
    short = replace(DICOM, key="S", id="short", lease_ttl=1.0, seats=1)
    other = new_engine([short])
    grant = other.checkout("S", holder("b"), request="s", at=clock.now())
    other.confirm(grant.lease)
    for _ in range(1_000):
        clock.advance(grant.renew_in)
        grant = other.heartbeat(grant.lease.secret, clock.now())


def test_a_new_or_restored_lease_starts_with_its_whole_burst() -> None:
    clock = ManualClock(mono=0.0)  # a machine just booted: monotonic time near zero
    engine = new_engine([DICOM])
    lease = live(engine, clock, "a")
    for _ in range(RENEW_BURST):
        engine.heartbeat(lease.secret, clock.now())
    restored = new_engine([DICOM])
    restored.restore([lease], clock.now())
    for _ in range(RENEW_BURST):
        restored.heartbeat(lease.secret, clock.now())


def test_the_steady_renewal_rate_is_the_engines_to_set(clock: ManualClock) -> None:
    engine = new_engine([DICOM], renew_min_rate=100.0)
    lease = live(engine, clock, "a")
    for _ in range(RENEW_BURST + 100):
        clock.advance(0.01)
        engine.heartbeat(lease.secret, clock.now())
    with pytest.raises(RateLimited):
        for _ in range(RENEW_BURST + 1):
            engine.heartbeat(lease.secret, clock.now())
