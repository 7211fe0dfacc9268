"""Adding a batch of readings to MongoDB in a few round trips, each reading counted once.

``store_readings`` inserts the batch's ``readings`` documents in one unordered insert (ids
stored already are duplicate keys, not errors). ``add_to_buckets`` reads the batch's
slot buckets in one query, then adds to each the readings it lacks: new buckets in one
unordered insert, existing ones by updates conditional on the ``count`` they were read at,
in unordered bulk writes of ``UPDATES_PER_CALL``. A bucket another writer changed since
the read (or whose write has an unknown outcome) is read and planned again.

The caller (``MongoLedger.record_batch``) holds the buckets' locks. Only pymongo here:
motor stays in ``mongo.py``, which hands in its collections.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from pymongo import UpdateOne
from pymongo.errors import BulkWriteError

from billing_service.domain.ledger import BatchRecorded, SlotKey, Total, TransientFailure
from common.models import Reading

Collection = Any  # motor's AsyncIOMotorCollection, imported in mongo.py only
DUPLICATE_KEY = 11000
# Rounds of read-then-write for buckets that other writers keep changing, before the batch
# fails as transient and is retried with backoff.
MAX_BUCKET_ROUNDS = 8
# Bucket updates per bulk write: few round trips, and each call well inside the socket
# timeout on FerretDB 1.24 (SQLite), where an update scans the collection (80 ms each with
# 3,000 buckets) and an update command of 100 statements or more never returns at all.
UPDATES_PER_CALL = 20


@dataclass(frozen=True)
class _Bucket:
    """A bucket as read: its total and the ids it holds."""

    total: Total
    reading_ids: frozenset[str]


@dataclass(frozen=True, eq=False)
class _Plan:
    """What one batch adds to one bucket: ``fresh``, the readings of ``group`` it lacks."""

    key: SlotKey
    group: list[Reading]  # the batch's readings of this bucket, in delivery order
    fresh: list[Reading]  # those the bucket did not hold when read, each id once
    before: Total  # the bucket as read (zero when it did not exist)
    exists: bool

    @cached_property  # read for the insert or the update, and for the total after
    def added(self) -> Total:
        return Total(len(self.fresh), sum(reading.usage_milliwh for reading in self.fresh))

    @property
    def after(self) -> Total:
        return self.before + self.added


def _plan(key: SlotKey, group: list[Reading], bucket: _Bucket | None) -> _Plan:
    held = bucket.reading_ids if bucket is not None else frozenset()
    fresh, seen = [], set()
    for reading in group:
        if reading.reading_id not in held and reading.reading_id not in seen:
            seen.add(reading.reading_id)
            fresh.append(reading)
    before = bucket.total if bucket is not None else Total()
    return _Plan(key, group, fresh, before, exists=bucket is not None)


def _raise_unless_duplicates(error: BulkWriteError) -> None:
    """Duplicate keys are expected (stored already); anything else is not."""
    if error.details.get("writeConcernErrors"):
        raise TransientFailure(f"MongoDB: {error.details['writeConcernErrors']}") from error
    if any(e.get("code") != DUPLICATE_KEY for e in error.details.get("writeErrors", [])):
        raise error


async def store_readings(readings_collection: Collection, readings: Sequence[Reading]) -> None:
    """One document per reading id; the ids stored already are duplicates, not errors."""
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


async def add_to_buckets(slots: Collection, groups: dict[SlotKey, list[Reading]]) -> BatchRecorded:
    """Read the buckets, write what they lack; again for those a concurrent writer moved.

    Within one process the bucket locks make the first round the only one. A second
    round needs another writer of the same bucket (another replica), or a write whose
    outcome is unknown; the readings are never counted twice either way, but a reading
    this round added can then be reported a duplicate.
    """
    totals: dict[SlotKey, Total] = {}
    new: list[Reading] = []
    duplicates = 0
    pending = groups
    for _ in range(MAX_BUCKET_ROUNDS):
        held = await read_buckets(slots, pending)
        plans = [_plan(key, group, held.get(key.bucket_id)) for key, group in pending.items()]
        for plan in plans:
            if not plan.fresh:  # nothing to add: every reading is in the bucket already
                totals[plan.key] = plan.before
                duplicates += len(plan.group)
        written = await _write_buckets(slots, [plan for plan in plans if plan.fresh])
        for plan in written:
            totals[plan.key] = plan.after
            new.extend(plan.fresh)
            duplicates += len(plan.group) - len(plan.fresh)
        done = {id(plan) for plan in written}
        pending = {plan.key: plan.group for plan in plans if plan.fresh and id(plan) not in done}
        if not pending:
            return BatchRecorded(totals, new, duplicates)
    raise TransientFailure(f"MongoDB: {len(pending)} buckets kept changing under this write")


async def read_buckets(slots: Collection, keys: Iterable[SlotKey]) -> dict[str, _Bucket]:
    """The buckets' state, by id, in one query (absent: no bucket yet)."""
    cursor = slots.find(
        {"_id": {"$in": [key.bucket_id for key in keys]}},
        projection={"count": 1, "usage_milliwh": 1, "reading_ids": 1},
    )
    return {
        document["_id"]: _Bucket(
            Total(document["count"], document["usage_milliwh"]),
            frozenset(document["reading_ids"]),
        )
        async for document in cursor
    }


async def _write_buckets(slots: Collection, plans: list[_Plan]) -> list[_Plan]:
    """Write the plans: new buckets in one insert, the others in bulk updates.

    Returns the plans known to be written; the rest are read and planned again.
    """
    if not plans:
        return []
    # One after the other, like every write of a batch: FerretDB (SQLite) serialises the
    # writes to one database anyway, and a failure leaves nothing of the batch running.
    created = await _create_buckets(slots, [plan for plan in plans if not plan.exists])
    updated = await _update_buckets(slots, [plan for plan in plans if plan.exists])
    return created + updated


async def _create_buckets(slots: Collection, plans: list[_Plan]) -> list[_Plan]:
    """Insert new buckets; one a concurrent writer created first is a duplicate key."""
    if not plans:
        return []
    documents = [
        {
            "_id": plan.key.bucket_id,
            "device_id": plan.key.device_id,
            "start": plan.key.start,
            "reading_ids": [reading.reading_id for reading in plan.fresh],
            "count": plan.added.count,
            "usage_milliwh": plan.added.usage_milliwh,
            "min_milliwh": min(reading.usage_milliwh for reading in plan.fresh),
            "max_milliwh": max(reading.usage_milliwh for reading in plan.fresh),
        }
        for plan in plans
    ]
    try:
        await slots.insert_many(documents, ordered=False)
    except BulkWriteError as error:
        _raise_unless_duplicates(error)
        taken = {failure["index"] for failure in error.details["writeErrors"]}
        return [plan for index, plan in enumerate(plans) if index not in taken]
    return plans


async def _update_buckets(slots: Collection, plans: list[_Plan]) -> list[_Plan]:
    """One conditional update per bucket, in unordered bulk writes of 20.

    The filter pins ``count`` to the value read: ``count`` grows with every reading
    added, so a bucket that still has it holds exactly the ids that were read, and the
    update adds exactly the readings missing from them; MongoDB applies it atomically.
    """
    if not plans:
        return []
    operations = []
    for plan in plans:
        milliwh = [reading.usage_milliwh for reading in plan.fresh]
        operations.append(
            UpdateOne(
                {"_id": plan.key.bucket_id, "count": plan.before.count},
                {
                    "$push": {"reading_ids": {"$each": [r.reading_id for r in plan.fresh]}},
                    "$inc": {
                        "count": plan.added.count,
                        "usage_milliwh": plan.added.usage_milliwh,
                    },
                    # $min and $max are idempotent: safe even on a redelivery.
                    "$min": {"min_milliwh": min(milliwh)},
                    "$max": {"max_milliwh": max(milliwh)},
                },
            )
        )
    written = []
    for first in range(0, len(plans), UPDATES_PER_CALL):
        chunk = slice(first, first + UPDATES_PER_CALL)
        try:
            result = await slots.bulk_write(operations[chunk], ordered=False)
        except BulkWriteError as error:
            _raise_unless_duplicates(error)
            continue  # outcome unknown: read these again
        # The result counts matches, not which: if a bucket moved, read them all again.
        if result.matched_count == len(operations[chunk]):
            written.extend(plans[chunk])
    return written
