"""Benchmark (not a test): an open bill's read time against the account's issued months.

    python -m scripts.bench bills [--months 12] [--interval-s 900] [--runs 3]

Writes one device's readings, one every ``--interval-s`` (900: a 15-minute meter), from
``--months`` months back to now, through billing's own write path into a database of its
own (``bench_bills``, dropped at the end). The readings count as arrived on time (no late
mark) and marks as complete for long. It then closes the months one by one, as billing
does, and after each close times the open month's device bill: as billing reads it (only
the issued months a late write touched are recomputed) and recomputing every issued
month (billing before late marks). Last, one late reading into an issued month. Redis is
warm for both. MONGODB_URL and REDIS_URL point it at the servers (make services).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer

from billing_service.adapters.mongo import LATE_MARKS, MongoLedger
from billing_service.adapters.redis import RedisCache
from billing_service.closing import BillCloser, DeviceBiller
from billing_service.settings import BillingSettings
from common.models import validate_reading
from common.settings import load_settings
from scripts.bench.query import bench_queries, clear_redis

DEVICE, ACCOUNT, DATABASE, PREFIX = "bench-meter", "bench-account", "bench_bills", "bench-bills:"
CATALOG = f"""
default_tariff: flat
tariffs:
  - {{id: flat, currency: EUR, time_zone: UTC, energy: {{kind: flat, price_per_kwh: "0.3"}}}}
accounts: [{{id: {ACCOUNT}, name: Bench}}]
devices: [{{id: {DEVICE}, account: {ACCOUNT}, site: bench, tariff: flat}}]
"""


def main(
    months: Annotated[int, typer.Option(help="months of readings before this one")] = 12,
    interval_s: Annotated[int, typer.Option(help="seconds between the device's readings")] = 900,
    runs: Annotated[int, typer.Option(help="timed reads per figure (the fastest is shown)")] = 3,
) -> None:
    """Print the open bill's read time after each issued month, both ways."""
    asyncio.run(_bench(load_settings(BillingSettings), months, interval_s, runs))


async def _bench(settings: BillingSettings, months: int, interval_s: int, runs: int) -> None:
    timeout_s = max(settings.mongodb_timeout_s, 120)  # dropping the database takes long here
    ledger = MongoLedger.connect(settings.mongodb_url, DATABASE, timeout_s)
    cache = RedisCache(settings.redis_url, PREFIX, settings.redis_timeout_s)
    try:
        await ledger.database.client.drop_database(DATABASE)
        await ledger.ensure_indexes()
        now = datetime.now(UTC)
        start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        for _ in range(months):
            start = (start - timedelta(days=1)).replace(day=1)
        count = await _load(ledger, start, now, interval_s)
        await ledger.late_marks.delete_many({})  # they arrived on time
        await ledger.database["meta"].update_one(
            {"_id": LATE_MARKS}, {"$set": {"since": start - timedelta(days=30)}}
        )
        print(f"loaded {count:,} readings of {DEVICE}, {months} months and this one")
        queries = await bench_queries(ledger, cache, CATALOG, settings)
        closer = BillCloser(queries.biller, queries.bills, lambda: queries.catalog_snapshot()[1])
        recompute_all = DeviceBiller(queries.slot_energy)  # no late marks
        label = now.strftime("%Y-%m")

        async def row(issued: int, note: str) -> None:
            marked = await _fastest(lambda: queries.device_bill(DEVICE, label), runs)
            queries.biller, kept = recompute_all, queries.biller
            try:
                every = await _fastest(lambda: queries.device_bill(DEVICE, label), runs)
            finally:
                queries.biller = kept
            print(f"{issued:>6}  {marked:>12.0f}  {every:>18.0f}  {note}")

        print(f"{'issued':>6}  {'late marks ms':>12}  {'every month ms':>18}  (open {label})")
        await row(0, "")
        month = start
        for issued in range(1, months + 1):
            began = time.perf_counter()
            await closer.close_period(ACCOUNT, month.strftime("%Y-%m"))
            closing_ms = (time.perf_counter() - began) * 1000
            await row(issued, f"closing {month:%Y-%m} took {closing_ms:.0f} ms")
            month = (month + timedelta(days=32)).replace(day=1)
        late = validate_reading(DEVICE, start + timedelta(days=40, minutes=7), 0.5, now=now)
        await ledger.record_batch([late])
        await row(months, f"after one late reading into {late.timestamp:%Y-%m}")
    finally:
        await ledger.database.client.drop_database(DATABASE)
        await clear_redis(settings.redis_url, PREFIX)
        await cache.close()
        ledger.close()


async def _load(ledger: MongoLedger, start: datetime, end: datetime, interval_s: int) -> int:
    count = int((end - start).total_seconds()) // interval_s
    for first in range(1, count + 1, 5000):
        await ledger.record_batch(
            [
                validate_reading(DEVICE, start + timedelta(seconds=n * interval_s), 0.01, now=end)
                for n in range(first, min(count, first + 4999) + 1)
            ]
        )
    return count


async def _fastest(call: Callable[[], Awaitable[object]], runs: int) -> float:
    best = float("inf")
    for _ in range(runs):
        began = time.perf_counter()
        await call()
        best = min(best, time.perf_counter() - began)
    return best * 1000
