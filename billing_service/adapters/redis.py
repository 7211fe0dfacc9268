"""Redis, the cache: latest reading and month-to-date energy per device.

Every value is a snapshot of MongoDB state, written only if it is newer than what Redis
holds (compared inside Redis by a script), so redeliveries, concurrent handlers and
out-of-order readings cannot make it go backwards or count twice.

Keys (``prefix`` defaults to ``energy:``):
- ``{prefix}mtd:{device_id}:{YYYY-MM}``  hash  hour ``DDHH`` → ``count:milliwh``
- ``{prefix}latest:{device_id}``         hash  reading_id, timestamp, usage_kwh, ts_us
"""

from __future__ import annotations

from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import TypeVar

import redis.asyncio as redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from billing_service.domain.ledger import HourKey, Total, TransientFailure
from common.models import Reading

T = TypeVar("T")

PUT_HOUR_TOTAL = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current and tonumber(string.match(current, '^(%d+):')) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ':' .. ARGV[3])
return 1
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


class RedisCache:
    """Month-to-date and latest-reading snapshots in Redis."""

    def __init__(self, url: str, prefix: str, timeout_s: float) -> None:
        self._redis = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, decode_responses=True
        )
        self._prefix = prefix
        self._put_hour_total = self._redis.register_script(PUT_HOUR_TOTAL)
        self._put_latest = self._redis.register_script(PUT_LATEST)

    def month_key(self, device_id: str, month: str) -> str:
        return f"{self._prefix}mtd:{device_id}:{month}"

    def latest_key(self, device_id: str) -> str:
        return f"{self._prefix}latest:{device_id}"

    async def put_hour_total(self, key: HourKey, total: Total) -> None:
        await self._call(
            self._put_hour_total(
                keys=[self.month_key(key.device_id, key.month)],
                args=[key.hour_of_month, total.count, total.usage_milliwh],
            )
        )

    async def put_latest(self, reading: Reading) -> None:
        ts_us = int(reading.timestamp.timestamp() * 1_000_000)
        await self._call(
            self._put_latest(
                keys=[self.latest_key(reading.device_id)],
                args=[ts_us, reading.reading_id, reading.timestamp.isoformat(), reading.usage_kwh],
            )
        )

    async def month_to_date(self, device_id: str, month: str) -> Total | None:
        """The cached month total, or None when nothing is cached for that month."""
        hours = await self._call(self._redis.hgetall(self.month_key(device_id, month)))
        if not hours:
            return None
        total = Total()
        for value in hours.values():
            count, milliwh = value.split(":")
            total += Total(int(count), int(milliwh))
        return total

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

    async def _call(self, awaitable: Awaitable[T]) -> T:
        try:
            return await awaitable
        except (RedisConnectionError, RedisTimeoutError, OSError) as error:
            raise TransientFailure(f"Redis: {error}") from error

    async def close(self) -> None:
        await self._redis.aclose()
