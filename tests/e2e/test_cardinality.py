"""Label cardinality: 10,000 distinct devices, and every /metrics stays under a fixed bound.

No metric carries a label per device except the bounded top-N of analytics, so the series
count of each service must not grow with the fleet.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import httpx

from common.energy.v1 import gateway_pb2, gateway_pb2_grpc, reading_pb2
from common.gateway_client import gateway_channel
from tests.conftest import ADMIN_TOKEN, wait_until
from tests.e2e.conftest import Stack

DEVICES = 10_000
MAX_SERIES = 400  # per service; measured well below it, see the printed counts


async def series(stack: Stack, service: str) -> int:
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(stack.metrics_url(service))).text
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


async def test_series_do_not_grow_with_the_number_of_devices(stack: Stack) -> None:
    before = {s: await series(stack, s) for s in ("GATEWAY", "INGESTION", "BILLING", "ANALYTICS")}
    stamp = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)

    async def stream(first: int) -> None:
        async def requests():
            for number in range(first, first + 1000):
                message = reading_pb2.Reading(device_id=f"fleet-{number:05d}", usage_kwh=0.25)
                message.timestamp.FromDatetime(stamp)
                yield gateway_pb2.SendReadingRequest(reading=message)

        answer = await stub.SendReadings(requests(), timeout=120)
        assert answer.accepted == 1000

    async with gateway_channel(stack.gateway, ADMIN_TOKEN) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        await asyncio.gather(*(stream(first) for first in range(0, DEVICES, 1000)))

    async def analytics_saw_all() -> bool:
        return await stack.metric("ANALYTICS", "energy_readings_total") >= DEVICES

    await wait_until(analytics_saw_all, timeout_s=120, what="analytics to count every device")
    assert await stack.metric("ANALYTICS", "energy_active_devices") == DEVICES

    async def billing_is_busy() -> bool:  # billing drains slowly on FerretDB; its labels
        return await stack.metric("BILLING", "billing_readings_total", {"result": "billed"}) >= 500

    await wait_until(billing_is_busy, timeout_s=120, what="billing to bill readings")
    after = {s: await series(stack, s) for s in before}
    print(
        f"\nseries per /metrics before and after {DEVICES} devices: "
        + ", ".join(f"{s.lower()} {before[s]} -> {after[s]}" for s in after)
    )
    for service, count in after.items():
        assert count < MAX_SERIES, (service, count)
    top = await stack.metric("ANALYTICS", "energy_top_consumer_kwh", {"rank": "10"})
    assert top == 0.25
