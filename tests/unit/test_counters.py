"""The counter book on its own: consuming within and over the limit, de-duplication,
UTC periods (days, months, a leap day), restoring stored state and undoing a consume.

Every time is an explicit `Instant`: the wall clock decides the period, the monotonic
clock the de-duplication window, and each is moved on its own where that matters.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from licd.clock import Instant
from licd.engine.counters import Consumed, CounterBook, CounterState
from licd.engine.licence import Counter
from licd_client.errors import QuotaExhausted

SCANS = Counter("scans", limit=5, dedup_window=3.0)


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    """Seconds since the epoch of a UTC date and time."""
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()


def at(wall: float, mono: float = 1000.0) -> Instant:
    return Instant(wall, mono)


T0 = at(utc(2026, 9, 15, 12, 0, 0))


def consume(
    book: CounterBook,
    units: int = 1,
    dedup: str | None = None,
    when: Instant = T0,
    counter: Counter = SCANS,
    licence: str = "lic",
) -> Consumed:
    return book.consume(licence, counter, units, dedup, when)


# ------------------------------------------------------------------------- the limit


def test_consumes_up_to_the_limit_exactly() -> None:
    book = CounterBook()
    first = consume(book, 2)
    assert (first.counter, first.used, first.limit, first.remaining) == ("scans", 2, 5, 3)
    assert first.counted and first.dedup_key is None
    assert first.state == CounterState("lic", "scans", 2, 0.0)
    last = consume(book, 3)  # used + units == limit: allowed
    assert (last.used, last.remaining) == (5, 0)
    assert book.state("lic", SCANS, T0).used == 5


def test_a_consume_over_the_limit_consumes_nothing_and_says_why() -> None:
    book = CounterBook()
    consume(book, 4)
    with pytest.raises(QuotaExhausted) as refused:
        consume(book, 2)
    assert refused.value.message == "counter 'scans' is used up for this period"
    assert refused.value.detail == {"used": 4, "limit": 5, "asked": 2}
    assert book.state("lic", SCANS, T0).used == 4  # nothing consumed
    assert consume(book, 1).used == 5  # what is left can still be used


def test_a_limit_lowered_below_what_is_used_leaves_nothing_remaining() -> None:
    """A licence edit may lower a counter's limit mid-period: what was used stays used."""
    book = CounterBook()
    consume(book, 4, dedup="d")
    lowered = Counter("scans", limit=2)
    with pytest.raises(QuotaExhausted):
        consume(book, 1, counter=lowered)
    repeat = consume(book, 1, dedup="d", counter=lowered)  # a repeat: no limit to pass
    assert (repeat.counted, repeat.used, repeat.limit, repeat.remaining) == (False, 4, 2, 0)


def test_counters_are_kept_per_licence_and_per_name() -> None:
    book = CounterBook()
    pages = Counter("pages", limit=5)
    consume(book, 5)
    assert consume(book, 2, counter=pages).used == 2
    assert consume(book, 3, licence="other").used == 3
    assert book.state("lic", SCANS, T0).used == 5


# ------------------------------------------------------------------------ de-duplication


def test_a_dedup_id_seen_again_within_the_window_counts_once() -> None:
    book = CounterBook()
    first = consume(book, 2, dedup="barcode-1")
    assert first.counted and first.dedup_key == ("lic", "scans", "barcode-1")
    again = consume(book, 2, dedup="barcode-1", when=at(T0.wall, T0.mono + 2.999))
    assert (again.counted, again.used, again.dedup_key) == (False, 2, None)
    assert again.state is first.state  # unchanged: what to persist is the same
    edge = consume(book, 2, dedup="barcode-1", when=at(T0.wall, T0.mono + 3.0))
    assert (edge.counted, edge.used) == (True, 4)  # the window is over: a new use


def test_the_window_runs_from_the_last_counted_use() -> None:
    book = CounterBook()
    consume(book, dedup="x")
    consume(book, dedup="x", when=at(T0.wall, T0.mono + 3.0))  # counted, window renewed
    assert not consume(book, dedup="x", when=at(T0.wall, T0.mono + 5.9)).counted
    assert consume(book, dedup="x", when=at(T0.wall, T0.mono + 6.0)).counted


def test_the_window_is_on_the_monotonic_clock_not_the_wall() -> None:
    book = CounterBook()
    consume(book, dedup="x")
    wall_jump = at(T0.wall + 3600, T0.mono + 1)  # the wall clock set an hour on
    assert not consume(book, dedup="x", when=wall_jump).counted


def test_dedup_ids_are_per_licence_and_counter_and_none_never_dedups() -> None:
    book = CounterBook()
    pages = Counter("pages", limit=5)
    consume(book, dedup="x")
    assert consume(book, dedup="x", counter=pages).counted
    assert consume(book, dedup="x", licence="other").counted
    assert consume(book, dedup="y").counted
    assert consume(book).counted and consume(book).counted  # no id: each use counts
    assert book.state("lic", SCANS, T0).used == 4


def test_each_counter_keeps_its_own_window() -> None:
    book = CounterBook()
    short = Counter("short", limit=9, dedup_window=1.0)
    long = Counter("long", limit=9, dedup_window=10.0)
    consume(book, dedup="x", counter=long)  # remembered first, and longest
    consume(book, dedup="x", counter=short)
    # The short window's edge, while its id is still kept behind the long one's:
    edge = at(T0.wall, T0.mono + 1.0)
    assert consume(book, dedup="x", counter=short, when=edge).counted
    assert not consume(book, dedup="x", counter=long, when=edge).counted
    # ... and that use starts a new window all the same.
    assert not consume(book, dedup="x", counter=short, when=edge.after(0.999)).counted
    assert consume(book, dedup="x", counter=short, when=edge.after(1.0)).counted


def test_a_refused_consume_does_not_remember_its_dedup_id() -> None:
    daily = Counter("pages", limit=1, reset="daily", dedup_window=60.0)
    book = CounterBook()
    evening = at(utc(2026, 9, 15, 23, 59, 50))
    consume(book, counter=daily, when=evening)
    with pytest.raises(QuotaExhausted):
        consume(book, dedup="job-7", counter=daily, when=evening)
    # Ten seconds on (within the window): a new day, and the refused id counts now.
    morning = evening.after(10)
    assert consume(book, dedup="job-7", counter=daily, when=morning).counted


def test_an_id_counted_just_before_a_new_period_is_still_a_repeat_just_after() -> None:
    """The window is about the client's retries, not the period: a retry of a use
    counted at 23:59:59 is not counted again at 00:00:01, in the new day."""
    daily = Counter("pages", limit=3, reset="daily")
    book = CounterBook()
    before = at(utc(2026, 9, 15, 23, 59, 59))
    consume(book, dedup="job-7", counter=daily, when=before)
    retry = consume(book, dedup="job-7", counter=daily, when=before.after(2))
    assert (retry.counted, retry.used) == (False, 0)
    assert retry.state.period_start == utc(2026, 9, 16)


def test_ids_are_forgotten_once_their_window_is_over() -> None:
    """Memory stays bounded: each consume drops the ids whose window has passed."""
    book = CounterBook()
    roomy = Counter("scans", limit=100, dedup_window=3.0)
    for n in range(4):
        consume(book, dedup=f"id-{n}", counter=roomy, when=at(T0.wall, T0.mono + n / 2))
    assert len(book._seen) == 4
    # Ids 0 and 1 expire at 3.0 and 3.5: gone. Ids 2 and 3 expire later: kept.
    consume(book, counter=roomy, when=at(T0.wall, T0.mono + 3.5))
    assert list(book._seen) == [("lic", "scans", "id-2"), ("lic", "scans", "id-3")]
    consume(book, counter=roomy, when=at(T0.wall, T0.mono + 100))
    assert not book._seen


# --------------------------------------------------------------------------- periods


def test_never_resets() -> None:
    book = CounterBook()
    consume(book, 5)
    years_later = at(utc(2031, 1, 1), mono=1e9)
    assert book.state("lic", SCANS, years_later) == CounterState("lic", "scans", 5, 0.0)
    with pytest.raises(QuotaExhausted):
        consume(book, when=years_later)


@pytest.mark.parametrize(
    ("reset", "last", "first", "new_start"),
    [
        # daily, at UTC midnight, a month's end and a year's end among them
        ("daily", (2026, 9, 15, 23, 59, 59), (2026, 9, 16), (2026, 9, 16)),
        ("daily", (2026, 1, 31, 23, 59, 59), (2026, 2, 1), (2026, 2, 1)),
        ("daily", (2026, 12, 31, 23, 59, 59), (2027, 1, 1), (2027, 1, 1)),
        # a leap day is a day of its own: in, and out of it
        ("daily", (2028, 2, 28, 23, 59, 59), (2028, 2, 29), (2028, 2, 29)),
        ("daily", (2028, 2, 29, 23, 59, 59), (2028, 3, 1), (2028, 3, 1)),
        # monthly, on the first at UTC midnight, whatever the month's length
        ("monthly", (2026, 1, 31, 23, 59, 59), (2026, 2, 1), (2026, 2, 1)),
        ("monthly", (2026, 2, 28, 23, 59, 59), (2026, 3, 1), (2026, 3, 1)),
        ("monthly", (2026, 4, 30, 23, 59, 59), (2026, 5, 1), (2026, 5, 1)),
        ("monthly", (2028, 2, 29, 23, 59, 59), (2028, 3, 1), (2028, 3, 1)),
        ("monthly", (2026, 12, 31, 23, 59, 59), (2027, 1, 1), (2027, 1, 1)),
    ],
)
def test_a_new_period_starts_from_zero_at_its_utc_boundary(
    reset: str,
    last: tuple[int, ...],
    first: tuple[int, ...],
    new_start: tuple[int, ...],
) -> None:
    counter = Counter("c", limit=2, reset=reset)
    book = CounterBook()
    end = at(utc(*last))
    consume(book, 2, counter=counter, when=end)
    with pytest.raises(QuotaExhausted):
        consume(book, counter=counter, when=end)
    begun = at(utc(*first), mono=end.mono + 1)
    fresh = consume(book, counter=counter, when=begun)
    assert (fresh.used, fresh.state.period_start) == (1, utc(*new_start))


@pytest.mark.parametrize(
    ("reset", "first", "last"),
    [
        ("daily", (2028, 2, 29, 0, 0, 0), (2028, 2, 29, 23, 59, 59)),
        ("monthly", (2028, 2, 1, 0, 0, 0), (2028, 2, 29, 23, 59, 59)),  # through a leap day
        ("monthly", (2026, 1, 1, 0, 0, 0), (2026, 1, 31, 23, 59, 59)),
    ],
)
def test_a_period_lasts_from_its_first_second_to_its_last(
    reset: str, first: tuple[int, ...], last: tuple[int, ...]
) -> None:
    counter = Counter("c", limit=2, reset=reset)
    book = CounterBook()
    consume(book, 2, counter=counter, when=at(utc(*first)))
    with pytest.raises(QuotaExhausted):
        consume(book, counter=counter, when=at(utc(*last)))


@pytest.mark.parametrize(
    ("reset", "now", "start"),
    [
        ("never", (2028, 2, 29, 12), None),
        ("daily", (2028, 2, 29, 0, 0, 0), (2028, 2, 29)),  # the boundary is its own start
        ("daily", (2028, 2, 29, 23, 59, 59), (2028, 2, 29)),
        ("monthly", (2028, 2, 29, 23, 59, 59), (2028, 2, 1)),
        ("monthly", (2026, 3, 1, 0, 0, 0), (2026, 3, 1)),
    ],
)
def test_the_state_names_the_start_of_its_period(
    reset: str, now: tuple[int, ...], start: tuple[int, ...] | None
) -> None:
    counter = Counter("c", limit=1, reset=reset)
    state = CounterBook().state("lic", counter, at(utc(*now)))
    assert state == CounterState("lic", "c", 0, 0.0 if start is None else utc(*start))


def test_the_period_is_utc_whatever_the_fraction_of_a_second() -> None:
    daily = Counter("c", limit=1, reset="daily")
    assert daily.period_start(utc(2026, 9, 16) - 0.001) == utc(2026, 9, 15)
    assert daily.period_start(utc(2026, 9, 16) + 0.001) == utc(2026, 9, 16)
    assert daily.period_start(1_790_035_200.0) == 1_790_035_200.0  # 2026-09-22T00:00Z


# ------------------------------------------------------------------ restore and state


def test_restored_state_of_the_current_period_carries_on() -> None:
    daily = Counter("pages", limit=5, reset="daily")
    book = CounterBook()
    book.restore([CounterState("lic", "pages", 4, utc(2026, 9, 15))])
    assert consume(book, counter=daily).used == 5
    with pytest.raises(QuotaExhausted):
        consume(book, counter=daily)


def test_restored_state_of_a_past_period_starts_from_zero() -> None:
    daily = Counter("pages", limit=5, reset="daily")
    book = CounterBook()
    book.restore([CounterState("lic", "pages", 5, utc(2026, 9, 14))])
    state = book.state("lic", daily, T0)
    assert state == CounterState("lic", "pages", 0, utc(2026, 9, 15))


def test_a_wall_clock_stepped_back_across_a_boundary_does_not_reset_the_count() -> None:
    """Just after midnight the day's units are used up; the clock is then set back to
    the day before (NTP, an admin): that must not hand the units out a second time."""
    daily = Counter("pages", limit=2, reset="daily")
    book = CounterBook()
    after_midnight = at(utc(2026, 9, 16, 0, 0, 5))
    consume(book, 2, counter=daily, when=after_midnight)
    stepped_back = at(utc(2026, 9, 15, 23, 59, 50), mono=1001.0)
    with pytest.raises(QuotaExhausted):
        consume(book, counter=daily, when=stepped_back)
    assert book.state("lic", daily, stepped_back) == CounterState(
        "lic", "pages", 2, utc(2026, 9, 16)
    )
    # the clock comes forward again, into the same day: still used up
    with pytest.raises(QuotaExhausted):
        consume(book, counter=daily, when=at(utc(2026, 9, 16, 0, 1), mono=1002.0))
    # the next day starts from zero
    assert consume(book, counter=daily, when=at(utc(2026, 9, 17, 0, 1), mono=1003.0)).used == 1


def test_a_reset_edited_to_a_longer_period_keeps_what_was_used() -> None:
    """daily -> monthly mid-month: today's units count toward the month."""
    book = CounterBook()
    book.restore([CounterState("lic", "pages", 4, utc(2026, 9, 15))])
    monthly = Counter("pages", limit=5, reset="monthly")
    assert consume(book, counter=monthly).used == 5


def test_a_changed_reset_starts_a_new_count() -> None:
    """A counter edited from `never` to `daily`: the stored count was not of today."""
    book = CounterBook()
    book.restore([CounterState("lic", "scans", 5, 0.0)])
    daily = Counter("scans", limit=5, reset="daily")
    assert consume(book, counter=daily).used == 1


def test_restore_keeps_every_counter_and_the_last_of_each() -> None:
    book = CounterBook()
    book.restore(
        [
            CounterState("lic", "scans", 1, 0.0),
            CounterState("lic", "pages", 2, 0.0),
            CounterState("other", "scans", 3, 0.0),
            CounterState("lic", "scans", 4, 0.0),  # the same counter again: this one
        ]
    )
    pages = Counter("pages", limit=9)
    assert book.state("lic", SCANS, T0).used == 4
    assert book.state("lic", pages, T0).used == 2
    assert book.state("other", SCANS, T0).used == 3


def test_the_state_to_persist_is_the_books_own() -> None:
    """`state()` and `Consumed.state` are the live record the caller writes."""
    book = CounterBook()
    consumed = consume(book, 2)
    assert consumed.state is book.state("lic", SCANS, T0)
    assert consume(book).state is consumed.state


# ------------------------------------------------------------------------------ undo


def test_undo_gives_the_units_back_and_forgets_the_id_so_a_retry_counts() -> None:
    book = CounterBook()
    consume(book, 1)
    failed = consume(book, 3, dedup="job-7")
    book.undo(failed, 3)  # its commit failed
    assert book.state("lic", SCANS, T0).used == 1
    retry = consume(book, 3, dedup="job-7", when=at(T0.wall, T0.mono + 1))
    assert (retry.counted, retry.used) == (True, 4)


def test_undo_without_a_dedup_id_gives_the_units_back() -> None:
    book = CounterBook()
    consume(book, 2, dedup="kept")
    failed = consume(book, 3)
    book.undo(failed, 3)
    assert book.state("lic", SCANS, T0).used == 2
    assert not consume(book, dedup="kept").counted  # another use's id stays remembered


def test_undo_of_a_repeat_changes_nothing() -> None:
    book = CounterBook()
    consume(book, 2, dedup="x")
    repeat = consume(book, 2, dedup="x")
    book.undo(repeat, 2)
    assert book.state("lic", SCANS, T0).used == 2
    assert not consume(book, 2, dedup="x").counted  # the id is still remembered


def test_undo_never_takes_the_count_below_zero() -> None:
    book = CounterBook()
    failed = consume(book, 2)
    book.undo(failed, 2)
    book.undo(failed, 2)  # twice
    assert book.state("lic", SCANS, T0).used == 0
