"""What a site used of one licence over a span, from its audit log: the summary a
renewal request (licd/core/entitlements.py) and a router's block renewal
(licd/core/router.py) carry to the vendor (`licd_client.entitlements.LicenceUsage`).

The peak seats in use per slot (from each checkout's `in_use`), the checkouts refused,
and each counter's units used in its current period. The slot is an hour, longer when
the span would need more of them than the summary may hold (MAX_PEAKS in a renewal
request, MAX_REPORT_PEAKS in a router's usage report, which rides on a heartbeat).
"""

from __future__ import annotations

import math

from licd.clock import Instant
from licd.core.events import Kind
from licd.engine import Engine
from licd.store.base import Store
from licd_client.entitlements import MAX_PEAKS, LicenceUsage

#: The shortest slot of a usage summary's peaks, in seconds.
USAGE_SLOT = 3600.0
#: At most this many audit entries are read for one summary.
USAGE_ENTRIES = 200_000
PAGE = 5000


def slot_for(span: float, max_peaks: int = MAX_PEAKS) -> float:
    """The slot for a summary of `span` seconds: an hour, or whole hours enough to need
    no more than `max_peaks` slots."""
    hours = max(1, math.ceil(span / USAGE_SLOT / max_peaks))
    return hours * USAGE_SLOT


async def licence_usage(
    store: Store,
    engine: Engine,
    licence_id: str,
    *,
    since: float,
    at: Instant,
    max_peaks: int = MAX_PEAKS,
) -> LicenceUsage:
    """The use of `licence_id` from wall time `since` until `at`, in at most
    `max_peaks` slots."""
    slot = slot_for(at.wall - since, max_peaks)
    peaks: dict[float, int] = {}
    denials = 0
    after = 0
    read = 0
    while read < USAGE_ENTRIES:
        page = await store.audit(after=after, since=since, limit=PAGE)
        if not page:
            break
        for entry in page:
            e = entry.event
            if e.licence != licence_id:
                continue
            if e.kind is Kind.DENIED:
                denials += int(e.detail.get("count", 1))
            elif e.kind is Kind.CHECKOUT:
                start = since + slot * ((e.time - since) // slot)
                in_use = e.detail.get("in_use")
                if isinstance(in_use, int):
                    peaks[start] = max(peaks.get(start, 0), in_use)
        after = page[-1].id
        read += len(page)
    counters = {}
    licence = engine.licence_by_id(licence_id)
    for counter in licence.counter if licence else ():
        counters[counter.name] = engine.counters.state(licence_id, counter, at).used
    return LicenceUsage(licence_id, slot, tuple(sorted(peaks.items())), denials, counters)
