"""Replicas stay exact: 3 billing and 2 analytics processes on the same two queues, as KEDA
would run them, under a load with resends, a duplicate storm and a crashed replica.

Billing is exact across replicas by construction: each reading is `$set` under its id in its
slot document and inserted once under its id (a duplicate key says it was there), single-
document atomic writes that any number of processes may repeat in any order (no lock in a
process, no transaction). That needs a store that applies one document's updates atomically:
the test first measures that on the local server, and says so if it does not (with such a
store billing must not run more than one active consumer).

Analytics deduplicates in each process's memory: a reading whose copies reach two replicas
is counted by both. The test asserts what holds: every delivery is counted once as new or
duplicate by the replica that got it, every distinct reading is counted at least once, and
the sum over replicas exceeds the distinct readings by at most the copies sent twice (the
README's "Kubernetes" section says which figures are per pod; billing's
`billing_readings_total{result="billed"}` is the exact count across pods).
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import aio_pika
import pymongo
import pytest

from billing_service.adapters.mongo import MongoCatalog
from common.energy.v1 import gateway_pb2, gateway_pb2_grpc, reading_pb2
from common.gateway_client import gateway_channel
from common.messages import encode_reading
from common.models import Reading, validate_reading
from common.rabbit import ROUTING_KEY
from tests.conftest import ADMIN_TOKEN, MONGODB_URL, RABBITMQ_URL, ready_count, wait_until
from tests.e2e.conftest import TEST_SETTINGS, Stack
from tests.faults.load import fault_catalog, load_devices, reconciled, steady_load_until

pytestmark = pytest.mark.timeout(600)

BILLING_REPLICAS = 3
ANALYTICS_REPLICAS = 2
# Small prefetches, so that the deliveries spread over the replicas instead of one replica
# taking a whole burst (the defaults are 5000 and 256).
REPLICA_SETTINGS = {
    **TEST_SETTINGS,
    "BILLING_PREFETCH": "100",
    "BILLING_BATCH_SIZE": "50",
    "BILLING_RETRY_MAX_DELAY_S": "1",
    "ANALYTICS_PREFETCH": "50",
}
STORM_ROUNDS = 5
STORM_READINGS = 100
STORM_UNARY = 30
ATOMIC_WRITERS = 50


class Replicas:
    """One release's processes: gateway, ingestion, 3 billing, 2 analytics, one prefix."""

    def __init__(self, prefix: str, log_dir: Path, faults_file: Path) -> None:
        self.main = Stack(prefix=prefix, log_dir=_dir(log_dir / "main"), settings=REPLICA_SETTINGS)
        self.faulty_billing = Stack(
            prefix=prefix,
            log_dir=_dir(log_dir / "billing-faulty"),
            services=("billing_service",),
            # While this file exists, this replica's MongoDB writes fail: it holds its
            # deliveries unacked, retrying, until it is killed.
            settings={**REPLICA_SETTINGS, "BILLING_FAULTS_FILE": str(faults_file)},
        )
        self.other_billing = [
            Stack(
                prefix=prefix,
                log_dir=_dir(log_dir / f"billing-{n}"),
                services=("billing_service",),
                settings=REPLICA_SETTINGS,
            )
            for n in range(2, BILLING_REPLICAS)
        ]
        self.other_analytics = [
            Stack(
                prefix=prefix,
                log_dir=_dir(log_dir / f"analytics-{n}"),
                services=("analytics_service",),
                settings=dict(REPLICA_SETTINGS),
            )
            for n in range(2, ANALYTICS_REPLICAS + 1)
        ]

    @property
    def billing(self) -> list[Stack]:
        """Every billing replica's stack: main's, the others, the one that will crash."""
        return [self.main, *self.other_billing, self.faulty_billing]

    @property
    def analytics(self) -> list[Stack]:
        return [self.main, *self.other_analytics]

    @property
    def stacks(self) -> list[Stack]:
        return [self.main, *self.other_billing, self.faulty_billing, *self.other_analytics]

    async def start(self) -> None:
        await self.main.start()
        billing_addr = f"127.0.0.1:{self.main.ports['BILLING_PORT']}"
        for stack in self.other_analytics:
            stack.settings["ANALYTICS_BILLING_ADDR"] = billing_addr
        await asyncio.gather(*(stack.start() for stack in self.stacks[1:]))

    async def sum(self, stacks: list[Stack], service: str, metric: str, **labels: str) -> float:
        values = await asyncio.gather(*(s.metric(service, metric, labels) for s in stacks))
        return sum(values)

    async def stop(self) -> None:
        for stack in reversed(self.stacks):
            await stack.stop()
        await self.main.clean()


def _dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    path = tmp_path / "catalog.yaml"
    path.write_text(fault_catalog(load_devices()))
    return path


@pytest.fixture
async def replicas(tmp_path: Path, catalog: Path) -> AsyncIterator[Replicas]:
    prefix = f"rep{uuid.uuid4().hex[:8]}-"
    started = Replicas(prefix, tmp_path / "logs", tmp_path / "mongodb-faults")
    ledger = started.main.ledger()
    try:
        text = catalog.read_text()  # noqa: ASYNC240 - a small file, once per test
        await MongoCatalog(ledger.database).save(text, str(catalog))
    finally:
        ledger.close()
    try:
        await started.start()
        yield started
    finally:
        await started.stop()


def _concurrent(writers: int, write: object) -> None:
    """Run ``write(i)`` on ``writers`` threads released at the same moment."""
    barrier = threading.Barrier(writers)

    def run(i: int) -> None:
        barrier.wait(timeout=30)
        write(i)  # type: ignore[operator]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)


def store_applies_single_document_updates_atomically(database: str) -> tuple[bool, str]:
    """50 concurrent `$inc` of one document must leave 50, and of 20 concurrent updates
    conditional on the same value exactly one may match: what billing replicas rely on."""
    with pymongo.MongoClient(MONGODB_URL, serverSelectionTimeoutMS=10_000) as client:
        collection = client[database]["atomicity_probe"]
        try:
            collection.insert_one({"_id": "inc", "n": 0})
            _concurrent(
                ATOMIC_WRITERS, lambda _i: collection.update_one({"_id": "inc"}, {"$inc": {"n": 1}})
            )
            counted = collection.find_one({"_id": "inc"})["n"]  # type: ignore[index]
            collection.insert_one({"_id": "cas", "v": 0})
            matched: list[int] = []
            _concurrent(
                20,
                lambda i: matched.append(
                    collection.update_one(
                        {"_id": "cas", "v": 0}, {"$set": {"v": i + 1}}
                    ).matched_count
                ),
            )
        finally:
            collection.drop()
    atomic = counted == ATOMIC_WRITERS and sum(matched) == 1
    return atomic, f"{ATOMIC_WRITERS} concurrent $inc left {counted}; {sum(matched)} of 20 matched"


def _request(reading: Reading) -> gateway_pb2.SendReadingRequest:
    message = reading_pb2.Reading(
        device_id=reading.device_id, usage_kwh=reading.usage_kwh, reading_id=reading.reading_id
    )
    message.timestamp.FromDatetime(reading.timestamp)
    return gateway_pb2.SendReadingRequest(reading=message)


async def _storm(stack: Stack, readings: list[Reading]) -> int:
    """The same readings again and again: SendReading, SendReadings, and straight onto the
    exchange (as a replayed or duplicated publish would). Returns the deliveries each
    queue got from the broker directly (the gateway's go through ingestion's count)."""
    requests = [_request(r) for r in readings]
    async with gateway_channel(stack.gateway, ADMIN_TOKEN) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        for _ in range(STORM_ROUNDS):
            for request in requests[:STORM_UNARY]:
                await stub.SendReading(request, timeout=10)
            answer = await stub.SendReadings(iter(requests), timeout=30)
            assert answer.accepted == len(requests)
    connection = await aio_pika.connect(RABBITMQ_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(stack.topology.exchange)
        for _ in range(STORM_ROUNDS):  # a round's publishes at once, each confirmed
            await asyncio.gather(
                *(
                    exchange.publish(aio_pika.Message(encode_reading(reading)), ROUTING_KEY)
                    for reading in readings
                )
            )
    return STORM_ROUNDS * len(readings)


def _ledger_readings(ledger: Path) -> list[Reading]:
    entries = [json.loads(line) for line in ledger.read_text().splitlines()]
    return [
        validate_reading(
            e["device_id"],
            datetime.fromisoformat(e["timestamp"]),
            e["usage_kwh"],
            reading_id=e["reading_id"],
            now=datetime.now(UTC),
        )
        for e in entries
    ]


async def test_three_billing_and_two_analytics_replicas_stay_exact(
    replicas: Replicas, catalog: Path, tmp_path: Path
) -> None:
    atomic, measured = await asyncio.to_thread(
        store_applies_single_document_updates_atomically, replicas.main.database
    )
    if not atomic:
        pytest.fail(
            f"the local MongoDB server does not apply single-document updates atomically "
            f"({measured}): several billing replicas could bill a reading twice on it; run "
            "one billing consumer (single active consumer) against such a store"
        )
    print(f"\nstore atomicity: {measured}")

    # 1. Load with resends, while one billing replica holds deliveries it cannot write;
    #    it is then SIGKILLed (what it held goes to the other replicas) and restarted. The
    #    load lasts until the restart, then one round more, however long that takes here.
    faults = Path(replicas.faulty_billing.settings["BILLING_FAULTS_FILE"])
    await asyncio.to_thread(faults.write_text, "timeout")
    ledger = tmp_path / "ledger.jsonl"
    restarted = asyncio.Event()
    load = asyncio.create_task(steady_load_until(replicas.main, ledger, restarted, rate=150))
    faulty = replicas.faulty_billing
    held = 0.0

    async def faulty_replica_holds_deliveries() -> bool:
        nonlocal held
        held = await faulty.metric("BILLING", "consumer_unsettled_messages")
        return held > 0

    await wait_until(faulty_replica_holds_deliveries, 60, "the faulty replica holding deliveries")
    assert await faulty.metric("BILLING", "billing_readings_total", {"result": "billed"}) == 0
    await faulty.stop_service("billing_service", signal.SIGKILL)
    await asyncio.to_thread(faults.unlink)
    await faulty.start_service("billing_service")
    restarted.set()
    summary = await load
    assert summary.ok, f"loggers gave up on readings: {summary.failed_by_code}"

    # 2. A duplicate storm of readings already billed.
    distinct_readings = {r.reading_id: r for r in _ledger_readings(ledger)}
    stormed = list(distinct_readings.values())[:STORM_READINGS]
    direct = await _storm(replicas.main, stormed)

    # 3. Every acknowledged reading billed exactly once, bills exact (through the gateway).
    await reconciled(
        replicas.main,
        ledger,
        catalog,
        f"{BILLING_REPLICAS} billing replicas, one SIGKILLed holding {held:.0f} deliveries",
        f"{held:.0f} deliveries unsettled in the killed replica",
        time.monotonic(),
    )
    distinct = len(distinct_readings)
    stored = await asyncio.to_thread(_count_readings, replicas.main.database)
    assert stored == distinct, f"{stored} readings stored for {distinct} distinct acknowledged"

    # Billing: the queue was shared, the crash's deliveries were billed by the others, and
    # "billed" sums to the distinct readings over the replicas: each reading billed once.
    billed = [
        await s.metric("BILLING", "billing_readings_total", {"result": "billed"})
        for s in replicas.billing
    ]
    redelivered = await replicas.sum(
        replicas.billing, "BILLING", "consumer_redelivered_total", consumer="billing"
    )
    print(
        f"billed per replica {billed} (last: restarted after the kill); redelivered {redelivered}"
    )
    assert all(b > 0 for b in billed[:-1]), f"a replica billed nothing: {billed}"
    assert sum(billed) == distinct, (billed, distinct)
    assert redelivered > 0, "the killed replica's deliveries were not redelivered"

    # 4. Analytics: every delivery counted once as new or duplicate by the replica that got
    #    it; every distinct reading at least once; a repeat counted again only where another
    #    replica had the first copy.
    published = await replicas.main.metric("INGESTION", "ingestion_published_total") + direct

    async def analytics_drained() -> bool:
        handled = await replicas.sum(
            replicas.analytics,
            "ANALYTICS",
            "consumer_readings_total",
            consumer="analytics",
            outcome="acked",
        )
        return (
            handled >= published and await ready_count(replicas.main.topology.analytics_queue) == 0
        )

    await wait_until(analytics_drained, 120, f"analytics to handle {published:.0f} readings")
    new = [await s.metric("ANALYTICS", "energy_readings_total") for s in replicas.analytics]
    again = await replicas.sum(replicas.analytics, "ANALYTICS", "energy_duplicate_readings_total")
    copies = published - distinct
    print(
        f"analytics: {published:.0f} deliveries, {distinct} distinct readings; counted new per "
        f"replica {new} (sum {sum(new):.0f}, {sum(new) - distinct:.0f} above distinct), "
        f"duplicates {again:.0f}"
    )
    assert sum(new) + again == published, (new, again, published)
    assert all(n > 0 for n in new), f"an analytics replica got nothing: {new}"
    assert all(n < distinct for n in new), f"one analytics replica took everything: {new}"
    assert distinct <= sum(new) <= distinct + copies, (new, distinct, copies)


def _count_readings(database: str) -> int:
    with pymongo.MongoClient(MONGODB_URL, serverSelectionTimeoutMS=10_000) as client:
        return client[database]["readings"].count_documents({})
