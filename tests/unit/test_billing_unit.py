"""Billing logic without servers: the ledger on mongomock-motor, the handler's retry policy.

The same MongoLedger runs against the real FerretDB in tests/component.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from mongomock_motor import AsyncMongoMockClient

from billing_service.adapters.mongo import MongoLedger
from billing_service.consumer import BillingHandler
from billing_service.domain.ledger import SlotKey, Total, TransientFailure
from common.models import Reading, validate_reading
from tests.conftest import wait_until

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def reading(minute: int, kwh: float = 0.5, device: str = "meter-1", day: int = 22) -> Reading:
    return validate_reading(device, datetime(2026, 11, day, 11, minute, tzinfo=UTC), kwh, now=NOW)


@pytest.fixture
def ledger() -> MongoLedger:
    return MongoLedger(AsyncMongoMockClient()["billing"])


async def test_a_reading_recorded_three_times_counts_once(ledger: MongoLedger) -> None:
    first = await ledger.record(reading(1))
    again = [await ledger.record(reading(1)) for _ in range(2)]
    assert first.duplicate is False and first.total == Total(1, 500_000)
    assert all(r.duplicate and r.total == Total(1, 500_000) for r in again)
    assert await ledger.readings.count_documents({}) == 1


async def test_totals_are_the_same_in_any_order(ledger: MongoLedger) -> None:
    readings = [reading(m, kwh=0.1 * m) for m in range(1, 11)]  # all in the 11:00 slot
    for r in reversed(readings):
        await ledger.record(r)
    for r in readings[::3]:
        await ledger.record(r)
    total = await ledger.slot_total(SlotKey.of(readings[0]))
    assert total == Total(10, sum(r.usage_milliwh for r in readings))


async def test_slots_and_latest(ledger: MongoLedger) -> None:
    await ledger.record(reading(5, 1.0, day=21))
    await ledger.record(reading(7, 2.0, day=22))
    await ledger.record(reading(6, 4.0, day=22))
    await ledger.record(reading(6, 4.0, day=22))
    november = await ledger.slots(
        "meter-1", datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)
    )
    assert [(row.start.day, row.total) for row in november] == [
        (21, Total(1, 1_000_000)),
        (22, Total(2, 6_000_000)),
    ]
    assert (november[1].min_milliwh, november[1].max_milliwh) == (2_000_000, 4_000_000)
    assert (
        await ledger.slots(
            "meter-1", datetime(2026, 10, 1, tzinfo=UTC), datetime(2026, 11, 1, tzinfo=UTC)
        )
        == []
    )
    latest = await ledger.latest("meter-1")
    assert latest == reading(7, 2.0, day=22)


class FlakyLedger:
    """Fails ``failures`` times with a transient error, then records into a real ledger."""

    def __init__(self, inner: MongoLedger, failures: int) -> None:
        self.inner, self.failures, self.calls = inner, failures, 0

    async def record(self, reading: Reading):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.calls <= self.failures:
            raise TransientFailure("MongoDB: connection refused")
        return await self.inner.record(reading)

    async def slot_total(self, key: SlotKey) -> Total:
        return await self.inner.slot_total(key)

    async def latest(self, device_id: str) -> Reading | None:
        return await self.inner.latest(device_id)


class MemoryCache:
    def __init__(self) -> None:
        self.down = False
        self.attempts = 0
        self.slots: dict[SlotKey, Total] = {}
        self.latest: dict[str, Reading] = {}

    async def put_slot_total(self, key: SlotKey, total: Total) -> None:
        self.attempts += 1
        if self.down:
            raise TransientFailure("Redis: connection refused")
        self.slots[key] = total

    async def put_latest(self, reading: Reading) -> None:
        if self.down:
            raise TransientFailure("Redis: connection refused")
        self.latest[reading.device_id] = reading


async def test_a_transient_ledger_failure_is_retried_until_it_succeeds(ledger: MongoLedger) -> None:
    flaky, cache = FlakyLedger(ledger, failures=3), MemoryCache()
    handler = BillingHandler(flaky, cache, retry_max_delay_s=0.01, cache_retry_s=1)
    await handler(reading(1))
    assert flaky.calls == 4
    assert cache.slots[SlotKey.of(reading(1))] == Total(1, 500_000)


async def test_redis_down_defers_the_cache_and_billing_goes_on(ledger: MongoLedger) -> None:
    cache = MemoryCache()
    cache.down = True
    handler = BillingHandler(ledger, cache, retry_max_delay_s=0.01, cache_retry_s=0.05)
    await handler(reading(1))
    attempts_while_down = cache.attempts
    assert attempts_while_down >= 1
    await handler(reading(2))
    assert cache.attempts == attempts_while_down, "a known outage is not retried per reading"
    assert await ledger.slot_total(SlotKey.of(reading(1))) == Total(2, 1_000_000)
    assert cache.slots == {}
    cache.down = False
    refresher = asyncio.create_task(handler.refresh_stale(interval_s=0.01))
    try:
        await wait_until(lambda: _has_entries(cache), timeout_s=5, what="cache refreshed")
    finally:
        refresher.cancel()
    assert cache.slots[SlotKey.of(reading(1))] == Total(2, 1_000_000)
    assert cache.latest["meter-1"].reading_id == reading(2).reading_id


async def _has_entries(cache: MemoryCache) -> bool:
    return bool(cache.slots)
