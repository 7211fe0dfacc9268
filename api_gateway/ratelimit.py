"""Token buckets in Redis: readings per device and for the whole gateway, and reads per
token, shared by replicas.

Every reading takes one token, so a batch of n readings takes n. One Lua script refills and
checks the device bucket (skipped for callers without a device, such as admin or bulk
import) and the global bucket, then takes the tokens from both or from neither: a refused
batch costs nothing. The script reads the Redis clock (``TIME``), so replicas whose clocks
disagree still agree on the buckets. Every read call (a bill, usage, readings) takes one
token from its caller's read bucket and one from the gateway's read bucket with the same
script, from both or neither: a device token and an account token each have their own, and
all of them share the gateway's (``acquire_read``), which bounds what billing must answer.

Keys (``key_prefix`` defaults to ``""``), each a hash ``tokens``, ``updated_us``:
- ``{key_prefix}ratelimit:device:{device_id}``
- ``{key_prefix}ratelimit:global``
- ``{key_prefix}ratelimit:reads:{kind}:{id}`` (``kind`` is device or account)
- ``{key_prefix}ratelimit:reads``
A bucket expires once it would have refilled completely (plus a second), which is the same
state as no key at all, so idle devices leave nothing behind. Both keys are touched by one
script, so under Redis Cluster they would need a common hash tag.

Recommended limits (``RateLimits()``): 10 readings/s per device with a burst of 1000,
20 000 readings/s for the gateway with a burst of 40 000, 5 reads/s per token with a
burst of 50 (a web page's load makes about 6 reads), and 200 reads/s for the gateway with a
burst of 400 (about what one billing process answers for 15-minute meters: 60-250 bills
a second). The readings' bursts exceed the
gateway's batch size (500 by default, 10 000 at most), so a forwarded chunk always fits.
A batch larger than a burst can never pass: the decision says so with ``retry_after_s =
inf`` (``Decision.exceeds_burst``), and the caller should split the batch instead of
retrying.

When Redis cannot be reached the limiter fails open: readings and reads pass unchecked,
each failure is counted in ``gateway_ratelimit_redis_errors_total`` and a warning is logged
at most once every 30 s. The limiter protects capacity; turning away readings because a
cache is down would cost more than letting a burst through.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass

from prometheus_client import Counter
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)

REDIS_ERRORS = Counter(
    "gateway_ratelimit_redis_errors_total",
    "Rate-limit checks that could not reach Redis and let the readings or the read through.",
)
RATELIMITED = Counter(
    "gateway_ratelimited_readings_total",
    "Readings refused by the rate limiter, by the bucket that refused them (device, global); "
    "scopes reads (a token's) and global_reads (the gateway's) count refused read calls (a "
    "bill, usage, readings) instead.",
    ["scope"],
)
WARNING_INTERVAL_S = 30.0
EXPIRY_MARGIN_MS = 1000

# KEYS: the buckets to check; ARGV: count, then rate_per_s and burst of each key in order,
# then the expiry margin in ms. Returns {0, 0} when allowed, else {index of the bucket that
# needs the longest wait (1-based), that wait in µs}. Numbers are written with %.17g:
# redis.call would otherwise format them with %.14g and lose the µs of the timestamp.
ACQUIRE = """
local count = tonumber(ARGV[1])
local margin_ms = tonumber(ARGV[#ARGV])
local clock = redis.call('TIME')
local now_us = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local levels = {}
local refused, wait_us = 0, 0
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[2 * i])
  local burst = tonumber(ARGV[2 * i + 1])
  local state = redis.call('HMGET', key, 'tokens', 'updated_us')
  local level = burst
  if state[1] and state[2] then
    local elapsed_us = math.max(0, now_us - tonumber(state[2]))
    level = math.min(burst, tonumber(state[1]) + elapsed_us * rate / 1000000)
  end
  levels[i] = level
  if level < count then
    local need_us = math.ceil((count - level) * 1000000 / rate)
    if need_us > wait_us then
      refused, wait_us = i, need_us
    end
  end
end
if refused > 0 then
  return {refused, wait_us}
end
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[2 * i])
  local burst = tonumber(ARGV[2 * i + 1])
  redis.call('HSET', key, 'tokens', string.format('%.17g', levels[i] - count),
             'updated_us', string.format('%.17g', now_us))
  redis.call('PEXPIRE', key, math.ceil(burst * 1000 / rate) + margin_ms)
end
return {0, 0}
"""


@dataclass(frozen=True)
class RateLimits:
    """Refill rate (readings, or for ``read_*`` read calls, per second) and burst of each
    bucket; a rate ≤ 0 means no limit."""

    device_rate_per_s: float = 10.0
    device_burst: int = 1000
    global_rate_per_s: float = 20_000.0
    global_burst: int = 40_000
    read_rate_per_s: float = 5.0  # per device or account token
    read_burst: int = 50
    global_read_rate_per_s: float = 200.0  # every device and account token together
    global_read_burst: int = 400

    def __post_init__(self) -> None:
        # A limited bucket that cannot hold one token would refuse everything.
        for name in ("device", "global", "read", "global_read"):
            if getattr(self, f"{name}_rate_per_s") > 0 and getattr(self, f"{name}_burst") < 1:
                raise ValueError(f"{name}_burst must be at least 1 when {name}_rate_per_s > 0")


@dataclass(frozen=True)
class Decision:
    """Whether readings may pass; if not, which bucket (``scope``) refused and for how long."""

    allowed: bool
    retry_after_s: float = 0.0
    scope: str = ""  # "device", "global", "reads" or "global_reads" when refused

    @property
    def exceeds_burst(self) -> bool:
        """The batch is larger than the bucket can ever hold: split it, do not retry it."""
        return math.isinf(self.retry_after_s)


ALLOWED = Decision(allowed=True)


@dataclass(frozen=True)
class _Bucket:
    scope: str
    key: str
    rate_per_s: float
    burst: int


class RedisRateLimiter:
    """Per-device, global and per-token read buckets, checked and taken atomically in Redis.

    ``timeout_s`` bounds each check, whatever timeouts and retries the client has, so a
    slow Redis delays readings by at most that much before they pass unchecked.
    """

    def __init__(
        self,
        redis: Redis,
        limits: RateLimits,
        key_prefix: str = "",
        timeout_s: float = 0.5,
    ) -> None:
        self._limits = limits
        self._key_prefix = key_prefix
        self._timeout_s = timeout_s
        self._script = redis.register_script(ACQUIRE)
        self._last_warning_at: float | None = None
        self._errors_since_warning = 0

    async def acquire(self, device_id: str | None, count: int) -> Decision:
        """Take ``count`` tokens from the device bucket (unless ``device_id`` is None) and the
        global bucket, from both or neither."""
        if count < 0:
            raise ValueError(f"count must not be negative, got {count}")
        return await self._take(self._buckets(device_id), count)

    async def acquire_read(self, kind: str, caller_id: str) -> Decision:
        """Take one token from the read bucket of the caller's token, ``kind`` (device or
        account) and its id, and one from the gateway's read bucket: from both or neither."""
        limits = self._limits
        buckets = []
        if limits.read_rate_per_s > 0:
            key = f"{self._key_prefix}ratelimit:reads:{kind}:{caller_id}"
            buckets.append(_Bucket("reads", key, limits.read_rate_per_s, limits.read_burst))
        if limits.global_read_rate_per_s > 0:
            key = f"{self._key_prefix}ratelimit:reads"
            rate, burst = limits.global_read_rate_per_s, limits.global_read_burst
            buckets.append(_Bucket("global_reads", key, rate, burst))
        return await self._take(buckets, 1)

    async def _take(self, buckets: list[_Bucket], count: int) -> Decision:
        """``count`` tokens from every bucket or from none; allowed unchecked when Redis fails."""
        if count == 0 or not buckets:
            return ALLOWED
        for bucket in buckets:
            if count > bucket.burst:
                return self._refuse(bucket.scope, math.inf, count)
        args: list[float | int] = [count]
        for bucket in buckets:
            args += [bucket.rate_per_s, bucket.burst]
        args.append(EXPIRY_MARGIN_MS)
        try:
            async with asyncio.timeout(self._timeout_s):
                refused, wait_us = await self._script(
                    keys=[bucket.key for bucket in buckets], args=args
                )
        except (RedisConnectionError, RedisTimeoutError, TimeoutError) as error:
            self._redis_failed(error)
            return ALLOWED
        if not refused:
            return ALLOWED
        return self._refuse(buckets[int(refused) - 1].scope, int(wait_us) / 1e6, count)

    def _buckets(self, device_id: str | None) -> list[_Bucket]:
        limits = self._limits
        buckets = []
        if device_id is not None and limits.device_rate_per_s > 0:
            key = f"{self._key_prefix}ratelimit:device:{device_id}"
            buckets.append(_Bucket("device", key, limits.device_rate_per_s, limits.device_burst))
        if limits.global_rate_per_s > 0:
            key = f"{self._key_prefix}ratelimit:global"
            buckets.append(_Bucket("global", key, limits.global_rate_per_s, limits.global_burst))
        return buckets

    @staticmethod
    def _refuse(scope: str, retry_after_s: float, count: int) -> Decision:
        RATELIMITED.labels(scope=scope).inc(count)
        return Decision(allowed=False, retry_after_s=retry_after_s, scope=scope)

    def _redis_failed(self, error: Exception) -> None:
        REDIS_ERRORS.inc()
        self._errors_since_warning += 1
        now = time.monotonic()
        # Every reading would log during an outage; one line per interval says enough.
        if self._last_warning_at is None or now - self._last_warning_at >= WARNING_INTERVAL_S:
            log.warning(
                "rate limiter cannot reach Redis, letting readings and reads through unchecked "
                "(%d failed checks since the last warning): %r",
                self._errors_since_warning,
                error,
            )
            self._last_warning_at = now
            self._errors_since_warning = 0
