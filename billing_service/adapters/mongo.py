"""MongoDB, the source of truth, through motor. The only module that imports motor.

Idempotency without transactions (FerretDB and standalone MongoDB have none):
1. ``readings``: one document per reading, ``_id`` = reading_id; a repeat is a duplicate key.
2. ``device_slots``: one bucket per device and 15-minute slot with the ids it holds; a reading is
   added by one conditional update (``reading_ids: {$ne: id}``), so no total is counted
   twice; the upsert that creates a bucket is told apart from a redelivery on conflict.
Each write is idempotent on its own, so a crash between them is healed by the redelivery.

Writes to one bucket are serialised inside the process. MongoDB applies a single-document
update atomically, but FerretDB 1.24 (SQLite), the test server, does not: 50 concurrent
``$inc`` on one document left 11. Several billing replicas therefore need real MongoDB.
"""

from __future__ import annotations

import asyncio
import functools
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import ParamSpec, TypeVar

from motor.motor_asyncio import AsyncIOMotorClient, AsyncIOMotorDatabase
from pymongo import ASCENDING, DESCENDING, ReturnDocument
from pymongo.errors import (
    AutoReconnect,
    ConnectionFailure,
    DuplicateKeyError,
    ExecutionTimeout,
    NetworkTimeout,
    ServerSelectionTimeoutError,
    WriteConcernError,
)

from billing_service.domain.ledger import Recorded, SlotKey, Total, TransientFailure
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

    async def record(self, reading: Reading) -> Recorded:
        key = SlotKey.of(reading)
        try:
            try:
                await self.readings.insert_one(
                    {
                        "_id": reading.reading_id,
                        "device_id": reading.device_id,
                        "timestamp": reading.timestamp,
                        "usage_kwh": reading.usage_kwh,
                        "usage_milliwh": reading.usage_milliwh,
                    }
                )
            except DuplicateKeyError:
                pass  # stored by an earlier delivery
            lock = self._bucket_locks.setdefault(key.bucket_id, asyncio.Lock())
            async with lock:
                return await self._add_to_bucket(key, reading)
        except TRANSIENT_ERRORS as error:
            raise TransientFailure(f"MongoDB: {error}") from error

    async def _add_to_bucket(self, key: SlotKey, reading: Reading) -> Recorded:
        """Add the reading to its bucket unless the bucket holds it already."""
        holds_not = {"_id": key.bucket_id, "reading_ids": {"$ne": reading.reading_id}}
        add = {
            "$push": {"reading_ids": reading.reading_id},
            "$inc": {"count": 1, "usage_milliwh": reading.usage_milliwh},
            # $min and $max are idempotent: safe even on a redelivery.
            "$min": {"min_milliwh": reading.usage_milliwh},
            "$max": {"max_milliwh": reading.usage_milliwh},
        }
        create = {"device_id": key.device_id, "start": key.start}
        try:
            bucket = await self.device_slots.find_one_and_update(
                holds_not,
                {**add, "$setOnInsert": create},
                upsert=True,
                return_document=ReturnDocument.AFTER,
            )
        except DuplicateKeyError:
            # The bucket exists: either it holds the reading (a redelivery), or a concurrent
            # first reading created it between our match and insert. Now that it exists, a
            # plain conditional update tells the two apart.
            bucket = await self.device_slots.find_one_and_update(
                holds_not, add, return_document=ReturnDocument.AFTER
            )
            if bucket is None:
                return Recorded(await self.slot_total(key), duplicate=True)
        return Recorded(Total(bucket["count"], bucket["usage_milliwh"]), duplicate=False)

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
