"""MongoDB, the source of truth, through motor. The only module that imports motor.

Idempotency without transactions (FerretDB and standalone MongoDB have none):
1. ``readings``: one document per reading, ``_id`` = reading_id; a repeat is a duplicate key.
2. ``device_slots``: one bucket per device and 15-minute slot with the ids it holds and their
   ``count``. A batch reads its buckets, then adds to each the readings it lacks with one
   update conditional on the ``count`` it read (``count`` grows with every id added, so an
   unchanged count means unchanged ids): no total is counted twice, and an update that
   finds the bucket moved adds nothing and is planned again from a fresh read. A new
   bucket is inserted, so a concurrent creator shows up as a duplicate key. (The batch
   writes are in ``mongo_batch``.)
Each write is idempotent on its own, so a crash between or during them is healed by the
redelivery: the readings already stored are duplicate keys, the ids already in a bucket are
left out of its update.

Writes to one bucket are serialised inside the process. MongoDB applies a single-document
update atomically, but FerretDB 1.24 (SQLite), the test server, does not: 50 concurrent
``$inc`` on one document left 11. Several billing replicas therefore need real MongoDB.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import ParamSpec, TypeVar

from motor.motor_asyncio import AsyncIOMotorClient, AsyncIOMotorDatabase
from pymongo import ASCENDING, DESCENDING
from pymongo.errors import (
    AutoReconnect,
    ConnectionFailure,
    ExecutionTimeout,
    NetworkTimeout,
    ServerSelectionTimeoutError,
    WriteConcernError,
)

from billing_service.adapters.mongo_batch import add_to_buckets, store_readings
from billing_service.domain.ledger import BatchRecorded, SlotKey, Total, TransientFailure
from common.models import Reading

TRANSIENT_ERRORS = (
    AutoReconnect,
    ConnectionFailure,
    ExecutionTimeout,
    NetworkTimeout,
    ServerSelectionTimeoutError,
    WriteConcernError,
)


@dataclass(frozen=True)
class SlotRow:
    """One stored slot: its energy and the smallest and largest reading in it."""

    start: datetime
    total: Total
    min_milliwh: int
    max_milliwh: int


def _utc(value: datetime) -> datetime:
    """motor is tz_aware; mongomock hands back naive UTC datetimes."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


P = ParamSpec("P")
R = TypeVar("R")


def _transient(method: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Driver errors that a retry can cure become TransientFailure (UNAVAILABLE for queries)."""

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(*args, **kwargs)
        except TRANSIENT_ERRORS as error:
            raise TransientFailure(f"MongoDB: {error}") from error

    return wrapper


def _reading(document: dict) -> Reading:  # type: ignore[type-arg]
    return Reading(
        device_id=document["device_id"],
        timestamp=_utc(document["timestamp"]),
        usage_kwh=document["usage_kwh"],
        reading_id=document["_id"],
    )


class MongoLedger:
    """Readings and per-device daily buckets in MongoDB."""

    def __init__(self, database: AsyncIOMotorDatabase) -> None:
        self.database = database
        self._bucket_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        self.readings = database["readings"]
        self.device_slots = database["device_slots"]

    @classmethod
    def connect(cls, url: str, database: str, timeout_s: float) -> MongoLedger:
        """A ledger on its own client, with ``timeout_s`` on selection, connect and socket."""
        timeout_ms = int(timeout_s * 1000)
        client: AsyncIOMotorClient = AsyncIOMotorClient(
            url,
            serverSelectionTimeoutMS=timeout_ms,
            connectTimeoutMS=timeout_ms,
            socketTimeoutMS=timeout_ms,
            tz_aware=True,
        )
        return cls(client[database])

    async def ensure_indexes(self) -> None:
        try:
            await self.readings.create_index([("device_id", ASCENDING), ("timestamp", ASCENDING)])
            await self.device_slots.create_index([("device_id", ASCENDING), ("start", ASCENDING)])
        except TRANSIENT_ERRORS as error:
            raise TransientFailure(f"MongoDB: {error}") from error

    async def record_batch(self, readings: Sequence[Reading]) -> BatchRecorded:
        """Store the readings and add each to its slot bucket once, in a few round trips.

        The ``readings`` documents go in one unordered insert; the buckets are read in one
        query and written in unordered bulk writes of 20 (new buckets in one insert): a few
        round trips, one after the other, however large the batch. Each bucket's write is
        conditional on the ``count`` it was read at, so it adds exactly the readings the
        bucket did not hold then, or nothing.
        """
        groups: dict[SlotKey, list[Reading]] = {}
        for reading in readings:
            groups.setdefault(SlotKey.of(reading), []).append(reading)
        # Always in the same order, so two batches sharing buckets cannot deadlock.
        locks = [
            self._bucket_locks.setdefault(bucket_id, asyncio.Lock())
            for bucket_id in sorted(key.bucket_id for key in groups)
        ]
        try:
            async with contextlib.AsyncExitStack() as held:
                for lock in locks:
                    await held.enter_async_context(lock)
                await store_readings(self.readings, readings)
                return await add_to_buckets(self.device_slots, groups)
        except TRANSIENT_ERRORS as error:
            raise TransientFailure(f"MongoDB: {error}") from error

    @_transient
    async def slot_total(self, key: SlotKey) -> Total:
        document = await self.device_slots.find_one(
            {"_id": key.bucket_id}, projection={"count": 1, "usage_milliwh": 1}
        )
        if document is None:
            return Total()
        return Total(count=document["count"], usage_milliwh=document["usage_milliwh"])

    @_transient
    async def slots(self, device_id: str, start: datetime, end: datetime) -> list[SlotRow]:
        """The device's slots whose start lies in [start, end), in time order."""
        rows = []
        async for bucket in self.device_slots.find(
            {"device_id": device_id, "start": {"$gte": start, "$lt": end}},
            projection={"reading_ids": 0},
            sort=[("start", ASCENDING)],
        ):
            rows.append(
                SlotRow(
                    start=_utc(bucket["start"]),
                    total=Total(bucket["count"], bucket["usage_milliwh"]),
                    min_milliwh=bucket["min_milliwh"],
                    max_milliwh=bucket["max_milliwh"],
                )
            )
        return rows

    @_transient
    async def readings_ending_in(
        self, device_id: str, start: datetime, end: datetime
    ) -> list[tuple[datetime, int]]:
        """(timestamp, milliwh) of readings with start < timestamp <= end."""
        cursor = self.readings.find(
            {"device_id": device_id, "timestamp": {"$gt": start, "$lte": end}},
            projection={"timestamp": 1, "usage_milliwh": 1},
        )
        return [(_utc(doc["timestamp"]), doc["usage_milliwh"]) async for doc in cursor]

    @_transient
    async def readings_page(
        self,
        device_id: str,
        start: datetime | None,
        end: datetime | None,
        after: tuple[datetime, str] | None,
        limit: int,
    ) -> list[Reading]:
        """Readings in timestamp order (then id), from just after ``after``, at most ``limit``."""
        query: dict[str, object] = {"device_id": device_id}
        bounds = {op: value for op, value in (("$gte", start), ("$lt", end)) if value is not None}
        if bounds:
            query["timestamp"] = bounds
        if after is not None:
            query["$or"] = [
                {"timestamp": {"$gt": after[0]}},
                {"timestamp": after[0], "_id": {"$gt": after[1]}},
            ]
        cursor = self.readings.find(
            query, sort=[("timestamp", ASCENDING), ("_id", ASCENDING)], limit=limit
        )
        return [_reading(doc) async for doc in cursor]

    @_transient
    async def latest(self, device_id: str) -> Reading | None:
        document = await self.readings.find_one(
            {"device_id": device_id}, sort=[("timestamp", DESCENDING), ("_id", DESCENDING)]
        )
        return None if document is None else _reading(document)

    def close(self) -> None:
        self.database.client.close()


@dataclass(frozen=True)
class StoredCatalog:
    text: str
    source: str
    loaded_at: datetime


class MongoCatalog:
    """The tariff catalog as loaded by ``make seed``: its YAML text, in one document."""

    def __init__(self, database: AsyncIOMotorDatabase) -> None:
        self._collection = database["catalog"]

    async def load(self) -> StoredCatalog | None:
        try:
            document = await self._collection.find_one({"_id": "current"})
        except TRANSIENT_ERRORS as error:
            raise TransientFailure(f"MongoDB: {error}") from error
        if document is None:
            return None
        return StoredCatalog(document["yaml"], document["source"], _utc(document["loaded_at"]))

    async def save(self, text: str, source: str) -> None:
        await self._collection.replace_one(
            {"_id": "current"},
            {"yaml": text, "source": source, "loaded_at": datetime.now(UTC)},
            upsert=True,
        )
