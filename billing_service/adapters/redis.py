"""Redis, the cache: latest reading and month-to-date energy per device.

Every value is a snapshot of MongoDB state, written only if it is newer than what Redis
holds (compared inside Redis by a script), so redeliveries, concurrent handlers and
out-of-order readings cannot make it go backwards or count twice.

Billing writes no slot totals (it never reads MongoDB back); it marks the slots it changed,
and readers refresh those from MongoDB. A mark is a version that every change increments; a
reader clears it only if it is still the version seen before reading MongoDB, so a change
that lands while a reader works stays marked.

Keys (``prefix`` defaults to ``energy:``):
- ``{prefix}mtd:{device_id}:{YYYY-MM}``      hash  slot ``DDHHMM`` (UTC) → ``count:milliwh``
- ``{prefix}changed:{device_id}:{YYYY-MM}``  hash  slot ``DDHHMM`` → version of its last change
- ``{prefix}latest:{device_id}``             hash  reading_id, timestamp, usage_kwh, ts_us
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

import redis.asyncio as redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from billing_service.domain.ledger import SlotKey, Total, TransientFailure
from common.models import Reading

T = TypeVar("T")
COMPLETE = "complete"  # field marking a month hash as a full copy of MongoDB
# A month's hash lives this long after its last write; an expired one is refilled from
# MongoDB when asked for, so old months do not stay in memory.
MONTH_TTL_S = 40 * 86400

PUT_SLOT_TOTAL = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current and tonumber(string.match(current, '^(%d+):')) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ':' .. ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""
CLEAR_CHANGE = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""
PUT_LATEST = """
local ts = redis.call('HGET', KEYS[1], 'ts_us')
if ts then
  local id = redis.call('HGET', KEYS[1], 'reading_id')
  if tonumber(ts) > tonumber(ARGV[1]) or (tonumber(ts) == tonumber(ARGV[1]) and id >= ARGV[2]) then
    return 0
  end
end
redis.call('HSET', KEYS[1], 'ts_us', ARGV[1], 'reading_id', ARGV[2],
           'timestamp', ARGV[3], 'usage_kwh', ARGV[4])
return 1
"""


@dataclass(frozen=True)
class MonthSlots:
    """A month as cached: slot totals, whether they are a full copy, and the changed slots.

    ``changed`` maps the start of each slot changed since it was cached to the version of
    its mark; pass it back to ``refresh_month`` after reading those slots from MongoDB.
    """

    slots: dict[datetime, Total]
    complete: bool
    changed: dict[datetime, str]

    @property
    def current(self) -> bool:
        """A full copy with no slot behind MongoDB: the cache alone answers."""
        return self.complete and not self.changed


class RedisCache:
    """Month-to-date and latest-reading snapshots in Redis."""

    def __init__(self, url: str, prefix: str, timeout_s: float) -> None:
        self._redis = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, decode_responses=True
        )
        self._prefix = prefix
        self._put_slot_total = self._redis.register_script(PUT_SLOT_TOTAL)
        self._put_latest = self._redis.register_script(PUT_LATEST)
        self._clear_change = self._redis.register_script(CLEAR_CHANGE)

    def month_key(self, device_id: str, month: str) -> str:
        return f"{self._prefix}mtd:{device_id}:{month}"

    def changed_key(self, device_id: str, month: str) -> str:
        return f"{self._prefix}changed:{device_id}:{month}"

    def latest_key(self, device_id: str) -> str:
        return f"{self._prefix}latest:{device_id}"

    async def put_latest(self, reading: Reading) -> None:
        await self._call(
            self._put_latest(keys=[self.latest_key(reading.device_id)], args=_latest_args(reading))
        )

    async def mark_changed(self, slots: Iterable[SlotKey], latest: Iterable[Reading]) -> None:
        """Mark the slots behind MongoDB and keep each latest reading, in one pipeline."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in slots:
                changed = self.changed_key(key.device_id, key.month)
                pipe.hincrby(changed, key.field, 1)
                pipe.expire(changed, MONTH_TTL_S)
            for reading in latest:
                await self._put_latest(
                    keys=[self.latest_key(reading.device_id)],
                    args=_latest_args(reading),
                    client=pipe,
                )
            await self._call(pipe.execute())

    async def month_slots(self, device_id: str, month: str) -> MonthSlots:
        """The slot totals cached for a UTC month (YYYY-MM), and which changed since.

        Only ``refresh_month`` with ``complete`` (a copy of all of MongoDB's month) marks a
        month complete; its changed slots must still be read from MongoDB.
        """
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.month_key(device_id, month))
            pipe.hgetall(self.changed_key(device_id, month))
            fields, changed = await self._call(pipe.execute())
        complete = fields.pop(COMPLETE, None) is not None
        slots = {}
        for field, value in fields.items():
            count, milliwh = value.split(":")
            slots[_slot_start(month, field)] = Total(int(count), int(milliwh))
        return MonthSlots(slots, complete, {_slot_start(month, f): v for f, v in changed.items()})

    async def refresh_month(
        self,
        device_id: str,
        month: str,
        totals: Mapping[datetime, Total],
        seen_changes: Mapping[datetime, str],
        complete: bool,
    ) -> None:
        """Store totals read from MongoDB; clear the marks it read past; maybe mark complete.

        ``seen_changes`` must have been read (``month_slots``) before MongoDB was.
        """
        key, changed = self.month_key(device_id, month), self.changed_key(device_id, month)
        async with self._redis.pipeline(transaction=False) as pipe:
            for start, total in totals.items():
                await self._put_slot_total(
                    keys=[key],
                    args=[_field(start), total.count, total.usage_milliwh, MONTH_TTL_S],
                    client=pipe,
                )
            for start, version in seen_changes.items():
                await self._clear_change(keys=[changed], args=[_field(start), version], client=pipe)
            if complete:
                pipe.hset(key, COMPLETE, "1")
                pipe.expire(key, MONTH_TTL_S)
            pipe.expire(changed, MONTH_TTL_S)  # a mark must outlive the totals it overrides
            await self._call(pipe.execute())

    async def latest(self, device_id: str) -> Reading | None:
        fields = await self._call(self._redis.hgetall(self.latest_key(device_id)))
        if not fields:
            return None
        return Reading(
            device_id=device_id,
            timestamp=datetime.fromisoformat(fields["timestamp"]).astimezone(UTC),
            usage_kwh=float(fields["usage_kwh"]),
            reading_id=fields["reading_id"],
        )

    async def latest_timestamps(self) -> dict[str, datetime]:
        """The timestamp of every cached device's latest reading, by device id."""
        return await self._call(self._latest_timestamps())

    async def _latest_timestamps(self) -> dict[str, datetime]:
        prefix = self.latest_key("")
        keys = [key async for key in self._redis.scan_iter(f"{prefix}*", count=1000)]
        found: dict[str, datetime] = {}
        for chunk in range(0, len(keys), 1000):
            batch = keys[chunk : chunk + 1000]
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in batch:
                    pipe.hget(key, "ts_us")
                values = await pipe.execute()
            for key, value in zip(batch, values, strict=True):
                if value is not None:
                    found[key[len(prefix) :]] = datetime.fromtimestamp(int(value) / 1e6, UTC)
        return found

    async def _call(self, awaitable: Awaitable[T]) -> T:
        try:
            return await awaitable
        except (RedisConnectionError, RedisTimeoutError, OSError) as error:
            raise TransientFailure(f"Redis: {error}") from error

    async def close(self) -> None:
        await self._redis.aclose()


def _field(start: datetime) -> str:
    return start.strftime("%d%H%M")


def _slot_start(month: str, field: str) -> datetime:
    year, month_number = int(month[:4]), int(month[5:7])
    day, hour, minute = int(field[:2]), int(field[2:4]), int(field[4:6])
    return datetime(year, month_number, day, hour, minute, tzinfo=UTC)


def _latest_args(reading: Reading) -> list[object]:
    ts_us = int(reading.timestamp.timestamp() * 1_000_000)
    return [ts_us, reading.reading_id, reading.timestamp.isoformat(), reading.usage_kwh]
