"""Benchmark (not a test): what a MongoDB-wire server does with billing's kind of work.

    python -m scripts.bench store [--url mongodb://127.0.0.1:27017/] [--sizes 1000,10000,50000]

The figures that chose the local server (README, "Which MongoDB runs locally"), measured
on a throwaway database of the server at ``--url``: medians of ``update_one`` by ``_id``
and of billing's slot upsert as the collection grows, an ``$in`` of 500 ids and a
device + time range query at the largest size, then atomicity (50 concurrent ``$inc`` on
one document, 20 concurrent updates conditional on the same value) and one bulk write of
200 upserts. Durability is a test, not a figure: tests/component/test_billing.py kills
the server after billing's acks and counts what survived.
"""

from __future__ import annotations

import statistics
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Annotated

import pymongo
import typer
from pymongo import ASCENDING, UpdateOne

SAMPLES = 50


def main(
    url: Annotated[str, typer.Option(help="the server")] = "mongodb://127.0.0.1:27017/",
    sizes: Annotated[str, typer.Option(help="collection sizes, comma-separated")] = (
        "1000,10000,50000"
    ),
) -> None:
    """Print one line per figure."""
    client: pymongo.MongoClient = pymongo.MongoClient(
        url, serverSelectionTimeoutMS=10_000, socketTimeoutMS=600_000, tz_aware=True
    )
    name = f"bench_store_{uuid.uuid4().hex[:8]}"
    database = client[name]
    try:
        info = client.admin.command("buildInfo")
        print(f"server at {url}: version {info.get('version')}")
        _growth(database, [int(size) for size in sizes.split(",")])
        _atomicity(database)
        _bulk(database)
    finally:
        client.drop_database(name)
        client.close()


def _median_ms(operation, samples: int = SAMPLES) -> float:  # type: ignore[no-untyped-def]
    timings = []
    for index in range(samples):
        began = time.perf_counter()
        operation(index)
        timings.append((time.perf_counter() - began) * 1000)
    return statistics.median(timings)


def _growth(database: pymongo.database.Database, sizes: list[int]) -> None:
    slots = database["device_slots"]
    slots.create_index([("device_id", ASCENDING), ("start", ASCENDING)])
    first = datetime(2026, 1, 1, tzinfo=UTC)
    stored = 0
    for size in sizes:
        documents = [
            {
                "_id": f"d{n % 1000:04d}|{n // 1000}",
                "device_id": f"d{n % 1000:04d}",
                "start": first + timedelta(minutes=15 * (n // 1000)),
                "milliwh": {f"r{n}-{k}": 1000 for k in range(20)},
            }
            for n in range(stored, size)
        ]
        for chunk in range(0, len(documents), 5000):
            slots.insert_many(documents[chunk : chunk + 5000])
        stored = size
        plain = _median_ms(
            lambda i: slots.update_one({"_id": f"d{i:04d}|0"}, {"$set": {"touched": i}})
        )
        upsert = _median_ms(
            lambda i: slots.update_one(
                {"_id": f"d{i:04d}|0"},
                {"$set": {f"milliwh.new-{i}": 5}, "$setOnInsert": {"device_id": f"d{i:04d}"}},
                upsert=True,
            )
        )
        print(
            f"{size:>7,} slots: update_one by _id {plain:.1f} ms, billing's slot upsert "
            f"{upsert:.1f} ms (medians of {SAMPLES})"
        )
    ids = [f"d{n % 1000:04d}|{n // 1000}" for n in range(0, stored, max(1, stored // 500))][:500]
    in_ms = _median_ms(lambda i: list(slots.find({"_id": {"$in": ids}}, {"_id": 1})), 5)
    range_ms = _median_ms(
        lambda i: list(
            slots.find({"device_id": "d0007", "start": {"$gte": first}}, {"milliwh": 0})
            .sort("start", ASCENDING)
            .limit(100)
        ),
        5,
    )
    print(
        f"{stored:>7,} slots: find $in {len(ids)} ids {in_ms:.0f} ms, device + range sorted "
        f"limit 100 {range_ms:.0f} ms (medians of 5)"
    )


def _atomicity(database: pymongo.database.Database) -> None:
    counters = database["counters"]
    finals, matches = [], []
    for round_number in range(5):
        finals.append(_concurrent_incs(counters, f"inc{round_number}"))
        matches.append(_concurrent_conditionals(counters, f"if{round_number}"))
    print(f"50 concurrent $inc on one document, final value in 5 rounds: {finals}")
    print(f"20 concurrent updates conditional on count 0, matches in 5 rounds: {matches}")


def _concurrent_incs(counters: pymongo.collection.Collection, key: str) -> int:
    counters.insert_one({"_id": key, "n": 0})
    with ThreadPoolExecutor(50) as pool:
        list(pool.map(lambda _: counters.update_one({"_id": key}, {"$inc": {"n": 1}}), range(50)))
    return int(counters.find_one({"_id": key})["n"])


def _concurrent_conditionals(counters: pymongo.collection.Collection, key: str) -> int:
    counters.insert_one({"_id": key, "count": 0})

    def update(writer: int) -> int:
        query, change = {"_id": key, "count": 0}, {"$set": {"count": 1, "by": writer}}
        return counters.update_one(query, change).matched_count

    with ThreadPoolExecutor(20) as pool:
        return sum(pool.map(update, range(20)))


def _bulk(database: pymongo.database.Database) -> None:
    slots = database["bulk"]
    operations = [
        UpdateOne({"_id": f"s{n}"}, {"$set": {f"milliwh.r{n}": n}}, upsert=True) for n in range(200)
    ]
    began = time.perf_counter()
    slots.bulk_write(operations, ordered=False)
    print(f"one bulk_write of 200 upserts: {(time.perf_counter() - began) * 1000:.0f} ms")
