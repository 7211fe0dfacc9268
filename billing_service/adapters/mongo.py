"""MongoDB, the source of truth, through motor. The only module that imports motor.

Idempotency without transactions (FerretDB and standalone MongoDB have none):
1. ``readings``: one document per reading, ``_id`` = reading_id; a repeat is a duplicate key.
2. ``device_days``: one bucket per device and UTC day with the ids it holds; a reading is
   added by one conditional update (``reading_ids: {$ne: id}``), so no total is counted
   twice; the upsert that creates a bucket is told apart from a redelivery on conflict.
Each write is idempotent on its own, so a crash between them is healed by the redelivery.

Writes to one bucket are serialised inside the process. MongoDB applies a single-document
update atomically, but FerretDB 1.24 (SQLite), the test server, does not: 50 concurrent
``$inc`` on one document left 11. Several billing replicas therefore need real MongoDB.
"""

from __future__ import annotations

import asyncio
import weakref
from datetime import UTC

from motor.motor_asyncio import AsyncIOMotorClient, AsyncIOMotorDatabase
from pymongo import ASCENDING, DESCENDING
from pymongo.errors import (
    AutoReconnect,
    ConnectionFailure,
    DuplicateKeyError,
    ExecutionTimeout,
    NetworkTimeout,
    ServerSelectionTimeoutError,
    WriteConcernError,
)

from billing_service.domain.ledger import DayKey, DayTotal, Recorded, TransientFailure
from common.models import Reading

TRANSIENT_ERRORS = (
    AutoReconnect,
    ConnectionFailure,
    ExecutionTimeout,
    NetworkTimeout,
    ServerSelectionTimeoutError,
    WriteConcernError,
)


class MongoLedger:
    """Readings and per-device daily buckets in MongoDB."""

    def __init__(self, database: AsyncIOMotorDatabase) -> None:
        self.database = database
        self._bucket_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        self.readings = database["readings"]
        self.device_days = database["device_days"]

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
            await self.device_days.create_index([("device_id", ASCENDING), ("month", ASCENDING)])
        except TRANSIENT_ERRORS as error:
            raise TransientFailure(f"MongoDB: {error}") from error

    async def record(self, reading: Reading) -> Recorded:
        key = DayKey.of(reading)
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
                duplicate = not await self._add_to_bucket(key, reading)
                return Recorded(await self.day_total(key), duplicate)
        except TRANSIENT_ERRORS as error:
            raise TransientFailure(f"MongoDB: {error}") from error

    async def _add_to_bucket(self, key: DayKey, reading: Reading) -> bool:
        """Add the reading to its bucket unless it holds it already; True if it was added."""
        holds_not = {"_id": key.bucket_id, "reading_ids": {"$ne": reading.reading_id}}
        add = {
            "$push": {"reading_ids": reading.reading_id},
            "$inc": {"count": 1, "usage_milliwh": reading.usage_milliwh},
        }
        try:
            await self.device_days.update_one(
                holds_not,
                {**add, "$setOnInsert": {"device_id": key.device_id, "day": key.day,
                                         "month": key.month}},
                upsert=True,
            )
            return True
        except DuplicateKeyError:
            # The bucket exists: either it holds the reading (a redelivery), or a concurrent
            # first reading created it between our match and insert. Now that it exists, a
            # plain conditional update tells the two apart.
            result = await self.device_days.update_one(holds_not, add)
            return result.modified_count == 1

    async def day_total(self, key: DayKey) -> DayTotal:
        document = await self.device_days.find_one(
            {"_id": key.bucket_id}, projection={"count": 1, "usage_milliwh": 1}
        )
        if document is None:
            return DayTotal()
        return DayTotal(count=document["count"], usage_milliwh=document["usage_milliwh"])

    async def month_total(self, device_id: str, month: str) -> DayTotal:
        """Sum of the device's buckets in a month (YYYY-MM, UTC)."""
        # At most 31 buckets: summed here rather than by $group, whose $sum FerretDB 1.24
        # answers with 0 for these integer fields.
        count = milliwh = 0
        async for bucket in self.device_days.find(
            {"device_id": device_id, "month": month}, projection={"count": 1, "usage_milliwh": 1}
        ):
            count += bucket["count"]
            milliwh += bucket["usage_milliwh"]
        return DayTotal(count=count, usage_milliwh=milliwh)

    async def latest(self, device_id: str) -> Reading | None:
        document = await self.readings.find_one(
            {"device_id": device_id}, sort=[("timestamp", DESCENDING), ("_id", DESCENDING)]
        )
        if document is None:
            return None
        timestamp = document["timestamp"]
        return Reading(
            device_id=document["device_id"],
            # motor is tz_aware; mongomock hands back naive UTC datetimes
            timestamp=timestamp.replace(tzinfo=UTC) if timestamp.tzinfo is None else timestamp,
            usage_kwh=document["usage_kwh"],
            reading_id=document["_id"],
        )

    def close(self) -> None:
        self.database.client.close()
