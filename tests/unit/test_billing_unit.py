"""Billing logic without servers: the ledger on mongomock-motor, the handler's retry policy.

The same MongoLedger runs against the real local MongoDB-wire server in tests/component.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import mongomock.collection
import pytest
from mongomock_motor import AsyncMongoMockClient

from billing_service.adapters import mongo_batch
from billing_service.adapters.mongo import MongoLedger
from billing_service.consumer import BillingHandler
from billing_service.domain.ledger import BatchRecorded, SlotKey, Total, TransientFailure
from common.models import Reading, validate_reading
from tests.conftest import expected_totals, wait_until

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def reading(minute: int, kwh: float = 0.5, device: str = "meter-1", day: int = 22) -> Reading:
    return validate_reading(device, datetime(2026, 11, day, 11, minute, tzinfo=UTC), kwh, now=NOW)


@pytest.fixture(autouse=True)
def _mongomock_takes_update_sort(monkeypatch: pytest.MonkeyPatch) -> None:
    """mongomock 4.3 predates pymongo 4.11's ``UpdateOne(sort=...)``, which bulk_write
    passes on to it; drop the (unused) argument so bulk_write runs on mongomock."""
    add_update = mongomock.collection.BulkOperationBuilder.add_update

    def without_sort(self, *args, sort=None, **kwargs):  # type: ignore[no-untyped-def]
        assert sort is None
        return add_update(self, *args, **kwargs)

    monkeypatch.setattr(mongomock.collection.BulkOperationBuilder, "add_update", without_sort)


@pytest.fixture
def ledger() -> MongoLedger:
    return MongoLedger(AsyncMongoMockClient()["billing"])


@dataclass(frozen=True)
class Recorded:
    total: Total  # the reading's bucket after the write
    duplicate: bool


async def record(ledger: MongoLedger, one: Reading) -> Recorded:
    """Record one reading as a batch of one."""
    recorded = await ledger.record_batch([one])
    assert recorded.slots == {SlotKey.of(one)}
    return Recorded(await ledger.slot_total(SlotKey.of(one)), duplicate=not recorded.new)


async def test_a_reading_recorded_three_times_counts_once(ledger: MongoLedger) -> None:
    first = await record(ledger, reading(1))
    again = [await record(ledger, reading(1)) for _ in range(2)]
    assert first.duplicate is False and first.total == Total(1, 500_000)
    assert all(r.duplicate and r.total == Total(1, 500_000) for r in again)
    assert await ledger.readings.count_documents({}) == 1


async def test_totals_are_the_same_in_any_order(ledger: MongoLedger) -> None:
    readings = [reading(m, kwh=0.1 * m) for m in range(1, 11)]  # all in the 11:00 slot
    for r in reversed(readings):
        await record(ledger, r)
    for r in readings[::3]:
        await record(ledger, r)
    total = await ledger.slot_total(SlotKey.of(readings[0]))
    assert total == Total(10, sum(r.usage_milliwh for r in readings))


async def test_slots_and_latest(ledger: MongoLedger) -> None:
    await record(ledger, reading(5, 1.0, day=21))
    await record(ledger, reading(7, 2.0, day=22))
    await record(ledger, reading(6, 4.0, day=22))
    await record(ledger, reading(6, 4.0, day=22))
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

    async def record_batch(self, readings: Sequence[Reading]) -> BatchRecorded:
        self.calls += 1
        if self.calls <= self.failures:
            raise TransientFailure("MongoDB: connection refused")
        return await self.inner.record_batch(readings)

    async def latest(self, device_id: str) -> Reading | None:
        return await self.inner.latest(device_id)


class MemoryCache:
    def __init__(self) -> None:
        self.down = False
        self.attempts = 0
        self.changed: set[SlotKey] = set()
        self.latest: dict[str, Reading] = {}

    async def put_latest(self, reading: Reading) -> None:
        if self.down:
            raise TransientFailure("Redis: connection refused")
        self.latest[reading.device_id] = reading

    async def mark_changed(self, slots: Iterable[SlotKey], latest: Iterable[Reading]) -> None:
        self.attempts += 1
        if self.down:
            raise TransientFailure("Redis: connection refused")
        self.changed.update(slots)
        self.latest.update((reading.device_id, reading) for reading in latest)


async def test_a_transient_ledger_failure_is_retried_until_it_succeeds(ledger: MongoLedger) -> None:
    flaky, cache = FlakyLedger(ledger, failures=3), MemoryCache()
    handler = BillingHandler(flaky, cache, retry_max_delay_s=0.01, cache_retry_s=1)
    await handler([reading(1)])
    assert flaky.calls == 4
    assert cache.changed == {SlotKey.of(reading(1))}
    assert await ledger.slot_total(SlotKey.of(reading(1))) == Total(1, 500_000)


async def test_redis_down_defers_the_cache_and_billing_goes_on(ledger: MongoLedger) -> None:
    cache = MemoryCache()
    cache.down = True
    handler = BillingHandler(ledger, cache, retry_max_delay_s=0.01, cache_retry_s=0.05)
    await handler([reading(1)])
    attempts_while_down = cache.attempts
    assert attempts_while_down >= 1
    await handler([reading(2)])
    assert cache.attempts == attempts_while_down, "a known outage is not retried per reading"
    assert await ledger.slot_total(SlotKey.of(reading(1))) == Total(2, 1_000_000)
    assert cache.changed == set()
    cache.down = False
    refresher = asyncio.create_task(handler.refresh_stale(interval_s=0.01))
    try:
        await wait_until(lambda: _has_entries(cache), timeout_s=5, what="cache refreshed")
    finally:
        refresher.cancel()
    assert cache.changed == {SlotKey.of(reading(1))}
    assert cache.latest["meter-1"].reading_id == reading(2).reading_id


async def _has_entries(cache: MemoryCache) -> bool:
    return bool(cache.changed)


# The batch path: each reading counted once whatever the batch repeats, a redelivery, a
# crash between the writes or a concurrent writer of the same slots.


async def _stored(ledger: MongoLedger, keys: Iterable[SlotKey]) -> dict[SlotKey, Total]:
    return {key: await ledger.slot_total(key) for key in keys}


async def test_a_batch_with_repeats_inside_counts_each_reading_once(ledger: MongoLedger) -> None:
    batch = [reading(1), reading(2), reading(1), reading(20), reading(2), reading(1)]
    recorded = await ledger.record_batch(batch)
    assert [r.reading_id for r in recorded.new] == [
        r.reading_id for r in (reading(1), reading(2), reading(20))
    ]
    assert recorded.duplicates == 3
    assert recorded.slots == set(expected_totals(batch))
    assert await _stored(ledger, recorded.slots) == expected_totals(batch)
    assert await ledger.readings.count_documents({}) == 3
    slot = await ledger.device_slots.find_one({"_id": SlotKey.of(reading(1)).bucket_id})
    assert slot["milliwh"] == {reading(1).reading_id: 500_000, reading(2).reading_id: 500_000}
    assert slot["device_id"] == "meter-1"


async def test_a_redelivered_batch_changes_nothing(ledger: MongoLedger) -> None:
    batch = [reading(m, kwh=0.1 * m, device=f"d{m % 3}") for m in range(1, 40)]
    first = await ledger.record_batch(batch)
    again = await ledger.record_batch(list(reversed(batch)))
    assert len(first.new) == len(batch) and first.duplicates == 0
    assert again.new == [] and again.duplicates == len(batch)
    assert again.slots == first.slots == set(expected_totals(batch))
    assert await _stored(ledger, first.slots) == expected_totals(batch)


async def test_a_batch_redelivered_after_a_crash_between_its_writes(ledger: MongoLedger) -> None:
    batch = [reading(m, kwh=0.01 * m, device=f"d{m % 4}") for m in range(1, 59)]
    # The crash came after every slot was written and half of the readings were stored,
    # before the ack: the broker redelivers the whole batch.
    await mongo_batch.set_in_slots(ledger.device_slots, _groups(batch))
    await mongo_batch.store_readings(ledger.readings, batch[: len(batch) // 2])
    redelivered = await ledger.record_batch(batch)
    assert {r.reading_id for r in redelivered.new} == {
        r.reading_id for r in batch[len(batch) // 2 :]
    }
    assert redelivered.duplicates == len(batch) // 2
    assert redelivered.slots == set(expected_totals(batch))
    assert await _stored(ledger, redelivered.slots) == expected_totals(batch)
    assert await ledger.readings.count_documents({}) == len(batch)


def _groups(readings: Sequence[Reading]) -> dict[SlotKey, list[Reading]]:
    groups: dict[SlotKey, list[Reading]] = {}
    for r in readings:
        groups.setdefault(SlotKey.of(r), []).append(r)
    return groups


async def test_concurrent_batches_sharing_buckets_add_each_reading_once(
    ledger: MongoLedger,
) -> None:
    first = [reading(m, device=f"d{m % 2}") for m in range(0, 40)]
    second = [reading(m, device=f"d{m % 2}") for m in range(20, 59)]  # 20 in both
    one, two = await asyncio.gather(ledger.record_batch(first), ledger.record_batch(second))
    assert len(one.new) + len(two.new) == len({r.reading_id for r in first + second})
    assert one.duplicates + two.duplicates == 20
    assert await _stored(ledger, expected_totals(first + second)) == expected_totals(first + second)


async def test_a_replica_writing_between_the_writes_of_another_changes_no_total() -> None:
    """Two ledgers (two billing replicas, one database): B records a whole batch between
    A's slot writes and A's readings insert, sharing slots and two readings with A."""
    database = AsyncMongoMockClient()["billing"]
    a, b = MongoLedger(database), MongoLedger(database)
    await a.record_batch([reading(1), reading(16)])  # slots 11:00 and 11:15 exist
    first = [reading(2), reading(3), reading(17), reading(31), reading(32)]
    second = [reading(3), reading(18), reading(32), reading(33)]  # 3 and 32 in both
    await mongo_batch.set_in_slots(a.device_slots, _groups(first))
    by_b = await b.record_batch(second)
    by_a = await a.record_batch(first)  # A's redelivery after the interruption
    everything = [reading(1), reading(16), *first, *second]
    assert await _stored(a, expected_totals(everything)) == expected_totals(everything)
    assert len(by_a.new) + len(by_b.new) == len(first) + len(second) - 2
    assert by_a.duplicates + by_b.duplicates == 2


async def test_old_layout_slots_are_migrated_and_keep_their_totals(ledger: MongoLedger) -> None:
    """Slots written by the earlier layout (reading_ids and counters) become maps."""
    old = [reading(1, 0.5), reading(2, 1.5), reading(16, 2.0)]
    await mongo_batch.store_readings(ledger.readings, old)
    for key, group in _groups(old).items():
        milliwh = [r.usage_milliwh for r in group]
        await ledger.device_slots.insert_one(
            {
                "_id": key.bucket_id,
                "device_id": key.device_id,
                "start": key.start,
                "reading_ids": [r.reading_id for r in group],
                "count": len(group),
                "usage_milliwh": sum(milliwh),
                "min_milliwh": min(milliwh),
                "max_milliwh": max(milliwh),
            }
        )
    assert await ledger.migrate_layout() == 2
    assert await ledger.migrate_layout() == 0  # recorded as done: no second scan
    recorded = await ledger.record_batch([reading(2, 1.5), reading(3, 0.25)])
    assert [r.reading_id for r in recorded.new] == [reading(3, 0.25).reading_id]
    everything = [*old, reading(3, 0.25)]
    assert await _stored(ledger, expected_totals(everything)) == expected_totals(everything)
    assert await ledger.device_slots.count_documents({"count": {"$exists": True}}) == 0
