"""RedisRateLimiter against the real Redis: bursts, batches, scopes, replicas, an outage."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import multiprocessing
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from api_gateway.ratelimit import Decision, RateLimits, RedisRateLimiter
from tests.conftest import REDIS_URL, free_port

pytestmark = pytest.mark.component

UNLIMITED = RateLimits(device_rate_per_s=0, device_burst=0, global_rate_per_s=0, global_burst=0)
# Slow enough that refills during a test stay far below one token.
SLOW = 0.01


def delete_keys(prefix: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    with client:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)


@pytest.fixture
async def client(prefix: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(REDIS_URL, socket_timeout=5)
    yield client
    await client.aclose()
    delete_keys(prefix)


@pytest.fixture
def limiter(client: aioredis.Redis, prefix: str) -> Callable[[RateLimits], RedisRateLimiter]:
    def make(limits: RateLimits) -> RedisRateLimiter:
        return RedisRateLimiter(client, limits, key_prefix=prefix)

    return make


def limits(**changes: float) -> RateLimits:
    """Every bucket unlimited except the ones named."""
    return dataclasses.replace(UNLIMITED, **changes)


async def test_burst_then_refusal_then_refill(limiter: Callable) -> None:
    rl = limiter(limits(device_rate_per_s=5, device_burst=10))

    for _ in range(10):
        assert (await rl.acquire("meter-1", 1)).allowed
    refused = await rl.acquire("meter-1", 1)

    assert not refused.allowed and refused.scope == "device"
    assert 0 < refused.retry_after_s <= 0.25
    await asyncio.sleep(refused.retry_after_s)
    assert (await rl.acquire("meter-1", 1)).allowed


async def test_a_refused_batch_takes_nothing(
    limiter: Callable, client: aioredis.Redis, prefix: str
) -> None:
    rl = limiter(limits(device_rate_per_s=SLOW, device_burst=10))

    assert (await rl.acquire("meter-1", 8)).allowed
    refused = await rl.acquire("meter-1", 5)

    assert not refused.allowed and refused.scope == "device"
    assert refused.retry_after_s > 100  # 3 tokens at 0.01/s
    tokens = await client.hget(f"{prefix}ratelimit:device:meter-1", "tokens")
    assert float(tokens) == pytest.approx(2, abs=0.01)
    assert (await rl.acquire("meter-1", 2)).allowed
    assert not (await rl.acquire("meter-1", 1)).allowed


async def test_global_bucket_is_shared_and_device_buckets_are_not(limiter: Callable) -> None:
    rl = limiter(
        limits(device_rate_per_s=SLOW, device_burst=6, global_rate_per_s=SLOW, global_burst=10)
    )

    assert (await rl.acquire("meter-1", 6)).allowed
    assert (await rl.acquire("meter-1", 1)).scope == "device"
    assert (await rl.acquire("meter-2", 4)).allowed  # meter-1's bucket is not meter-2's
    refused = await rl.acquire("meter-2", 1)

    assert not refused.allowed and refused.scope == "global"


async def test_without_a_device_only_the_global_bucket_counts(
    limiter: Callable, client: aioredis.Redis, prefix: str
) -> None:
    rl = limiter(
        limits(device_rate_per_s=SLOW, device_burst=1, global_rate_per_s=SLOW, global_burst=10)
    )

    assert (await rl.acquire(None, 5)).allowed
    assert (await rl.acquire(None, 5)).allowed
    assert (await rl.acquire(None, 1)).scope == "global"
    assert await client.keys(f"{prefix}ratelimit:device:*") == []


async def test_a_batch_larger_than_a_burst_can_never_pass(
    limiter: Callable, client: aioredis.Redis, prefix: str
) -> None:
    rl = limiter(
        limits(device_rate_per_s=SLOW, device_burst=5, global_rate_per_s=SLOW, global_burst=8)
    )
    before = REGISTRY.get_sample_value("gateway_ratelimited_readings_total", {"scope": "device"})

    too_many_for_device = await rl.acquire("meter-1", 6)
    too_many_for_gateway = await rl.acquire(None, 9)

    assert too_many_for_device == Decision(allowed=False, retry_after_s=math.inf, scope="device")
    assert too_many_for_device.exceeds_burst
    assert too_many_for_gateway.scope == "global" and too_many_for_gateway.exceeds_burst
    after = REGISTRY.get_sample_value("gateway_ratelimited_readings_total", {"scope": "device"})
    assert after - (before or 0) == 6
    assert (await rl.acquire("meter-1", 5)).allowed  # nothing was taken


async def test_unlimited_buckets_touch_nothing(
    limiter: Callable, client: aioredis.Redis, prefix: str
) -> None:
    rl = limiter(UNLIMITED)

    for _ in range(3):
        assert (await rl.acquire("meter-1", 10_000)).allowed
    assert await client.keys(f"{prefix}*") == []


async def test_buckets_expire_once_full_again(
    limiter: Callable, client: aioredis.Redis, prefix: str
) -> None:
    rl = limiter(limits(device_rate_per_s=10, device_burst=20))

    assert (await rl.acquire("meter-1", 1)).allowed

    ttl_ms = await client.pttl(f"{prefix}ratelimit:device:meter-1")
    assert 2000 < ttl_ms <= 3000  # 20 tokens at 10/s, plus a second


def hammer(prefix: str, start: Any, results: Any, duration_s: float) -> None:
    """One gateway replica: acquires single readings as fast as it can for ``duration_s``."""

    async def run() -> tuple[int, float, float]:
        client = aioredis.Redis.from_url(REDIS_URL, socket_timeout=5)
        rl = RedisRateLimiter(client, limits(global_rate_per_s=200, global_burst=50), prefix)
        accepted = 0
        first = time.time()
        while time.time() - first < duration_s:
            accepted += (await rl.acquire(None, 1)).allowed
        last = time.time()
        await client.aclose()
        return accepted, first, last

    start.wait(timeout=60)
    results.put(asyncio.run(run()))


def test_replicas_share_the_global_bucket(prefix: str) -> None:
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(2), context.Queue()
    processes = [
        context.Process(target=hammer, args=(prefix, start, results, 2.0)) for _ in range(2)
    ]
    try:
        for process in processes:
            process.start()
        outcomes = [results.get(timeout=60) for _ in processes]
        for process in processes:
            process.join(timeout=10)
    finally:
        delete_keys(prefix)

    accepted = sum(outcome[0] for outcome in outcomes)
    # Same host, same clock: this interval contains every call either process made.
    elapsed_s = max(outcome[2] for outcome in outcomes) - min(outcome[1] for outcome in outcomes)
    bound = 50 + 200 * elapsed_s
    assert all(outcome[0] > 0 for outcome in outcomes)
    assert 0.8 * bound <= accepted <= bound + 2, (accepted, elapsed_s)


async def test_unreachable_redis_fails_open_and_counts(
    prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    rl = RedisRateLimiter(client, limits(global_rate_per_s=SLOW, global_burst=10), prefix)
    before = REGISTRY.get_sample_value("gateway_ratelimit_redis_errors_total") or 0

    with caplog.at_level(logging.WARNING, logger="api_gateway.ratelimit"):
        first = await rl.acquire("meter-1", 5)
        second = await rl.acquire("meter-1", 5)
    await client.aclose()

    assert first.allowed and second.allowed
    assert REGISTRY.get_sample_value("gateway_ratelimit_redis_errors_total") - before == 2
    assert len([r for r in caplog.records if "cannot reach Redis" in r.message]) == 1
