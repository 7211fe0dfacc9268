"""Benchmark (not a test): read-side latency on a month of one device's readings.

    python -m scripts.bench query [--runs 20] [--interval-s 60]

Writes last month's readings of one device, one every ``--interval-s`` (60: 43,200 in
2,880 slots; 5, a logger of the README's fleet: 518,400, 180 in each slot), through
billing's own write path into a database of its own (``bench_query``, dropped at the end),
then times the queries as billing_service runs them: GetUsage over the month by 1h, by 1d
and 15m, a day by 5m (from raw readings), and the month's bill from MongoDB, from Redis,
and from Redis with one slot changed by billing since (read from MongoDB). MONGODB_URL and
REDIS_URL point it at the servers (make services starts them).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import redis.asyncio as redis
import typer

from billing_service.adapters.mongo import MongoCatalog, MongoLedger
from billing_service.adapters.redis import RedisCache
from billing_service.domain.ledger import SlotKey
from billing_service.queries import BillingQueries, CatalogHolder
from billing_service.settings import BillingSettings
from common.models import validate_reading
from common.settings import load_settings

DEVICE = "bench-meter"
CATALOG = """
default_tariff: flat
tariffs:
  - {id: flat, currency: EUR, time_zone: UTC, energy: {kind: flat, price_per_kwh: "0.3"}}
"""


def main(
    runs: Annotated[int, typer.Option(help="timed runs per query")] = 20,
    interval_s: Annotated[int, typer.Option(help="seconds between the device's readings")] = 60,
) -> None:
    """Print p50 / p95 / max milliseconds per query."""
    asyncio.run(_bench(load_settings(BillingSettings), runs, interval_s))


async def _bench(settings: BillingSettings, runs: int, interval_s: int) -> None:
    # Dropping half a million readings takes the local server longer than billing's 5 s.
    timeout_s = max(settings.mongodb_timeout_s, 120)
    ledger = MongoLedger.connect(settings.mongodb_url, "bench_query", timeout_s)
    cache = RedisCache(settings.redis_url, "bench-query:", settings.redis_timeout_s)
    try:
        await ledger.database.client.drop_database("bench_query")
        await ledger.ensure_indexes()
        now = datetime.now(UTC)
        month_end = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        month_start = (month_end - timedelta(days=1)).replace(day=1)
        started = time.perf_counter()
        count = await _load_month(ledger, month_start, month_end, interval_s, now)
        print(f"loaded {count:,} readings in {time.perf_counter() - started:.1f} s")

        queries = await bench_queries(ledger, cache, CATALOG, settings)
        day_end = month_start + timedelta(days=1)
        cases: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            (
                "usage a month by 1h (720-744 windows)",
                lambda: queries.usage(DEVICE, month_start, month_end, "1h", ""),
            ),
            (
                "usage a month by 1d",
                lambda: queries.usage(DEVICE, month_start, month_end, "1d", ""),
            ),
            (
                "usage a month by 15m (2,880-2,976 windows)",
                lambda: queries.usage(DEVICE, month_start, month_end, "15m", ""),
            ),
            (
                "usage 1 day by 5m (raw readings)",
                lambda: queries.usage(DEVICE, month_start, day_end, "5m", ""),
            ),
        ]
        for name, query in cases:
            _report(name, await _time(query, runs))
        label = month_start.strftime("%Y-%m")
        await clear_redis(settings.redis_url, "bench-query:")
        first = await _time(lambda: queries.device_bill(DEVICE, label), 1)
        _report("month bill, first call (MongoDB, fills Redis)", first)
        _report(
            "month bill from Redis", await _time(lambda: queries.device_bill(DEVICE, label), runs)
        )
        changed = SlotKey(DEVICE, month_start + timedelta(days=3))

        async def bill_after_a_change() -> None:
            await cache.mark_changed([changed], [])
            await queries.device_bill(DEVICE, label)

        _report(
            "month bill, Redis + 1 changed slot from MongoDB",
            await _time(bill_after_a_change, runs),
        )
    finally:
        await ledger.database.client.drop_database("bench_query")
        await clear_redis(settings.redis_url, "bench-query:")
        await cache.close()
        ledger.close()


async def _load_month(
    ledger: MongoLedger, start: datetime, end: datetime, interval_s: int, now: datetime
) -> int:
    """One reading every ``interval_s`` in [start, end), recorded as billing records them."""
    count = int((end - start).total_seconds()) // interval_s
    for first in range(1, count + 1, 5000):
        await ledger.record_batch(
            [
                validate_reading(
                    DEVICE,
                    start + timedelta(seconds=n * interval_s),
                    0.01 + (n % 11) / 1000,
                    now=now,
                )
                for n in range(first, min(count, first + 4999) + 1)
            ]
        )
    return count


async def bench_queries(
    ledger: MongoLedger, cache: RedisCache, catalog_text: str, settings: BillingSettings
) -> BillingQueries:
    """Billing's read side on ``ledger``, with ``catalog_text`` stored and loaded."""
    store = MongoCatalog(ledger.database)
    await store.save(catalog_text, "bench catalog")
    catalog = CatalogHolder(store)
    await catalog.refresh()
    return BillingQueries(ledger, cache, catalog, settings.max_usage_buckets)


async def clear_redis(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    keys = [key async for key in client.scan_iter(f"{prefix}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


async def _time(query: Callable[[], Awaitable[Any]], runs: int) -> list[float]:
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        await query()
        timings.append((time.perf_counter() - started) * 1000)
    return timings


def _report(name: str, timings: list[float]) -> None:
    timings.sort()
    p95 = timings[min(len(timings) - 1, int(len(timings) * 0.95))]
    print(
        f"{name:48s} p50 {statistics.median(timings):8.1f} ms   p95 {p95:8.1f} ms   "
        f"max {timings[-1]:8.1f} ms   ({len(timings)} runs)"
    )
