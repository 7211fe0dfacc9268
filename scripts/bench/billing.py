"""Benchmark (not a test): how fast billing_service drains its queue into MongoDB and Redis.

    python -m scripts.bench billing [--readings 5000] [--devices 200] [--old-slots 50000]
                                    [--profile billing.txt]

Publishes ``--readings`` valid readings (``--devices`` devices, one reading per device every
``--interval-s`` seconds, in time order) onto a topology of its own (prefix
``bench-billing.``), then starts ``python -m billing_service`` on it (database
``bench_billing``, Redis prefix ``bench-billing:``) and times the drain: from the moment
billing's consumer appears on the queue until billing has acked every reading. It then
checks that MongoDB holds each reading once and that the slot counts add up, prints
readings/s, the ratio to the broker's own consume rate measured first in the same run
(aio-pika, one consumer acking every 500), the CPU seconds billing and the MongoDB server
used, and removes everything it made. ``--old-slots N`` stores N older slot documents (and
one reading each) first, so the drain writes into a collection that is not empty.

``--profile PATH`` samples billing with py-spy (``pip install py-spy``) at 100 Hz during
the drain, writes the collapsed stacks to PATH and prints the functions that cost the
most: ``--profile-mode cpu`` samples the thread holding the GIL (Python's own CPU work),
``wall`` every thread, waiting ones too (where the time goes: mostly waiting for MongoDB).
Billing's own settings (BILLING_BATCH_SIZE, BILLING_PREFETCH, ...) pass through from the
environment; MONGODB_URL, REDIS_URL and RABBITMQ_URL point it at the servers.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import aio_pika
import httpx
import typer

from billing_service.adapters.mongo import MongoLedger
from billing_service.adapters.mongo_batch import ENERGY_MAP
from billing_service.domain.ledger import SlotKey
from billing_service.settings import BillingSettings
from common.messages import CONTENT_TYPE, encode_batch, encode_reading
from common.models import Reading, validate_reading
from common.rabbit import ROUTING_KEY, Topology, declare_topology
from common.settings import load_settings
from common.slots import SLOT, slot_start
from scripts.bench.broker import aio_pika_baseline
from scripts.bench.measure import (
    MONGODB_PROCESS,
    cpu_by_name,
    metric_value,
    process_cpu,
    py_spy_record,
    top_costs,
)
from scripts.bench.stack import Stack

# py-spy's flag for each --profile-mode
PROFILE_MODES = {"cpu": "--gil", "wall": "--idle"}
TOPOLOGY_PREFIX = "bench-billing."
DATABASE = "bench_billing"
REDIS_PREFIX = "bench-billing:"


def main(
    readings: Annotated[int, typer.Option(help="readings to publish and bill")] = 5000,
    devices: Annotated[int, typer.Option(help="distinct devices")] = 200,
    interval_s: Annotated[float, typer.Option(help="seconds between a device's readings")] = 60,
    profile: Annotated[
        Path | None, typer.Option(help="py-spy billing during the drain; collapsed stacks here")
    ] = None,
    profile_mode: Annotated[
        str,
        typer.Option(help="cpu: the thread holding the GIL; wall: every thread, waiting too"),
    ] = "cpu",
    timeout_s: Annotated[float, typer.Option(help="give up on the drain after this long")] = 900,
    old_slots: Annotated[int, typer.Option(help="older slot documents stored first")] = 0,
    message_readings: Annotated[
        int,
        typer.Option(
            min=1,
            help="readings per broker message: 1 publishes version-1 messages, more "
            "version-2 batches as ingestion does (its INGESTION_MAX_MESSAGE_READINGS)",
        ),
    ] = 500,
) -> None:
    """Print the drain rate in readings/s."""
    if profile_mode not in PROFILE_MODES:
        raise typer.BadParameter(f"--profile-mode is one of {', '.join(PROFILE_MODES)}")
    settings = load_settings(BillingSettings)
    asyncio.run(
        _bench(
            settings,
            readings,
            devices,
            interval_s,
            profile,
            profile_mode,
            timeout_s,
            old_slots,
            message_readings,
        )  # fmt: skip
    )


async def _bench(
    settings: BillingSettings,
    count: int,
    devices: int,
    interval_s: float,
    profile: Path | None,
    profile_mode: str,
    timeout_s: float,
    old_slots: int,
    message_readings: int,
) -> None:
    topology = Topology(TOPOLOGY_PREFIX)
    folder = tempfile.TemporaryDirectory(prefix="bench-billing-")
    billing = Stack(
        TOPOLOGY_PREFIX,
        log_dir=Path(folder.name),
        services=("billing_service",),
        database=DATABASE,
        redis_prefix=REDIS_PREFIX,
        rabbitmq_url=settings.rabbitmq_url,
        mongodb_url=settings.mongodb_url,
        redis_url=settings.redis_url,
        settings={"LOG_LEVEL": os.environ.get("LOG_LEVEL", "WARNING")},
    )
    await billing.clean()  # leftovers of an interrupted run
    try:
        broker = await aio_pika_baseline(
            settings.rabbitmq_url, TOPOLOGY_PREFIX, messages=count, window=100, ack_every=500
        )
        print(
            f"broker alone (aio-pika, {count} persistent messages): publish "
            f"{broker['publish_per_s']:,}/s, consume {broker['consume_per_s']:,}/s"
        )
        if old_slots:
            await _store_old_slots(settings, old_slots, devices)
        batch = _readings(count, devices, interval_s)
        started = time.perf_counter()
        await _publish(settings.rabbitmq_url, topology, batch, message_readings)
        print(
            f"published {count} readings of {devices} devices, {message_readings} a message, "
            f"in {time.perf_counter() - started:.1f} s"
        )
        rate = await _drain(billing, count, profile, profile_mode, timeout_s)
        print(
            f"billing drain / broker consume: {rate:,.0f} / {broker['consume_per_s']:,} = "
            f"{rate / broker['consume_per_s']:.2f}"
        )
        await _check_billed(settings, batch)
    finally:
        await billing.clean()
        folder.cleanup()


async def _store_old_slots(settings: BillingSettings, count: int, devices: int) -> None:
    """``count`` slots of the same devices in the weeks before, in the layout billing
    writes (three readings each), and their readings."""
    ledger = MongoLedger.connect(settings.mongodb_url, DATABASE, settings.mongodb_timeout_s)
    began = time.perf_counter()
    first = slot_start(datetime.now(UTC) - timedelta(days=60))
    try:
        for chunk in range(0, count, 5000):
            slots, readings = [], []
            for index in range(chunk, min(count, chunk + 5000)):
                key = SlotKey(f"bench-{index % devices:05d}", first + SLOT * (index // devices))
                energy = {f"old-{index}-{n}": 1000 + n for n in range(3)}
                slots.append(
                    {
                        "_id": key.bucket_id,
                        "device_id": key.device_id,
                        "start": key.start,
                        ENERGY_MAP: energy,
                    }
                )
                readings.append(
                    {
                        "_id": f"old-{index}-0",
                        "device_id": key.device_id,
                        "timestamp": key.start + SLOT,
                        "usage_kwh": 0.001,
                        "usage_milliwh": 1000,
                    }
                )
            await ledger.device_slots.insert_many(slots)
            await ledger.readings.insert_many(readings)
        await ledger.ensure_indexes()
    finally:
        ledger.close()
    print(f"stored {count:,} older slots in {time.perf_counter() - began:.1f} s")


def _readings(count: int, devices: int, interval_s: float) -> list[Reading]:
    """Device by device, tick by tick, ending a minute ago: distinct ids and timestamps."""
    now = datetime.now(UTC)
    ticks = -(-count // devices)
    start = now - timedelta(seconds=60 + ticks * interval_s)
    # From 30 s after a 15-minute boundary: every run fills the same number of slots.
    first = start.replace(minute=start.minute // 15 * 15, second=30, microsecond=0)
    return [
        validate_reading(
            f"bench-{index % devices:05d}",
            first + timedelta(seconds=(index // devices) * interval_s),
            0.001 * (1 + index % 97),
            now=now,
        )
        for index in range(count)
    ]


async def _publish(url: str, topology: Topology, readings: list[Reading], per_message: int) -> None:
    """Publish the readings, ``per_message`` a message (1: version 1, else version 2)."""
    if per_message == 1:
        bodies = [(encode_reading(r), r.reading_id) for r in readings]
    else:
        bodies = [
            (encode_batch(readings[i : i + per_message], f"bench-{i}"), f"bench-{i}")
            for i in range(0, len(readings), per_message)
        ]
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = (await declare_topology(channel, topology)).exchange
        for chunk in range(0, len(bodies), 500):
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(
                            body,
                            content_type=CONTENT_TYPE,
                            message_id=message_id,
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        ),
                        ROUTING_KEY,
                    )
                    for body, message_id in bodies[chunk : chunk + 500]
                )
            )


async def _drain(
    stack: Stack, count: int, profile: Path | None, profile_mode: str, timeout_s: float
) -> float:
    """Bill the queued readings; returns the drain rate in readings/s."""
    spy: asyncio.subprocess.Process | None = None
    queue = stack.topology.billing_queue
    try:
        await stack.start(ready="metrics")
        billing = stack.processes["billing_service"]
        metrics_url = stack.metrics_url("BILLING")
        connection = await aio_pika.connect(stack.rabbitmq_url)
        async with connection, httpx.AsyncClient(timeout=5) as client:
            channel = await connection.channel()
            if profile is not None:
                spy = await py_spy_record(
                    billing.pid, profile, PROFILE_MODES[profile_mode], rate=100,
                    stderr=asyncio.subprocess.DEVNULL,
                )  # fmt: skip
                await asyncio.sleep(0.5)  # attached
            await _until(lambda: _has_consumer(channel, queue), 30, "consumer", billing)
            began, cpu_before = time.perf_counter(), cpu_by_name()
            billing_cpu = process_cpu(billing.pid)
            await _until(
                lambda: _drained(channel, queue, client, metrics_url, count),
                timeout_s,
                "the drain",
                billing,
            )
            took_s, cpu_after = time.perf_counter() - began, cpu_by_name()
            billing_cpu = process_cpu(billing.pid) - billing_cpu
        print(f"billed {count} readings in {took_s:.2f} s: {count / took_s:,.0f} readings/s")
        used = {
            name: cpu_after.get(name, 0.0) - cpu_before.get(name, 0.0)
            for name in (MONGODB_PROCESS, "beam.smp", "redis-server")
        }
        print(
            f"CPU seconds during the drain: billing {billing_cpu:.1f}, "
            + ", ".join(f"{name} {seconds:.1f}" for name, seconds in used.items())
        )
    except BaseException:
        print(stack.logs(), file=sys.stderr)
        raise
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            await asyncio.wait_for(spy.wait(), timeout=60)
        await stack.stop(timeout_s=60)
    if profile is not None:
        _print_profile(profile, profile_mode)
    return count / took_s


def _print_profile(path: Path, mode: str, top: int = 12) -> None:
    """The top functions of the profile: where the samples land (self), and the project's
    functions including what they call; shares of the samples not parked in a selector."""
    leaves, project = top_costs(path.read_text(), count=top)
    what = "holding the GIL" if mode == "cpu" else "of every thread, waiting ones too"
    print(f"profile: samples {what} (py-spy {PROFILE_MODES[mode]}, 100 Hz) in {path}")
    for title, costs in (("self", leaves), ("project, inclusive", project)):
        print(f"  top {top} {title}:")
        for name, percent in costs:
            print(f"    {percent:5.1f}%  {name}")


async def _until(predicate, timeout_s: float, what: str, process) -> None:  # type: ignore[no-untyped-def]
    deadline = time.perf_counter() + timeout_s
    while not await predicate():
        if process.returncode is not None:
            raise RuntimeError(f"billing exited {process.returncode} while waiting for {what}")
        if time.perf_counter() > deadline:
            raise TimeoutError(f"no {what} after {timeout_s} s")
        await asyncio.sleep(0.05)


async def _has_consumer(channel: aio_pika.abc.AbstractChannel, queue: str) -> bool:
    declared = await channel.declare_queue(queue, passive=True)
    return bool(declared.declaration_result.consumer_count)


async def _drained(
    channel: aio_pika.abc.AbstractChannel,
    queue: str,
    client: httpx.AsyncClient,
    url: str,
    count: int,
) -> bool:
    """Every reading acked; billing's /metrics is asked only once none is left to deliver
    (a scrape costs billing CPU: asked 20 times a second all along, it would show)."""
    declared = await channel.declare_queue(queue, passive=True)
    if declared.declaration_result.message_count:
        return False
    text = (await client.get(url)).text
    for outcome in ("acked", "dead_lettered"):
        count -= int(metric_value(text, "consumer_readings_total", {"outcome": outcome}))
    return count <= 0


async def _check_billed(settings: BillingSettings, readings: list[Reading]) -> None:
    ledger = MongoLedger.connect(settings.mongodb_url, DATABASE, settings.mongodb_timeout_s)
    try:
        stored = await ledger.readings.count_documents({"_id": {"$not": {"$regex": "^old-"}}})
        counts = [
            len([key for key in document[ENERGY_MAP] if not key.startswith("old-")])
            async for document in ledger.device_slots.find({}, projection={ENERGY_MAP: 1})
        ]
        counts = [count for count in counts if count]
    finally:
        ledger.close()
    assert stored == len(readings), f"{stored} readings stored, {len(readings)} published"
    assert sum(counts) == len(readings), f"slots count {sum(counts)}, {len(readings)} published"
    print(f"checked: {stored} readings stored once, {len(counts)} slots adding up to {sum(counts)}")
