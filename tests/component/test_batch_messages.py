"""Messages of both schema versions through the real RabbitMQ, MongoDB-wire server and Redis.

A version-2 message carries a batch of readings. Billing must still bill each reading once
(repeated inside a batch, across messages, across versions), bill the valid readings of a
batch that holds an invalid one and dead-letter that one alone as a version-1 message with
its reason, which ``make dlq`` lists and ``make dlq-replay`` bills once its cause is fixed.
Analytics counts per reading, from either version, a repeat once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta

import aio_pika
import pytest
from prometheus_client import REGISTRY

from analytics_service.app import AnalyticsApp
from analytics_service.settings import AnalyticsSettings
from billing_service.app import BillingApp
from common.consumer import BATCH_ID_HEADER, ORIGINAL_QUEUE_HEADER
from common.messages import CONTENT_TYPE, encode_batch, encode_reading
from common.models import Reading, validate_reading
from common.rabbit import REASON_HEADER, ROUTING_KEY, Topology
from scripts import dlq
from tests.component.test_billing import NOW, T, cleanup, settings
from tests.component.test_billing_batch import Apps, declare, stored
from tests.conftest import (
    RABBITMQ_URL,
    delete_topology,
    expected_totals,
    free_port,
    ready_once_unconsumed,
    wait_until,
)

pytestmark = pytest.mark.component


def reading(minutes: int, device: str = "meter-1", kwh: float = 0.25) -> Reading:
    return validate_reading(device, T + timedelta(minutes=minutes), kwh, now=NOW)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def counters(consumer: str = "billing") -> dict[str, float]:
    return {
        "billed": sample("billing_readings_total", result="billed"),
        "duplicate": sample("billing_readings_total", result="duplicate"),
        **{
            f"{unit}_{outcome}": sample(
                f"consumer_{unit}_total", consumer=consumer, outcome=outcome
            )
            for unit in ("messages", "readings")
            for outcome in ("acked", "dead_lettered", "requeued")
        },
    }


class Grown:
    """The counters' growth since it was made."""

    def __init__(self, consumer: str = "billing") -> None:
        self._consumer = consumer
        self._before = counters(consumer)

    def __call__(self) -> dict[str, float]:
        now = counters(self._consumer)
        return {name: now[name] - self._before[name] for name in now}

    async def reached(self, **minimum: float) -> bool:
        grown = self()
        return all(grown[name] >= value for name, value in minimum.items())


async def publish(prefix: str, messages: Sequence[tuple[bytes, str]], dead: bool = False) -> None:
    """Publish ``(body, message_id)`` pairs as ingestion does (or, with ``dead``, to the
    dead-letter exchange, as if a consumer had dead-lettered them)."""
    topology = Topology(prefix)
    connection = await aio_pika.connect(RABBITMQ_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        name = topology.dead_letter_exchange if dead else topology.exchange
        exchange = await channel.get_exchange(name)
        for body, message_id in messages:
            headers = {REASON_HEADER: "a bug, now fixed"} if dead else {}
            message = aio_pika.Message(
                body,
                headers=headers,
                content_type=CONTENT_TYPE,
                message_id=message_id,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            await exchange.publish(message, ROUTING_KEY)


def v1(r: Reading) -> tuple[bytes, str]:
    return encode_reading(r), r.reading_id


def v2(batch_id: str, readings: Sequence[Reading]) -> tuple[bytes, str]:
    return encode_batch(readings, batch_id), batch_id


def with_invalid(batch_id: str, readings: Sequence[Reading], at: int, **bad: object) -> bytes:
    """A version-2 body of ``readings`` with the element at ``at`` changed by ``bad``."""
    data = json.loads(encode_batch(readings, batch_id))
    data["readings"][at].update(bad)
    return json.dumps(data).encode()


async def dead_letters(prefix: str) -> list[dict[str, object]]:
    """What ``make dlq`` lists (every dead letter stays in the queue)."""
    found: list[dict[str, object]] = []

    async def keep(_declared: object, messages: list[aio_pika.abc.AbstractIncomingMessage]) -> None:
        found.extend(dlq._describe(message) | {"raw": message} for message in messages)

    await dlq._dead_letters(dlq.BrokerSettings(topology_prefix=prefix), keep, 100)
    return found


@pytest.fixture
async def apps(prefix: str) -> AsyncIterator[Apps]:
    """The billing apps of a test (as test_billing_batch's fixture of the same name)."""
    started = Apps(prefix)
    yield started
    for app in list(started.running):
        await started.stop(app)
    await cleanup(prefix, BillingApp(settings(prefix)))


async def test_repeats_inside_a_batch_and_across_messages_are_billed_once(prefix, apps) -> None:
    r1, r2, r3, r4 = reading(1), reading(2), reading(20, kwh=1.5), reading(21, device="meter-2")
    messages = [
        v2("b-1", [r1, r2, r1, r3]),
        v2("b-2", [r3, r4, r2, r4]),  # with b-1 in the first batch: 8 readings
        v2("b-3", [r4, r1]),
        v2("b-4", [r2]),
        v2("b-1", [r1, r2, r1, r3]),  # the first message, resent
    ]
    await declare(prefix)
    await publish(prefix, messages)
    grown = Grown()
    app = await apps.start(batch_size=8, prefetch=2, batch_linger_s=0.5)
    await wait_until(lambda: grown.reached(messages_acked=5), what="five messages acked")
    assert grown() == {
        "billed": 4,
        "duplicate": 11,
        "messages_acked": 5,
        "messages_dead_lettered": 0,
        "messages_requeued": 0,
        "readings_acked": 15,
        "readings_dead_lettered": 0,
        "readings_requeued": 0,
    }
    everything = [r1, r2, r3, r4]
    assert await stored(app, expected_totals(everything)) == expected_totals(everything)
    assert await app.ledger.readings.count_documents({}) == 4
    await apps.stop(app)
    assert await ready_once_unconsumed(Topology(prefix).billing_queue) == 0


async def test_a_batch_with_one_invalid_element_bills_the_rest_and_dead_letters_it_alone(
    prefix, apps
) -> None:
    goods = [reading(1), reading(2), reading(3, device="meter-2")]
    bad = reading(4)
    batch = with_invalid("b-mixed", [goods[0], bad, *goods[1:]], at=1, usage_kwh=-2.5)
    grown = Grown()
    app = await apps.start()
    await publish(prefix, [(batch, "b-mixed")])
    await wait_until(lambda: grown.reached(messages_acked=1), what="the batch acked")
    assert grown() == {
        "billed": 3,
        "duplicate": 0,
        "messages_acked": 1,
        "messages_dead_lettered": 0,
        "messages_requeued": 0,
        "readings_acked": 3,
        "readings_dead_lettered": 1,
        "readings_requeued": 0,
    }
    assert await stored(app, expected_totals(goods)) == expected_totals(goods)
    [dead] = await dead_letters(prefix)
    raw = dead.pop("raw")
    assert dead == {
        "message_id": bad.reading_id,
        "reason": "readings[1] of batch 'b-mixed': invalid reading: usage_kwh: is -2.5; "
        "energy used in an interval cannot be negative",
        "queue": Topology(prefix).billing_queue,
        "from_batch": "b-mixed",
        "holds": f"reading {bad.reading_id!r}",
        "body": raw.body[:200].decode(),
    }
    assert json.loads(raw.body) == json.loads(encode_reading(bad)) | {"usage_kwh": -2.5}
    assert raw.content_type == CONTENT_TYPE
    assert raw.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert raw.headers[BATCH_ID_HEADER] == "b-mixed"
    assert raw.headers[ORIGINAL_QUEUE_HEADER] == Topology(prefix).billing_queue
    await apps.stop(app)
    assert await ready_once_unconsumed(Topology(prefix).billing_queue) == 0


async def test_dead_letters_of_both_versions_are_listed_and_replayed_once_fixed(
    prefix, apps, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An element over a (too strict) usage limit, dead-lettered alone, and a whole
    version-2 message dead-lettered by a bug: both listed, both billed once replayed."""
    goods, big = [reading(1), reading(2)], reading(3, kwh=50)
    lost = [reading(30, device="meter-3"), reading(31, device="meter-3", kwh=0.5)]
    grown = Grown()
    strict = await apps.start(max_usage_kwh=10)
    await publish(prefix, [v2("b-mixed", [goods[0], big, goods[1]])])
    await publish(prefix, [v2("b-lost", lost)], dead=True)
    await wait_until(lambda: grown.reached(messages_acked=1), what="the batch acked")
    listed = sorted(await dead_letters(prefix), key=lambda d: str(d["message_id"]))
    assert [(d["message_id"], d["holds"], d["from_batch"]) for d in listed] == sorted(
        [(big.reading_id, f"reading {big.reading_id!r}", "b-mixed"),
         ("b-lost", "batch 'b-lost' of 2 readings", "")]
    )  # fmt: skip
    reasons = {d["message_id"]: d["reason"] for d in listed}
    assert "usage_kwh: is 50 kWh, above the limit of 10 kWh" in str(reasons[big.reading_id])
    assert reasons["b-lost"] == "a bug, now fixed"
    await apps.stop(strict)

    fixed = await apps.start()  # the default limit: 1,000,000 kWh
    monkeypatch.setenv("TOPOLOGY_PREFIX", prefix)
    await asyncio.to_thread(dlq.replay, None, True)
    await wait_until(lambda: grown.reached(billed=5), what="the replayed readings billed")
    assert await dead_letters(prefix) == []
    everything = [*goods, big, *lost]
    assert await stored(fixed, expected_totals(everything)) == expected_totals(everything)
    assert (grown()["billed"], grown()["duplicate"]) == (5, 0)


async def test_versions_1_and_2_mixed_in_one_queue_are_all_billed_once(prefix, apps) -> None:
    """A rolling upgrade: old publishers send one reading a message, new ones batches,
    some readings both ways (a logger resent them across the upgrade)."""
    readings = [reading(m, device=f"meter-{m % 3}", kwh=0.01 * m) for m in range(1, 41)]
    messages = [v1(r) for r in readings[:15]]
    messages += [v2(f"b-{n}", readings[n : n + 7]) for n in range(10, 40, 7)]
    messages += [v1(r) for r in readings[30:40:2]]
    messages = messages[::2] + messages[1::2]  # interleaved
    sent = sum(len(json.loads(body).get("readings", [None])) for body, _ in messages)
    await declare(prefix)
    await publish(prefix, messages)
    grown = Grown()
    app = await apps.start(batch_size=8, prefetch=10)  # several batches of both kinds
    await wait_until(
        lambda: grown.reached(messages_acked=len(messages)), what="every message acked"
    )
    assert grown() == {
        "billed": len(readings),
        "duplicate": sent - len(readings),
        "messages_acked": len(messages),
        "messages_dead_lettered": 0,
        "messages_requeued": 0,
        "readings_acked": sent,
        "readings_dead_lettered": 0,
        "readings_requeued": 0,
    }
    assert await stored(app, expected_totals(readings)) == expected_totals(readings)
    assert await app.ledger.readings.count_documents({}) == len(readings)


@pytest.fixture
async def analytics(prefix: str) -> AsyncIterator[AnalyticsApp]:
    app = AnalyticsApp(
        AnalyticsSettings(  # type: ignore[call-arg]
            rabbitmq_url=RABBITMQ_URL,
            topology_prefix=prefix,
            billing_addr=f"127.0.0.1:{free_port()}",  # no billing: analytics counts anyway
            billing_timeout_s=1,
            shutdown_grace_s=1,
        )
    )
    await app.start()
    yield app
    await app.stop()
    await delete_topology(prefix)


async def test_analytics_counts_per_reading_from_either_version(prefix, analytics) -> None:
    r1, r2, r3, r4 = (reading(m, device=f"meter-{m}", kwh=0.5 * m) for m in (1, 2, 3, 4))
    messages = [
        v1(r1),
        v2("b-1", [r2, r3, r2]),  # a repeat inside the batch
        v2("b-2", [r1, r4]),  # r1 again, across versions
        (with_invalid("b-3", [r3, r4], at=0, usage_kwh="lots"), "b-3"),  # r4 a third time
        v1(r3),
    ]
    before = {
        name: sample(name)
        for name in (
            "energy_readings_total",
            "energy_duplicate_readings_total",
            "energy_received_kwh_total",
        )
    }
    grown = Grown("analytics")
    await publish(prefix, messages)
    await wait_until(lambda: grown.reached(messages_acked=5), what="five messages acked")
    assert sample("energy_readings_total") - before["energy_readings_total"] == 4
    assert (
        sample("energy_duplicate_readings_total") - before["energy_duplicate_readings_total"] == 4
    )
    kwh = sample("energy_received_kwh_total") - before["energy_received_kwh_total"]
    assert kwh == pytest.approx(0.5 + 1 + 1.5 + 2)
    assert grown()["readings_acked"] == 8 and grown()["readings_dead_lettered"] == 1
    assert sorted(analytics.tally.active_devices()) == ["meter-1", "meter-2", "meter-3", "meter-4"]
