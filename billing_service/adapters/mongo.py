"""MongoDB, the source of truth: billing's readings, slots and catalog.

Idempotency without transactions or locks (standalone MongoDB and the local servers have
no transactions), by ``_id``-keyed writes that are the same however often they repeat:
1. ``device_slots``: one document per device and 15-minute slot, mapping the ids of the
   readings it holds to their energy; a reading is added with ``$set`` of its key in an
   upsert, so a repeat changes nothing. Totals are derived from the map when read.
2. ``readings``: one document per reading, ``_id`` = reading_id; a repeat is a duplicate key.
Each write is idempotent on its own, so a crash between or during them is healed by the
redelivery, and any number of billing processes may write the same slot at once. (The
batch writes are in ``mongo_batch``.)
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import ParamSpec, TypeVar

from pymongo import ASCENDING, DESCENDING, WriteConcern

from billing_service.adapters.mongo_batch import (
    ENERGY_MAP,
    SlotRow,
    mark_late,
    read_slots,
    reading_key,
    set_in_slots,
    slot_row,
    store_readings,
)
from billing_service.domain.late import LateWrites, late_days
from billing_service.domain.ledger import BatchRecorded, SlotKey, Total, TransientFailure
from common.models import Reading
from common.mongo import Database, connect, transient_as

log = logging.getLogger(__name__)
# The layout of device_slots, recorded in the meta collection once migrate_layout ran.
LAYOUT, MAP_LAYOUT = "device_slots_layout", 2
LATE_MARKS = "late_marks"  # meta: since when billing marks late writes


def _utc(value: datetime) -> datetime:
    """motor is tz_aware; mongomock hands back naive UTC datetimes."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


P = ParamSpec("P")
R = TypeVar("R")


def _transient(method: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Driver errors that a retry can cure become TransientFailure (UNAVAILABLE for queries)."""

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with transient_as(TransientFailure):
            return await method(*args, **kwargs)

    return wrapper


def _reading(document: dict) -> Reading:  # type: ignore[type-arg]
    return Reading(
        device_id=document["device_id"],
        timestamp=_utc(document["timestamp"]),
        usage_kwh=document["usage_kwh"],
        reading_id=document["_id"],
    )


class MongoLedger:
    """Readings and per-device 15-minute slots in MongoDB."""

    def __init__(
        self, database: Database, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    ) -> None:
        self.database = database
        # A batch's last write, the readings insert, waits for the journal (j: true), which
        # holds the batch's earlier slot writes too: billing acks after it, and an ack must
        # survive a crash of the server (without it the local server lost the last writes
        # to a SIGKILL). One journal flush per batch, not one per slot.
        self.readings = database.get_collection("readings", write_concern=WriteConcern(j=True))
        self.device_slots = database["device_slots"]
        self.late_marks = database["late_writes"]
        self._meta = database["meta"]
        self._clock = clock
        self._marks_since: datetime | None = None

    @classmethod
    def connect(cls, url: str, database: str, timeout_s: float) -> MongoLedger:
        """A ledger on its own client, with ``timeout_s`` on selection, connect and socket.

        On a replica set, the server's default write concern (majority) applies.
        """
        return cls(connect(url, database, timeout_s))

    async def ensure_indexes(self) -> None:
        with transient_as(TransientFailure):
            await self.readings.create_index([("device_id", ASCENDING), ("timestamp", ASCENDING)])
            await self.device_slots.create_index([("device_id", ASCENDING), ("start", ASCENDING)])
            await self.late_marks.create_index([("device_id", ASCENDING)])
            # The first billing that writes late marks records when (late.py: reliable_from).
            await self._meta.update_one(
                {"_id": LATE_MARKS}, {"$setOnInsert": {"since": self._clock()}}, upsert=True
            )

    async def record_batch(self, readings: Sequence[Reading]) -> BatchRecorded:
        """Set each reading in its slot, then store the raw readings: a few round trips.

        Nothing is read first and nothing is locked: both writes are idempotent, so a
        repeat, a redelivery or another billing process writing the same slots at the same
        time changes no total. The insert's duplicate keys say which readings are new.
        """
        groups: dict[SlotKey, list[Reading]] = {}
        for reading in readings:
            groups.setdefault(SlotKey.of(reading), []).append(reading)
        with transient_as(TransientFailure):
            # Marked before the slots are written: a reader that sees the write sees its mark.
            now = self._clock()
            await mark_late(self.late_marks, late_days(groups, now), now)
            await set_in_slots(self.device_slots, groups)
            stored_before = await store_readings(self.readings, readings)
        new, seen = [], set(stored_before)
        for reading in readings:
            if reading.reading_id not in seen:
                seen.add(reading.reading_id)
                new.append(reading)
        return BatchRecorded(frozenset(groups), new, len(readings) - len(new))

    @_transient
    async def slot_total(self, key: SlotKey) -> Total:
        row = (await read_slots(self.device_slots, [key])).get(key)
        return Total() if row is None else row.total

    @_transient
    async def slot_rows(self, keys: Iterable[SlotKey]) -> dict[SlotKey, SlotRow]:
        """The given slots' totals, in one query (a slot without readings is absent)."""
        return await read_slots(self.device_slots, keys)

    async def migrate_layout(self) -> int:
        """Rewrite slots of the earlier layout (``reading_ids`` and counters) as maps.

        Each slot's map is built from the ``readings`` documents of its ids and written in
        one update that also drops the old fields, so running it twice, or in two
        processes, gives the same result. Returns the number of slots rewritten.
        """
        migrated = 0
        with transient_as(TransientFailure):
            # Done once per database: finding old slots scans the whole collection.
            if await self._meta.find_one({"_id": LAYOUT, "version": MAP_LAYOUT}):
                return 0
            async for slot in self.device_slots.find({"reading_ids": {"$exists": True}}):
                energy = {}
                async for document in self.readings.find(
                    {"_id": {"$in": slot["reading_ids"]}}, projection={"usage_milliwh": 1}
                ):
                    energy[reading_key(document["_id"])] = document["usage_milliwh"]
                if len(energy) != len(slot["reading_ids"]):
                    raise RuntimeError(
                        f"slot {slot['_id']} names {len(slot['reading_ids'])} readings but "
                        f"{len(energy)} are stored; restore the readings collection first"
                    )
                await self.device_slots.update_one(
                    {"_id": slot["_id"], "reading_ids": {"$exists": True}},
                    {
                        "$set": {f"{ENERGY_MAP}.{key}": mwh for key, mwh in energy.items()},
                        "$unset": {
                            "reading_ids": "",
                            "count": "",
                            "usage_milliwh": "",
                            "min_milliwh": "",
                            "max_milliwh": "",
                        },
                    },
                )
                migrated += 1
            await self._meta.update_one(
                {"_id": LAYOUT}, {"$set": {"version": MAP_LAYOUT}}, upsert=True
            )
        if migrated:
            log.info("slots rewritten in the map layout", extra={"slots": migrated})
        return migrated

    @_transient
    async def late_writes(self, device_id: str) -> LateWrites:
        """The device's late-write marks (late.py), and since when they are complete."""
        if self._marks_since is None:
            document = await self._meta.find_one({"_id": LATE_MARKS})
            self._marks_since = None if document is None else _utc(document["since"])
        days = {
            _utc(mark["day"]): _utc(mark["at"])
            async for mark in self.late_marks.find({"device_id": device_id})
        }
        return LateWrites.marked_since(self._marks_since, days)

    @_transient
    async def slots(self, device_id: str, start: datetime, end: datetime) -> list[SlotRow]:
        """The device's slots whose start lies in [start, end), in time order."""
        return [
            slot_row(_utc(slot["start"]), slot[ENERGY_MAP])
            async for slot in self.device_slots.find(
                {"device_id": device_id, "start": {"$gte": start, "$lt": end}},
                projection={"start": 1, ENERGY_MAP: 1},
                sort=[("start", ASCENDING)],
            )
            if slot.get(ENERGY_MAP)
        ]

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

    def __init__(self, database: Database) -> None:
        self._collection = database["catalog"]

    async def load(self) -> StoredCatalog | None:
        with transient_as(TransientFailure):
            document = await self._collection.find_one({"_id": "current"})
        if document is None:
            return None
        return StoredCatalog(document["yaml"], document["source"], _utc(document["loaded_at"]))

    async def save(self, text: str, source: str) -> None:
        await self._collection.replace_one(
            {"_id": "current"},
            {"yaml": text, "source": source, "loaded_at": datetime.now(UTC)},
            upsert=True,
        )
