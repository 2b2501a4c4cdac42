"""A licence's usage summary from the audit log (licd/core/usage.py), over a real store:
the peak seats per slot, refused checkouts, counters, and the slot's length."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from msgpack import packb
from nacl.signing import SigningKey

from licd.clock import ManualClock
from licd.core.service import LicenceService
from licd.core.usage import USAGE_SLOT, licence_usage, slot_for
from licd.engine.licence import Counter
from licd_client.entitlements import (
    MAX_PEAKS,
    MAX_REPORT_PEAKS,
    LicenceUsage,
    make_usage_report,
)
from licd_client.errors import SeatsExhausted
from licd_client.messages import MAX_SEATS, MAX_USAGE_REPORT, Heartbeat, parse_request
from licd_client.wire import REQUEST_LIMITS, decode_body
from tests.support import DICOM, checkout_committed, consume_committed, holder, new_engine
from tests.unit.test_store import running

LICENCE = replace(DICOM, seats=3, counter=(Counter("scans", limit=100),))
OTHER = replace(DICOM, key="OTHER-KEY", id="other", seats=1)


def test_the_slot_is_an_hour_until_the_span_needs_more_than_max_peaks_of_them() -> None:
    assert slot_for(0) == USAGE_SLOT
    assert slot_for(MAX_PEAKS * USAGE_SLOT) == USAGE_SLOT
    assert slot_for(MAX_PEAKS * USAGE_SLOT + 1) == 2 * USAGE_SLOT
    assert slot_for(35 * 86400) == USAGE_SLOT  # a renewal request: 840 hourly slots
    assert slot_for(35 * 86400, MAX_REPORT_PEAKS) == 21 * USAGE_SLOT  # a report: 40 of 21 h


def test_the_largest_usage_report_fits_a_heartbeat() -> None:
    """A router's report at its largest (every slot a peak, long names, fractional
    times) still fits the bin a heartbeat's `usage` may be."""
    start = 1_790_000_000.123456
    slot = slot_for(35 * 86400, MAX_REPORT_PEAKS)
    peaks = tuple((start + i * slot, MAX_SEATS) for i in range(MAX_REPORT_PEAKS))
    usage = LicenceUsage("l" * 64, slot, peaks, 2**53, {})
    report = make_usage_report(SigningKey.generate(), site="s" * 64, made=start, usage=usage)
    assert len(report) <= MAX_USAGE_REPORT
    heartbeat = Heartbeat(1, "lease", bytes(16), usage=report).to_wire()
    parsed = parse_request(decode_body(packb(heartbeat), REQUEST_LIMITS))
    assert isinstance(parsed, Heartbeat) and parsed.usage == report


async def test_peaks_per_slot_denials_and_counters(tmp_path: Path) -> None:
    clock = ManualClock(wall=1_000_000.0)
    since = clock.now().wall
    async with running(tmp_path / "licd.db") as store:
        service = LicenceService(new_engine([LICENCE, OTHER]), store, clock)

        async def take(host: str, key: str = LICENCE.key) -> str:
            grant = await checkout_committed(
                service, key, holder(host), request=host, at=clock.now()
            )
            return grant.lease.secret

        # Another licence's use is not this one's.
        await take("x", OTHER.key)
        with pytest.raises(SeatsExhausted):
            await take("y", OTHER.key)

        # First hour: up to 3 at once, then down to 2 (the peak is the most, not the last).
        a, b, _ = [await take(h) for h in ("a", "b", "c")]
        with pytest.raises(SeatsExhausted):
            await take("d")
        for secret in (a, b):
            commit = service.begin_checkin(secret, clock.now())
            assert commit is not None
            await commit
        e = await take("e")  # 2 in use now
        await consume_committed(service, e, "scans", 7, None)
        # Third hour: one more, and one refused; the second hour had no checkout.
        clock.advance(2 * USAGE_SLOT + 5)
        await take("g")
        for _ in range(3):  # one holder refused three times: logged as 1, then 2 counted
            with pytest.raises(SeatsExhausted):
                await take("h")
        service.flush_denials(clock.now(), every=True)
        await store.barrier()
        usage = await licence_usage(store, service.engine, LICENCE.id, since=since, at=clock.now())
    assert usage.licence_id == LICENCE.id and usage.slot == USAGE_SLOT
    assert usage.peaks == ((since, 3), (since + 2 * USAGE_SLOT, 3))
    assert usage.denials == 4
    assert usage.counters == {"scans": 7}
