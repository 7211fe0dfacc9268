"""RedisRateLimiter against the real Redis: bursts, batches, scopes, read buckets, replicas, an
outage."""

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

UNLIMITED = RateLimits(
    device_rate_per_s=0,
    device_burst=0,
    global_rate_per_s=0,
    global_burst=0,
    read_rate_per_s=0,
    read_burst=0,
    global_read_rate_per_s=0,
    global_read_burst=0,
)
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


async def test_burst_then_refusal_then_refill(
    limiter: Callable, client: aioredis.Redis, prefix: str
) -> None:
    interval_s = 60.0  # a token a minute: nothing refills while the burst is taken
    rl = limiter(limits(device_rate_per_s=1 / interval_s, device_burst=10))

    started = time.monotonic()
    for _ in range(10):
        assert (await rl.acquire("meter-1", 1)).allowed
    refused = await rl.acquire("meter-1", 1)
    since_s = time.monotonic() - started

    assert not refused.allowed and refused.scope == "device"
    assert interval_s - since_s - 0.001 <= refused.retry_after_s <= interval_s
    # A token interval later (the bucket's clock moved back by one interval): one token.
    key = f"{prefix}ratelimit:device:meter-1"
    updated_us = float(await client.hget(key, "updated_us"))
    await client.hset(key, "updated_us", f"{updated_us - interval_s * 1e6:.17g}")
    assert (await rl.acquire("meter-1", 1)).allowed
    assert not (await rl.acquire("meter-1", 1)).allowed


async def test_waiting_the_retry_after_is_enough(limiter: Callable) -> None:
    """On Redis's real clock: a refused caller that waits retry_after_s gets its token."""
    rl = limiter(limits(device_rate_per_s=5, device_burst=1))

    while (decision := await rl.acquire("meter-1", 1)).allowed:
        pass  # the first takes the token; on a slow machine the next may find a refill
    assert 0 < decision.retry_after_s <= 0.2  # one token at 5/s
    await asyncio.sleep(decision.retry_after_s)
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


async def test_each_token_has_its_own_read_bucket(
    limiter: Callable, client: aioredis.Redis, prefix: str
) -> None:
    rl = limiter(limits(read_rate_per_s=SLOW, read_burst=2, global_rate_per_s=SLOW, global_burst=1))
    before = REGISTRY.get_sample_value("gateway_ratelimited_readings_total", {"scope": "reads"})

    for _ in range(2):
        assert (await rl.acquire_read("account", "acme")).allowed
    refused = await rl.acquire_read("account", "acme")
    # The device of the same id, and another account, have buckets of their own.
    assert (await rl.acquire_read("device", "acme")).allowed
    assert (await rl.acquire_read("account", "globex")).allowed

    assert not refused.allowed and refused.scope == "reads"
    assert 0 < refused.retry_after_s <= 100  # a token takes 100 s at 0.01/s
    after = REGISTRY.get_sample_value("gateway_ratelimited_readings_total", {"scope": "reads"})
    assert after - (before or 0) == 1
    assert await client.exists(f"{prefix}ratelimit:reads:account:acme")
    assert (await rl.acquire(None, 1)).allowed  # reads take nothing of the readings' buckets


async def test_every_token_shares_the_gateways_read_bucket(
    limiter: Callable, client: aioredis.Redis, prefix: str
) -> None:
    rl = limiter(
        limits(read_rate_per_s=SLOW, read_burst=5, global_read_rate_per_s=SLOW, global_read_burst=3)
    )
    before = REGISTRY.get_sample_value(
        "gateway_ratelimited_readings_total", {"scope": "global_reads"}
    )

    for caller in ("acme", "globex", "initech"):  # each well within its own bucket
        assert (await rl.acquire_read("account", caller)).allowed
    refused = await rl.acquire_read("device", "meter-1")

    assert not refused.allowed and refused.scope == "global_reads"
    assert 0 < refused.retry_after_s <= 100
    after = REGISTRY.get_sample_value(
        "gateway_ratelimited_readings_total", {"scope": "global_reads"}
    )
    assert after - (before or 0) == 1
    # Refused by the gateway's bucket, the token's own was not taken from.
    assert not await client.exists(f"{prefix}ratelimit:reads:device:meter-1")
    assert await client.hget(f"{prefix}ratelimit:reads:account:acme", "tokens") == b"4"
    assert (await rl.acquire(None, 1)).allowed  # readings take nothing of the reads' buckets


async def test_reads_without_a_rate_are_not_limited(
    limiter: Callable, client: aioredis.Redis, prefix: str
) -> None:
    rl = limiter(UNLIMITED)

    for _ in range(3):
        assert (await rl.acquire_read("device", "meter-1")).allowed
    assert await client.keys(f"{prefix}*") == []


async def test_buckets_expire_once_full_again(
    limiter: Callable, client: aioredis.Redis, prefix: str
) -> None:
    rl = limiter(limits(device_rate_per_s=10, device_burst=20))

    started = time.monotonic()
    assert (await rl.acquire("meter-1", 1)).allowed
    ttl_ms = await client.pttl(f"{prefix}ratelimit:device:meter-1")
    since_ms = (time.monotonic() - started) * 1000

    # 20 tokens at 10/s, plus a second, set during the acquire: less whatever time has
    # passed since (measured, so a slow machine cannot fail it).
    assert 3000 - since_ms - 1 <= ttl_ms <= 3000


CALLS_PER_REPLICA = 100


def hammer(prefix: str, start: Any, results: Any) -> None:
    """One gateway replica: acquires single readings, CALLS_PER_REPLICA times in a row."""

    async def run() -> int:
        client = aioredis.Redis.from_url(REDIS_URL, socket_timeout=5)
        rl = RedisRateLimiter(client, limits(global_rate_per_s=SLOW, global_burst=50), prefix)
        accepted = 0
        for _ in range(CALLS_PER_REPLICA):
            accepted += (await rl.acquire(None, 1)).allowed
        await client.aclose()
        return accepted

    start.wait(timeout=60)
    results.put(asyncio.run(run()))


def test_replicas_share_the_global_bucket(prefix: str) -> None:
    """Two processes take from one bucket at once: together they get its burst, exactly.

    Separate buckets would let each take 50; a non-atomic check-then-take would let both
    take the same tokens. The refill is too slow to add a token during the test, so the
    count does not depend on how fast this machine is.
    """
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(2), context.Queue()
    processes = [context.Process(target=hammer, args=(prefix, start, results)) for _ in range(2)]
    try:
        for process in processes:
            process.start()
        accepted = [results.get(timeout=60) for _ in processes]
        for process in processes:
            process.join(timeout=10)
    finally:
        delete_keys(prefix)

    assert sum(accepted) == 50, accepted


async def test_unreachable_redis_fails_open_and_counts(
    prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    rl = RedisRateLimiter(
        client,
        limits(global_rate_per_s=SLOW, global_burst=10, read_rate_per_s=SLOW, read_burst=1),
        prefix,
    )
    before = REGISTRY.get_sample_value("gateway_ratelimit_redis_errors_total") or 0

    with caplog.at_level(logging.WARNING, logger="api_gateway.ratelimit"):
        first = await rl.acquire("meter-1", 5)
        second = await rl.acquire("meter-1", 5)
        read = await rl.acquire_read("account", "acme")
    await client.aclose()

    assert first.allowed and second.allowed and read.allowed
    assert REGISTRY.get_sample_value("gateway_ratelimit_redis_errors_total") - before == 3
    assert len([r for r in caplog.records if "cannot reach Redis" in r.message]) == 1
