"""MongoDB, the source of truth, through motor. The only module that imports motor.

Idempotency without transactions (FerretDB and standalone MongoDB have none):
1. ``readings``: one document per reading, ``_id`` = reading_id; a repeat is a duplicate key.
2. ``device_days``: one bucket per device and UTC day with the ids it holds; a reading is
   added by one conditional upsert (``reading_ids: {$ne: id}``), which fails with a
   duplicate key when the bucket already holds it, so no total is counted twice.
Each write is idempotent on its own, so a crash between them is healed by the redelivery.
"""

from __future__ import annotations

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

    def __init__(self, url: str, database: str, timeout_s: float) -> None:
        timeout_ms = int(timeout_s * 1000)
        self._client: AsyncIOMotorClient = AsyncIOMotorClient(
            url,
            serverSelectionTimeoutMS=timeout_ms,
            connectTimeoutMS=timeout_ms,
            socketTimeoutMS=timeout_ms,
            tz_aware=True,
        )
        self._db: AsyncIOMotorDatabase = self._client[database]
        self.readings = self._db["readings"]
        self.device_days = self._db["device_days"]

    async def ensure_indexes(self) -> None:
        try:
            await self.readings.create_index([("device_id", ASCENDING), ("timestamp", ASCENDING)])
            await self.device_days.create_index([("device_id", ASCENDING), ("month", ASCENDING)])
        except TRANSIENT_ERRORS as error:
            raise TransientFailure(f"MongoDB: {error}") from error

    async def record(self, reading: Reading) -> Recorded:
        key = DayKey.of(reading)
        duplicate = False
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
            try:
                await self.device_days.update_one(
                    {"_id": key.bucket_id, "reading_ids": {"$ne": reading.reading_id}},
                    {
                        "$push": {"reading_ids": reading.reading_id},
                        "$inc": {"count": 1, "usage_milliwh": reading.usage_milliwh},
                        "$setOnInsert": {
                            "device_id": key.device_id,
                            "day": key.day,
                            "month": key.month,
                        },
                    },
                    upsert=True,
                )
            except DuplicateKeyError:
                duplicate = True  # the bucket already holds it: counted by an earlier delivery
            return Recorded(await self.day_total(key), duplicate)
        except TRANSIENT_ERRORS as error:
            raise TransientFailure(f"MongoDB: {error}") from error

    async def day_total(self, key: DayKey) -> DayTotal:
        document = await self.device_days.find_one(
            {"_id": key.bucket_id}, projection={"count": 1, "usage_milliwh": 1}
        )
        if document is None:
            return DayTotal()
        return DayTotal(count=document["count"], usage_milliwh=document["usage_milliwh"])

    async def month_total(self, device_id: str, month: str) -> DayTotal:
        """Sum of the device's buckets in a month (YYYY-MM, UTC)."""
        pipeline = [
            {"$match": {"device_id": device_id, "month": month}},
            {"$group": {"_id": None, "count": {"$sum": "$count"},
                        "usage_milliwh": {"$sum": "$usage_milliwh"}}},
        ]
        async for row in self.device_days.aggregate(pipeline):
            return DayTotal(count=row["count"], usage_milliwh=row["usage_milliwh"])
        return DayTotal()

    async def latest(self, device_id: str) -> Reading | None:
        document = await self.readings.find_one(
            {"device_id": device_id}, sort=[("timestamp", DESCENDING), ("_id", DESCENDING)]
        )
        if document is None:
            return None
        return Reading(
            device_id=document["device_id"],
            timestamp=document["timestamp"].astimezone(UTC),
            usage_kwh=document["usage_kwh"],
            reading_id=document["_id"],
        )

    def close(self) -> None:
        self._client.close()
