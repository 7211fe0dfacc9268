"""billing_service against the real RabbitMQ, Redis and the local MongoDB-wire server."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aio_pika
import pytest
import redis.asyncio as redis
from prometheus_client import REGISTRY

from billing_service.adapters.mongo import MongoLedger
from billing_service.app import BillingApp
from billing_service.domain.ledger import SlotKey, Total
from billing_service.settings import BillingSettings
from common.messages import encode_reading
from common.models import Reading, validate_reading
from common.rabbit import REASON_HEADER, ROUTING_KEY, Topology
from tests.conftest import (
    MONGODB_URL,
    RABBITMQ_URL,
    REDIS_URL,
    delete_topology,
    expected_totals,
    ready_count,
    ready_once_unconsumed,
    wait_until,
)
from tests.mongo_server import LocalMongo

NOW = datetime.now(UTC)
T = NOW.replace(microsecond=0) - timedelta(hours=1)


def reading(minutes: int = 0, kwh: float = 1.25, device: str = "meter-1") -> Reading:
    return validate_reading(device, T + timedelta(minutes=minutes), kwh, now=NOW)


def settings(prefix: str, mongodb_url: str = MONGODB_URL, **overrides: object) -> BillingSettings:
    return BillingSettings(  # type: ignore[arg-type]
        port=0,
        topology_prefix=prefix,
        mongodb_url=mongodb_url,
        mongodb_database=prefix.strip("-"),
        mongodb_timeout_s=1,
        redis_key_prefix=prefix,
        retry_max_delay_s=0.5,
        shutdown_grace_s=1,
        rabbitmq_url=RABBITMQ_URL,
        redis_url=REDIS_URL,
        **{"close_check_interval_s": 0, **overrides},  # tests close periods themselves
    )


async def publish(prefix: str, bodies: list[bytes]) -> None:
    connection = await aio_pika.connect(RABBITMQ_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(Topology(prefix).exchange)
        for body in bodies:
            message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            await exchange.publish(message, ROUTING_KEY)


@pytest.fixture
async def billing(prefix: str) -> AsyncIterator[BillingApp]:
    app = BillingApp(settings(prefix))
    await app.start()
    yield app
    await app.stop()
    await cleanup(prefix, app)


async def cleanup(prefix: str, app: BillingApp) -> None:
    ledger = MongoLedger.connect(app.settings.mongodb_url, prefix.strip("-"), timeout_s=5)
    await ledger.database.client.drop_database(ledger.database.name)
    ledger.close()
    client = redis.Redis.from_url(REDIS_URL)
    keys = [key async for key in client.scan_iter(f"{prefix}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()
    await delete_topology(prefix)


def acked() -> float:
    labels = {"consumer": "billing", "outcome": "acked"}
    return REGISTRY.get_sample_value("consumer_messages_total", labels) or 0.0


def billed() -> float:
    return REGISTRY.get_sample_value("billing_readings_total", {"result": "billed"}) or 0.0


async def test_the_same_reading_delivered_three_times_is_counted_once(billing, prefix) -> None:
    before = REGISTRY.get_sample_value("billing_readings_total", {"result": "duplicate"}) or 0
    r = reading(kwh=1.25)
    await publish(prefix, [encode_reading(r)] * 3)
    await wait_until(
        lambda: _equals(
            REGISTRY.get_sample_value("billing_readings_total", {"result": "duplicate"}), before + 2
        ),
        what="three deliveries processed",
    )
    assert await billing.ledger.readings.count_documents({}) == 1
    key = SlotKey.of(r)
    assert await billing.ledger.slot_total(key) == Total(1, 1_250_000)
    cached = await billing.cache.month_slots("meter-1", key.month)
    assert (cached.slots, set(cached.changed)) == ({}, {key.start}), "marked, nothing read back"
    assert await billing.cache.latest("meter-1") == r
    assert await ready_count(Topology(prefix).billing_queue) == 0


async def _equals(value: float | None, expected: float) -> bool:
    return value == expected


async def test_redis_slots_equal_mongodb_in_any_order(billing, prefix) -> None:
    readings = [reading(minutes=m, kwh=0.1 * m) for m in range(60)]
    bodies = [encode_reading(r) for r in reversed(readings)] + [
        encode_reading(r) for r in readings[::4]
    ]
    acked_before = acked()
    await publish(prefix, bodies)
    start, end = T - timedelta(hours=1), T + timedelta(hours=2)

    async def all_acked() -> bool:  # the resent ones too: each batch marks its slots
        return acked() - acked_before == len(bodies)

    await wait_until(all_acked, what=f"{len(bodies)} deliveries acked")
    expected: dict = {}
    for r in readings:
        key = SlotKey.of(r)
        expected[key.start] = expected.get(key.start, Total()) + Total(1, r.usage_milliwh)
    rows = await billing.ledger.slots("meter-1", start, end)
    assert {row.start: row.total for row in rows} == expected
    # Billing marks the slots it changed; the first read copies MongoDB into Redis.
    assert await billing.queries.slot_totals("meter-1", start, end) == expected
    cached: dict = {}
    for month in {SlotKey.of(r).month for r in readings}:
        month_slots = await billing.cache.month_slots("meter-1", month)
        assert month_slots.current
        cached |= month_slots.slots
    assert cached == expected
    assert await billing.cache.latest("meter-1") == readings[-1]


async def test_a_poison_message_goes_to_the_dead_letter_queue_with_its_reason(
    billing, prefix
) -> None:
    good = reading(minutes=1)
    await publish(prefix, [b"{not json", b'{"schema_version": 9}', encode_reading(good)])
    topology = Topology(prefix)
    connection = await aio_pika.connect(RABBITMQ_URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(topology.dead_letter_queue, passive=True)
        dead: list[aio_pika.abc.AbstractIncomingMessage] = []

        async def two_dead_letters() -> bool:
            message = await queue.get(no_ack=True, fail=False)
            if message is not None:
                dead.append(message)
            return len(dead) == 2

        await wait_until(two_dead_letters, what="two dead letters")
    reasons = sorted(str(m.headers[REASON_HEADER]) for m in dead)
    assert reasons[0].startswith("body is not JSON")
    assert reasons[1].startswith("unsupported schema_version 9; expected")  # and which
    assert {m.headers["x-original-queue"] for m in dead} == {topology.billing_queue}
    assert {m.body for m in dead} == {b"{not json", b'{"schema_version": 9}'}

    async def good_billed() -> bool:
        return await billing.ledger.slot_total(SlotKey.of(good)) == Total(1, good.usage_milliwh)

    await wait_until(good_billed, what="the good neighbour billed")


@pytest.fixture
async def mongo(tmp_path: Path) -> AsyncIterator[LocalMongo]:
    server = LocalMongo(tmp_path)
    yield server
    if server.running:
        await server.stop()


async def test_a_failed_mongodb_write_is_not_acked_and_is_billed_once_it_succeeds(
    prefix: str, mongo: LocalMongo
) -> None:
    await mongo.start()
    app = BillingApp(settings(prefix, mongodb_url=mongo.url))
    await app.start()
    await mongo.stop()
    retries_before = REGISTRY.get_sample_value("billing_store_retries_total") or 0
    r = reading(kwh=3.5)
    await publish(prefix, [encode_reading(r)])

    async def retrying() -> bool:
        return (REGISTRY.get_sample_value("billing_store_retries_total") or 0) > retries_before

    await wait_until(retrying, what="the write to be retried")
    # Shut billing down while MongoDB is still down: the message was never acked, so the
    # broker holds it again, ready for the next consumer.
    await app.stop()
    assert await ready_once_unconsumed(Topology(prefix).billing_queue) == 1

    await mongo.start()
    app = BillingApp(settings(prefix, mongodb_url=mongo.url))
    await app.start()
    try:

        async def billed_once() -> bool:
            return await app.ledger.slot_total(SlotKey.of(r)) == Total(1, 3_500_000)

        await wait_until(billed_once, what="the reading billed after MongoDB returned")
        assert await app.ledger.readings.count_documents({}) == 1
        await wait_until(lambda: _queue_empty(prefix), what="the message acked")
    finally:
        await app.stop()
        await cleanup(prefix, app)


async def _queue_empty(prefix: str) -> bool:
    return await ready_count(Topology(prefix).billing_queue) == 0


async def test_acked_readings_survive_a_kill_of_the_mongodb_server(
    prefix: str, mongo: LocalMongo
) -> None:
    """Billing acks after MongoDB acknowledged the write; SIGKILL the server at once after
    the last ack, start it on the same data: every acked reading is still billed."""
    await mongo.start()
    app = BillingApp(settings(prefix, mongodb_url=mongo.url))
    await app.start()
    readings = [reading(minutes=-m, device=f"meter-{m % 7}", kwh=0.01 * m) for m in range(300)]
    acked = "consumer_messages_total", {"consumer": "billing", "outcome": "acked"}
    before = REGISTRY.get_sample_value(*acked) or 0
    try:
        await publish(prefix, [encode_reading(r) for r in readings])

        async def all_acked() -> bool:
            return (REGISTRY.get_sample_value(*acked) or 0) - before >= len(readings)

        await wait_until(all_acked, what="300 readings acked")
        await mongo.stop(signal.SIGKILL)
    finally:
        await app.stop()
    await mongo.start()
    ledger = MongoLedger.connect(mongo.url, prefix.strip("-"), timeout_s=10)
    try:
        stored = {key: await ledger.slot_total(key) for key in expected_totals(readings)}
        assert stored == expected_totals(readings)
        assert await ledger.readings.count_documents({}) == len(readings)
    finally:
        ledger.close()
        await cleanup(prefix, app)


async def test_billing_logs_a_dead_letter_with_the_request_id_its_message_carries(
    billing, prefix, caplog: pytest.LogCaptureFixture
) -> None:
    """One grep for a request id finds billing's line too (gateway and ingestion: see
    test_trace_and_reasons)."""
    connection = await aio_pika.connect(RABBITMQ_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(Topology(prefix).exchange)
        message = aio_pika.Message(
            b"{not json",
            headers={"x-request-id": "req-poison-1"},
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        await exchange.publish(message, ROUTING_KEY)

    async def logged() -> bool:
        return any(
            r.getMessage() == "dead-lettering a poison message"
            and getattr(r, "request_id", None) == "req-poison-1"
            for r in caplog.records
        )

    await wait_until(logged, what="billing's dead-letter line with the request id")
