"""End to end on real parts: 1,000 readings from 50 devices, some sent twice.

Half go by SendReading, half by SendReadings; 150 are resent. MongoDB must hold exactly
the distinct readings, Redis month-to-date (filled by a bill query) must equal MongoDB per
device, and analytics' /metrics must count each reading once. Every test runs twice: on the
broker, and with ingestion's broker connection slowed (the broker confirms several times
slower); the clients resend as loggers do.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import grpc
import pytest

from billing_service.domain.ledger import SlotKey, Total
from billing_service.queries import BillingQueries
from common.energy.v1 import gateway_pb2, gateway_pb2_grpc, reading_pb2
from common.gateway_client import gateway_channel
from common.models import Reading, validate_reading
from scripts.client_options import resend_delay_s, should_resend
from tests.conftest import ADMIN_TOKEN, wait_until
from tests.e2e.conftest import RESEND_FOR_S, Stack

DEVICES = 50
PER_DEVICE = 20
T = TypeVar("T")


@pytest.fixture(scope="module", params=["stack", "slow_broker_stack"], ids=["broker", "slow"])
def broker_stack(request: pytest.FixtureRequest) -> Stack:
    """The module's stack on the broker, then the one whose broker confirms slower."""
    return request.getfixturevalue(request.param)


async def resent(call: Callable[[], Awaitable[T]]) -> T:
    """``call()`` as a logger sends: what the platform cannot take now (should_resend) is
    sent again after the server's retry hint or a backoff of at most 5 s, for RESEND_FOR_S."""
    backoff_s, give_up = 0.5, time.monotonic() + RESEND_FOR_S
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as error:
            if not should_resend(error) or time.monotonic() > give_up:
                raise
            await asyncio.sleep(resend_delay_s(error, backoff_s))
            backoff_s = min(2 * backoff_s, 5.0)


def fleet() -> list[Reading]:
    now = datetime.now(UTC)
    start = now.replace(second=0, microsecond=0) - timedelta(hours=3)
    return [
        validate_reading(
            f"e2e-meter-{d:02d}",
            start + timedelta(minutes=5 * i),
            round(0.05 + 0.013 * d + 0.001 * i, 4),
            now=now,
        )
        for d in range(DEVICES)
        for i in range(PER_DEVICE)
    ]


def as_request(reading: Reading) -> gateway_pb2.SendReadingRequest:
    message = reading_pb2.Reading(device_id=reading.device_id, usage_kwh=reading.usage_kwh)
    message.timestamp.FromDatetime(reading.timestamp)
    return gateway_pb2.SendReadingRequest(reading=message)


async def send_one_by_one(stub: gateway_pb2_grpc.GatewayStub, readings: list[Reading]) -> None:
    limit = asyncio.Semaphore(32)

    async def send(reading: Reading) -> None:
        async with limit:
            response = await resent(lambda: stub.SendReading(as_request(reading), timeout=10))
            assert response.reading_id == reading.reading_id

    await asyncio.gather(*(send(r) for r in readings))


async def send_streams(stub: gateway_pb2_grpc.GatewayStub, readings: list[Reading]) -> None:
    by_device: dict[str, list[Reading]] = defaultdict(list)
    for reading in readings:
        by_device[reading.device_id].append(reading)

    async def stream(batch: list[Reading]) -> None:
        async def requests():
            for reading in batch:
                yield as_request(reading)

        response = await resent(lambda: stub.SendReadings(requests(), timeout=30))
        assert (response.accepted, response.rejected_count) == (len(batch), 0)

    await asyncio.gather(*(stream(batch) for batch in by_device.values()))


async def test_every_reading_is_billed_once_and_counted_once(broker_stack: Stack) -> None:
    """Every reading billed once and counted once; then analytics, restarted, restores the
    devices' activity from billing."""
    stack = broker_stack
    readings = fleet()
    by_unary, by_stream = readings[: len(readings) // 2], readings[len(readings) // 2 :]
    resent_unary, resent_stream = by_unary[::5], by_stream[::10]
    async with gateway_channel(stack.gateway, ADMIN_TOKEN) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        await asyncio.gather(send_one_by_one(stub, by_unary), send_streams(stub, by_stream))
        await asyncio.gather(send_one_by_one(stub, resent_unary), send_streams(stub, resent_stream))
    delivered = len(readings) + len(resent_unary) + len(resent_stream)
    assert (len(readings), delivered) == (1000, 1150)

    async def all_processed() -> bool:
        stack.assert_running()
        # Readings, not messages: ingestion puts many readings in one message (schema 2).
        billing = await stack.metric("BILLING", "consumer_readings_total", {"outcome": "acked"})
        analytics = await stack.metric("ANALYTICS", "consumer_readings_total", {"outcome": "acked"})
        return billing == analytics == delivered

    await wait_until(all_processed, timeout_s=120, what=f"{delivered} readings acked")

    ledger, cache = stack.ledger(), stack.cache()
    queries = BillingQueries(ledger, cache, catalog=None, max_buckets=1000)  # type: ignore[arg-type]
    try:
        assert await ledger.readings.count_documents({}) == 1000
        expected: dict[str, dict[datetime, Total]] = defaultdict(dict)
        for r in readings:
            key = SlotKey.of(r)
            slots = expected[r.device_id]
            slots[key.start] = slots.get(key.start, Total()) + Total(1, r.usage_milliwh)
        start = min(r.timestamp for r in readings) - timedelta(hours=1)
        end = max(r.timestamp for r in readings) + timedelta(hours=1)
        for device_id, slots in expected.items():
            rows = await ledger.slots(device_id, start, end)
            assert {row.start: row.total for row in rows} == slots, device_id
            # Billing only marks the slots it changes; the read side copies them to Redis.
            assert await queries.slot_totals(device_id, start, end) == slots, device_id
            cached: dict[datetime, Total] = {}
            for month in {key.strftime("%Y-%m") for key in slots}:
                held = await cache.month_slots(device_id, month)
                assert held.current, device_id
                cached |= held.slots
            assert cached == slots, device_id
        for device_id in {r.device_id for r in readings}:
            newest = max(
                (r for r in readings if r.device_id == device_id), key=lambda r: r.timestamp
            )
            assert await cache.latest(device_id) == newest
    finally:
        ledger.close()
        await cache.close()

    assert await stack.metric("BILLING", "billing_readings_total", {"result": "billed"}) == 1000
    assert await stack.metric("BILLING", "billing_readings_total", {"result": "duplicate"}) == 150
    assert await stack.metric("ANALYTICS", "energy_readings_total") == 1000
    assert await stack.metric("ANALYTICS", "energy_duplicate_readings_total") == 150
    assert math.isclose(
        await stack.metric("ANALYTICS", "energy_received_kwh_total"),
        sum(r.usage_kwh for r in readings),
        rel_tol=1e-9,
    )
    assert await stack.metric("ANALYTICS", "energy_active_devices") == DEVICES
    assert await stack.metric("ANALYTICS", "consumer_reading_lag_seconds_count") == delivered
    assert await stack.metric("GATEWAY", "gateway_readings_accepted_total") == delivered
    assert await stack.metric("INGESTION", "ingestion_published_total") == delivered
    assert await stack.metric(
        "GATEWAY",
        "grpc_server_handled_total",
        {"grpc_method": "SendReadings", "grpc_code": "OK"},
    ) == DEVICES // 2 + len({r.device_id for r in resent_stream})

    # Part of this test, not one of its own: tests run in a random order (pytest-randomly).
    # The readings are 1.5 to 3 hours old: after a restart all 50 devices are silent.
    await stack.restart("analytics_service")

    async def restored() -> bool:
        return await stack.metric("ANALYTICS", "energy_silent_devices") == DEVICES

    await wait_until(restored, what="silent devices restored from Redis")
    assert await stack.metric("ANALYTICS", "energy_active_devices") == 0
