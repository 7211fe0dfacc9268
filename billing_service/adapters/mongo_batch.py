"""Writing a batch of readings to MongoDB: idempotent by construction, no read before write.

1. ``device_slots``: one upsert per (device, 15-minute slot) the batch touches, which
   ``$set``s ``milliwh.<reading key>`` to each reading's energy. Setting a key twice sets
   the same value, so a redelivered, resent or concurrently written reading adds nothing;
   the slot's count, sum, minimum and maximum are derived from the map when read. No lock,
   no condition, no read: any server that applies one document's update atomically keeps
   the totals exact, however many billing processes write the same slot.
2. ``readings``: one unordered insert of the raw readings (``_id`` = reading id). The ids
   stored already are duplicate keys, and say which readings are new: the slots are
   written first, so a reading whose document exists is in its slot, and one whose slot
   write happened before a crash is still counted new when redelivered.

Only pymongo here: ``common.mongo`` makes the client and ``mongo.py`` hands in its collections.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from pymongo import UpdateOne
from pymongo.errors import BulkWriteError

from billing_service.domain.ledger import SlotKey, Total, TransientFailure
from common.models import Reading
from common.mongo import Collection

DUPLICATE_KEY = 11000
ENERGY_MAP = "milliwh"  # the slot document's map: reading key -> milliwatt-hours
# Slot upserts per bulk write: each call stays well inside the socket timeout on the local
# server (SecantusDB applies about 1,000 small upserts a second).
UPSERTS_PER_CALL = 250


def reading_key(reading_id: str) -> str:
    """The reading's key in a slot's map: a dot would be a path in ``$set``, ``~`` is not
    allowed in a reading id, so the mapping is one to one."""
    return reading_id.replace(".", "~")


@dataclass(frozen=True)
class SlotRow:
    """One stored slot: its energy and the smallest and largest reading in it."""

    start: datetime
    total: Total
    min_milliwh: int
    max_milliwh: int


def slot_row(start: datetime, energy: Mapping[str, int]) -> SlotRow:
    """A slot's totals, derived from its map of reading key -> milliwatt-hours."""
    values = energy.values()
    return SlotRow(start, Total(len(energy), sum(values)), min(values), max(values))


def _raise_unless_duplicates(error: BulkWriteError) -> None:
    """Duplicate keys are expected (stored already); anything else is not."""
    if error.details.get("writeConcernErrors"):
        raise TransientFailure(f"MongoDB: {error.details['writeConcernErrors']}") from error
    if any(e.get("code") != DUPLICATE_KEY for e in error.details.get("writeErrors", [])):
        raise error


async def set_in_slots(slots: Collection, groups: Mapping[SlotKey, Sequence[Reading]]) -> None:
    """Upsert each slot with its readings' energy, in unordered bulk writes."""
    operations = [
        UpdateOne(
            {"_id": key.bucket_id},
            {
                "$set": {
                    f"{ENERGY_MAP}.{reading_key(r.reading_id)}": r.usage_milliwh for r in group
                },
                "$setOnInsert": {"device_id": key.device_id, "start": key.start},
            },
            upsert=True,
        )
        for key, group in groups.items()
    ]
    await _upsert(slots, operations, "slot")


async def mark_late(marks: Collection, days: Iterable[tuple[str, datetime]], now: datetime) -> None:
    """Upsert a mark per (device, UTC day) with the latest late write's time (late.py)."""
    operations = [
        UpdateOne(
            {"_id": f"{device_id}|{day.strftime('%Y-%m-%d')}"},
            {"$max": {"at": now}, "$setOnInsert": {"device_id": device_id, "day": day}},
            upsert=True,
        )
        for device_id, day in sorted(days)
    ]
    await _upsert(marks, operations, "mark")


async def _upsert(collection: Collection, operations: list[UpdateOne], what: str) -> None:
    """Unordered bulk upserts, ``UPSERTS_PER_CALL`` at a time."""
    for first in range(0, len(operations), UPSERTS_PER_CALL):
        try:
            await collection.bulk_write(operations[first : first + UPSERTS_PER_CALL], ordered=False)
        except BulkWriteError as error:
            # Two writers upserting a new document at once: one may get a duplicate key,
            # and MongoDB retries such an upsert itself only sometimes. Writing again is safe.
            _raise_unless_duplicates(error)
            raise TransientFailure(
                f"MongoDB: a concurrent writer created a {what}; again"
            ) from error


async def store_readings(readings_collection: Collection, readings: Sequence[Reading]) -> set[str]:
    """One document per reading id; returns the ids that were stored already."""
    documents = {}
    for reading in readings:
        documents.setdefault(
            reading.reading_id,
            {
                "_id": reading.reading_id,
                "device_id": reading.device_id,
                "timestamp": reading.timestamp,
                "usage_kwh": reading.usage_kwh,
                "usage_milliwh": reading.usage_milliwh,
            },
        )
    try:
        await readings_collection.insert_many(list(documents.values()), ordered=False)
    except BulkWriteError as error:
        _raise_unless_duplicates(error)
        return {failure["op"]["_id"] for failure in error.details["writeErrors"]}
    return set()


async def read_slots(slots: Collection, keys: Iterable[SlotKey]) -> dict[SlotKey, SlotRow]:
    """The slots' totals, by key, in one query (absent: no reading yet)."""
    wanted = {key.bucket_id: key for key in keys}
    if not wanted:
        return {}
    cursor = slots.find({"_id": {"$in": list(wanted)}}, projection={ENERGY_MAP: 1})
    return {
        wanted[document["_id"]]: slot_row(wanted[document["_id"]].start, document[ENERGY_MAP])
        async for document in cursor
        if document.get(ENERGY_MAP)
    }
