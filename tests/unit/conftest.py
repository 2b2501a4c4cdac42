"""Fixtures the client library's unit tests share: a fake daemon (tests/fakelicd.py,
renew_in 10 s), the client's lease clock stepped by hand, and a client of the two."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import pytest

from licd_client.client import AsyncClient
from licd_client.clock import ManualClock
from tests.fakelicd import FakeLicd


@pytest.fixture
async def fake() -> AsyncIterator[FakeLicd]:
    async with FakeLicd() as server:
        yield server


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start=1000.0)


@pytest.fixture
async def client(fake: FakeLicd, clock: ManualClock) -> AsyncIterator[AsyncClient]:
    c = AsyncClient(fake.address, fake.key_hex, clock=clock, rng=random.Random(1))
    yield c
    await c.aclose()
