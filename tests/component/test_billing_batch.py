"""billing's batch path against the real RabbitMQ, Redis and the local MongoDB-wire server.

A batch is billed with a few bulk MongoDB writes and acked with one ``ack(multiple=True)``.
Each reading must still count exactly once: repeated inside a batch, redelivered, written
by two batches at once, next to poison messages, and when MongoDB fails halfway through
a batch's writes (nothing acked until the batch is written; billed once afterwards).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from datetime import timedelta
from typing import Any

import aio_pika
import pytest
from prometheus_client import REGISTRY
from pymongo.errors import AutoReconnect

from billing_service.adapters.mongo import MongoLedger
from billing_service.adapters.mongo_batch import set_in_slots, store_readings
from billing_service.app import BillingApp
from billing_service.domain.ledger import SlotKey, Total, TransientFailure, slot_start
from common.messages import encode_reading
from common.models import Reading, validate_reading
from common.rabbit import REASON_HEADER, Topology, declare_topology
from tests.component.test_billing import NOW, T, cleanup, publish, settings
from tests.conftest import (
    MONGODB_URL,
    RABBITMQ_URL,
    expected_totals,
    ready_count,
    ready_once_unconsumed,
    wait_until,
)

# A minute into a slot: minutes 0 to 13 fall in one slot, 15 to 28 in the next.
BASE = slot_start(T) + timedelta(minutes=1)


def reading(minutes: int, device: str = "meter-1", kwh: float = 0.25) -> Reading:
    return validate_reading(device, BASE + timedelta(minutes=minutes), kwh, now=NOW)


def groups(readings: Iterable[Reading]) -> dict[SlotKey, list[Reading]]:
    found: dict[SlotKey, list[Reading]] = {}
    for r in readings:
        found.setdefault(SlotKey.of(r), []).append(r)
    return found


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def counters() -> dict[str, float]:
    return {
        "billed": sample("billing_readings_total", result="billed"),
        "duplicate": sample("billing_readings_total", result="duplicate"),
        "acked": sample("consumer_messages_total", consumer="billing", outcome="acked"),
        "dead": sample("consumer_messages_total", consumer="billing", outcome="dead_lettered"),
        "batches": sample("consumer_batch_size_count", consumer="billing"),
        "batched": sample("consumer_batch_size_sum", consumer="billing"),
        "retries": sample("billing_store_retries_total"),
    }


def grown(before: dict[str, float]) -> dict[str, float]:
    now = counters()
    return {name: now[name] - before[name] for name in now}


async def stored(app: BillingApp, keys: Iterable[SlotKey]) -> dict[SlotKey, Total]:
    return {key: await app.ledger.slot_total(key) for key in keys}


async def declare(prefix: str) -> None:
    connection = await aio_pika.connect(RABBITMQ_URL)
    async with connection:
        await declare_topology(await connection.channel(), Topology(prefix))


def one_batch_of(count: int) -> dict[str, object]:
    """Settings under which ``count`` queued deliveries make exactly one batch: the batch is
    full at ``count`` (a condition), and the linger only bounds the wait for them, so the
    broker's pace of delivery cannot split it."""
    return {"batch_size": count, "prefetch": count, "batch_linger_s": 10}


class Apps:
    """The billing apps of one test, on its topology and database."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.running: list[BillingApp] = []

    async def start(self, **overrides: object) -> BillingApp:
        app = BillingApp(settings(self.prefix, **overrides))
        await app.start()
        self.running.append(app)
        return app

    async def stop(self, app: BillingApp) -> None:
        self.running.remove(app)
        await app.stop()


@pytest.fixture
async def apps(prefix: str) -> AsyncIterator[Apps]:
    started = Apps(prefix)
    yield started
    for app in list(started.running):
        await started.stop(app)
    await cleanup(prefix, BillingApp(settings(prefix)))


async def test_a_batch_with_repeats_inside_bills_each_reading_once(prefix, apps) -> None:
    r1, r2, r3 = reading(1), reading(2), reading(20, kwh=1.5)
    await declare(prefix)
    await publish(prefix, [encode_reading(r) for r in (r1, r2, r1, r3, r2, r1)])
    before = counters()
    app = await apps.start(**one_batch_of(6))
    await wait_until(lambda: _at_least(before, acked=6), what="six deliveries acked")
    assert grown(before) | {"retries": 0} == {
        "billed": 3,
        "duplicate": 3,
        "acked": 6,
        "dead": 0,
        "batches": 1,
        "batched": 6,
        "retries": 0,
    }
    assert await stored(app, expected_totals([r1, r2, r3])) == expected_totals([r1, r2, r3])
    assert await app.ledger.readings.count_documents({}) == 3
    key = SlotKey.of(r1)
    slot = await app.ledger.device_slots.find_one({"_id": key.bucket_id})
    assert slot["milliwh"] == {r1.reading_id: r1.usage_milliwh, r2.reading_id: r2.usage_milliwh}
    cached = await app.cache.month_slots("meter-1", key.month)
    assert set(cached.changed) == {k.start for k in expected_totals([r1, r2, r3])}
    assert await app.cache.latest("meter-1") == r3
    await apps.stop(app)  # anything left unacked goes back to the queue
    assert await ready_once_unconsumed(Topology(prefix).billing_queue) == 0


async def test_a_redelivered_batch_changes_no_total(prefix, apps) -> None:
    batch = [reading(m, device=f"meter-{m % 3}", kwh=0.1 * m) for m in range(1, 31)]
    app = await apps.start()
    before = counters()
    await publish(prefix, [encode_reading(r) for r in batch])
    await wait_until(lambda: _at_least(before, acked=30), what="the batch acked")
    first = await stored(app, expected_totals(batch))
    await publish(prefix, [encode_reading(r) for r in reversed(batch)])
    await wait_until(lambda: _at_least(before, acked=60), what="the redelivery acked")
    assert first == expected_totals(batch)
    assert await stored(app, expected_totals(batch)) == expected_totals(batch)
    assert grown(before)["billed"] == 30 and grown(before)["duplicate"] == 30


async def test_a_batch_redelivered_after_a_crash_between_its_writes(prefix, apps) -> None:
    app = await apps.start()
    batch = [reading(m, device=f"meter-{m % 4}", kwh=0.01 * m) for m in range(1, 45)]
    await app.ledger.record_batch(batch[:10])  # an earlier batch
    # The crash: every slot written and half of the readings stored, nothing acked.
    await set_in_slots(app.ledger.device_slots, groups(batch))
    await store_readings(app.ledger.readings, batch[: len(batch) // 2])
    redelivered = await app.ledger.record_batch(batch)
    assert len(redelivered.new) == len(batch) - len(batch) // 2
    assert redelivered.duplicates == len(batch) // 2
    assert redelivered.slots == set(expected_totals(batch))
    assert await stored(app, expected_totals(batch)) == expected_totals(batch)
    assert await app.ledger.readings.count_documents({}) == len(batch)


async def test_two_writers_of_the_same_slots_at_once(prefix, apps) -> None:
    """Two ledgers on their own connections (two billing replicas) write overlapping
    batches at the same time; no lock anywhere, the server applies each slot's upsert."""
    app = await apps.start()
    ledger = app.ledger
    other = MongoLedger.connect(MONGODB_URL, prefix.strip("-"), timeout_s=30)
    # Readings a minute apart for five devices: 16 slots each. The first round creates
    # the slots, the second adds to them.
    for offset in (-600, -300):
        first = [reading(offset + m, device=f"meter-{m % 5}") for m in range(0, 150)]
        second = [reading(offset + m, device=f"meter-{m % 5}") for m in range(100, 240)]
        one, two = await _twice(ledger.record_batch, other.record_batch, first, second)
        distinct = {r.reading_id for r in first + second}
        assert len(one.new) + len(two.new) == len(distinct)
        assert one.duplicates + two.duplicates == 50
        assert {r.reading_id for r in one.new} & {r.reading_id for r in two.new} == set()
    other.close()
    everything = [reading(o + m, device=f"meter-{m % 5}") for o in (-600, -300) for m in range(240)]
    assert await stored(app, expected_totals(everything)) == expected_totals(everything)


async def _twice(write_one, write_two, first, second):  # type: ignore[no-untyped-def]
    """Both writes at once; a concurrent creator of a slot is a transient failure (the
    handler retries it), so each write is retried like the handler does."""

    async def retried(write, batch):  # type: ignore[no-untyped-def]
        for _ in range(10):
            try:
                return await write(batch)
            except TransientFailure:
                await asyncio.sleep(0.05)
        return await write(batch)

    return await asyncio.gather(retried(write_one, first), retried(write_two, second))


async def test_two_billing_processes_on_one_queue_bill_each_reading_once(prefix, apps) -> None:
    """Two billing consumers share the queue; every reading is published twice."""
    readings = [reading(-m, device=f"meter-{m % 40}", kwh=0.001 * m) for m in range(600)]
    await declare(prefix)
    before = counters()
    one, two = await apps.start(), await apps.start()
    await publish(prefix, [encode_reading(r) for r in readings + readings[::-1]])
    await wait_until(lambda: _at_least(before, acked=1200), timeout_s=300, what="all acked")
    assert grown(before)["billed"] == 600 and grown(before)["duplicate"] == 600
    assert await stored(one, expected_totals(readings)) == expected_totals(readings)
    assert await two.ledger.readings.count_documents({}) == 600


async def test_poison_messages_inside_a_batch_do_not_hold_back_their_neighbours(
    prefix, apps
) -> None:
    goods = [reading(m, device="meter-9") for m in (1, 2, 3)]
    bodies = [
        encode_reading(goods[0]),
        b"{not json",
        encode_reading(goods[1]),
        b'{"schema_version": 9}',
        encode_reading(goods[2]),
    ]
    await declare(prefix)
    await publish(prefix, bodies)
    before = counters()
    app = await apps.start(**one_batch_of(len(bodies)))
    await wait_until(lambda: _at_least(before, acked=3, dead=2), what="goods acked, poison dead")
    assert grown(before) | {"retries": 0} == {
        "billed": 3,
        "duplicate": 0,
        "acked": 3,
        "dead": 2,
        "batches": 1,
        "batched": 5,
        "retries": 0,
    }
    assert await stored(app, expected_totals(goods)) == expected_totals(goods)
    topology = Topology(prefix)
    connection = await aio_pika.connect(RABBITMQ_URL)
    async with connection:
        queue = await (await connection.channel()).declare_queue(
            topology.dead_letter_queue, passive=True
        )
        dead = [await queue.get(no_ack=True) for _ in range(2)]
    assert sorted(str(m.headers[REASON_HEADER])[:20] for m in dead) == [
        "body is not JSON: Ex",
        "unsupported schema_v",
    ]
    await apps.stop(app)
    assert await ready_once_unconsumed(topology.billing_queue) == 0, "a delivery left unacked"


class HalfWrites:
    """The device_slots collection, except that while ``failing`` its writes fail as a lost
    connection: the first one after applying half of its operations, the others at once."""

    def __init__(self, collection: Any) -> None:
        self._collection = collection
        self.failing = False
        self.failures = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._collection, name)

    async def bulk_write(self, operations: list, **kwargs: Any) -> Any:  # type: ignore[type-arg]
        return await self._write(self._collection.bulk_write, operations, **kwargs)

    async def insert_many(self, documents: list, **kwargs: Any) -> Any:  # type: ignore[type-arg]
        return await self._write(self._collection.insert_many, documents, **kwargs)

    async def _write(self, write: Any, items: list, **kwargs: Any) -> Any:  # type: ignore[type-arg]
        if not self.failing:
            return await write(items, **kwargs)
        if self.failures == 0:
            await write(items[: len(items) // 2], **kwargs)
        self.failures += 1
        raise AutoReconnect("connection reset (injected)")


def half_writes(app: BillingApp) -> HalfWrites:
    slots = HalfWrites(app.ledger.device_slots)
    app.ledger.device_slots = slots  # type: ignore[assignment]
    return slots


# Six devices with two buckets each; then a batch adding to those twelve buckets (updates
# only), and one for six other devices (new buckets only).
WARM = [reading(m, device=f"meter-{d}") for d in range(6) for m in (1, 16)]
UPDATES = [reading(m, device=f"meter-{d}", kwh=0.5) for d in range(6) for m in (2, 17, 18)]
CREATES = [reading(m, device=f"meter-{d}", kwh=0.5) for d in range(6, 12) for m in (2, 17)]


async def _warm_then_failing(prefix, apps) -> tuple[BillingApp, HalfWrites, dict[str, float]]:
    """A billing that has billed WARM, and whose bucket writes now fail half way."""
    app = await apps.start()
    slots = half_writes(app)
    before = counters()
    await publish(prefix, [encode_reading(r) for r in WARM])
    await wait_until(lambda: _at_least(before, acked=len(WARM)), what="the first batch")
    slots.failing = True
    return app, slots, before


async def test_a_mongodb_failure_mid_batch_acks_nothing_then_bills_once(prefix, apps) -> None:
    app, slots, before = await _warm_then_failing(prefix, apps)
    acked = counters()["acked"]
    await publish(prefix, [encode_reading(r) for r in UPDATES])
    await wait_until(lambda: _failed(slots, 4), what="four failed attempts")
    assert await ready_count(Topology(prefix).billing_queue) == 0, "not all delivered"
    assert counters()["acked"] == acked, "acked while MongoDB writes failed"
    partial = await stored(app, expected_totals(WARM + UPDATES))
    assert partial not in (expected_totals(WARM), expected_totals(WARM + UPDATES)), (
        "not half written"
    )
    slots.failing = False
    everything = WARM + UPDATES
    await wait_until(lambda: _at_least(before, acked=len(everything)), what="the batch acked")
    assert grown(before)["retries"] >= 4
    assert await stored(app, expected_totals(everything)) == expected_totals(everything)
    assert await app.ledger.readings.count_documents({}) == len(everything)

    key = SlotKey.of(WARM[0])
    month = key.start.replace(day=1, hour=0, minute=0)
    meter_0 = {
        k.start: t for k, t in expected_totals(everything).items() if k.device_id == "meter-0"
    }
    assert await app.queries.slot_totals("meter-0", month, month + timedelta(days=31)) == meter_0
    assert (await app.cache.month_slots("meter-0", key.month)).slots == meter_0


async def test_a_batch_half_written_when_billing_stops_is_redelivered_and_billed_once(
    prefix, apps
) -> None:
    app, slots, before = await _warm_then_failing(prefix, apps)
    await publish(prefix, [encode_reading(r) for r in CREATES])
    await wait_until(lambda: _failed(slots, 2), what="two failed attempts")
    partial = await stored(app, expected_totals(WARM + CREATES))
    assert partial not in (expected_totals(WARM), expected_totals(WARM + CREATES)), (
        "not half written"
    )
    await apps.stop(app)  # the grace (1 s) runs out: the batch goes back, unacked
    assert await ready_once_unconsumed(Topology(prefix).billing_queue) == len(CREATES)
    restarted = await apps.start()
    everything = WARM + CREATES
    await wait_until(lambda: _at_least(before, acked=len(everything)), what="the redelivery")
    assert await stored(restarted, expected_totals(everything)) == expected_totals(everything)
    assert await restarted.ledger.readings.count_documents({}) == len(everything)


async def test_the_batch_writes_cost_a_few_round_trips_whatever_its_size(prefix) -> None:
    """500 readings of 200 devices: one bulk upsert of the 200 slots, one insert of the
    readings; nothing is read, new slots or not."""
    ledger = MongoLedger.connect(MONGODB_URL, prefix.strip("-"), timeout_s=30)
    calls: list[tuple[str, int]] = []
    for collection in (ledger.readings, ledger.device_slots):
        for method in ("insert_many", "bulk_write", "find"):
            _spy(collection, method, calls)
    try:
        first = [reading(m // 200, device=f"d{m % 200}") for m in range(500)]  # minutes 0-2
        second = [reading(3 + m // 200, device=f"d{m % 200}") for m in range(500)]  # 3-5
        for batch in (first, second):
            calls.clear()
            recorded = await ledger.record_batch(batch)
            assert len(recorded.new) == 500
            assert calls == [("device_slots.bulk_write", 200), ("readings.insert_many", 500)]
        totals = {key: await ledger.slot_total(key) for key in expected_totals(first + second)}
        assert totals == expected_totals(first + second)
    finally:
        await ledger.database.client.drop_database(ledger.database.name)
        ledger.close()


def _spy(collection: Any, method: str, calls: list[tuple[str, int]]) -> None:
    original = getattr(collection, method)

    def counted(items: Any, *args: Any, **kwargs: Any) -> Any:
        size = len(items["_id"]["$in"]) if method == "find" else len(items)
        calls.append((f"{collection.name}.{method}", size))
        return original(items, *args, **kwargs)

    setattr(collection, method, counted)


async def _at_least(before: dict[str, float], **minimum: float) -> bool:
    now = grown(before)
    return all(now[name] >= value for name, value in minimum.items())


async def _failed(slots: HalfWrites, failures: int) -> bool:
    return slots.failures >= failures
