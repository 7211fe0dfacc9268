"""A fleet end to end: 300 devices, duplicates, resends and late readings, each billed once.

The readings of 300 devices cover several 15-minute slots and go through all four services
as bulk imports (scripts.import_csv, which resends what backpressure refused). The first
import shuffles them (out of order within each device) and repeats some; once billing
holds them, a second import resends some and adds late readings, older than readings
already billed. The test waits as long as billing makes progress, then checks every
device through the gateway's read API against what the sent readings give, each counted
once: 15-minute usage, the stored readings, the latest reading; and the billing and
analytics counters: billed = distinct readings, every other delivery a duplicate.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections import defaultdict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from billing_service.domain.ledger import SlotKey, Total
from common.energy.v1 import billing_pb2, gateway_pb2_grpc
from common.gateway_client import gateway_channel
from common.models import MILLIWH_PER_KWH, Reading, validate_reading
from scripts.import_csv import ImportSummary
from tests.conftest import ADMIN_TOKEN, expected_totals, wait_while_progressing
from tests.e2e.conftest import Stack, send_resending

pytestmark = pytest.mark.timeout(1800)  # the waits end on a stall, not on a deadline

DEVICES = 300
SLOT = timedelta(minutes=15)
# Minutes after the device's first slot start, and the slot (0-3) each reading belongs to:
# usage is for the interval that ends at the timestamp, so 15 is the end of slot 0.
ON_TIME = ((5, 0), (15, 0), (21.25, 1), (45.5, 3))  # slot 2 stays empty
LATE = (10, 0)  # every third device: sent after the readings of slots 1 and 3 were billed


def fleet(now: datetime) -> tuple[list[Reading], list[Reading], dict[str, datetime]]:
    """On-time readings, late ones, and each reading id's slot start worked out by hand."""
    first = now.replace(minute=now.minute // 15 * 15, second=0, microsecond=0) - timedelta(hours=6)
    on_time: list[Reading] = []
    late: list[Reading] = []
    slot_of: dict[str, datetime] = {}
    for d in range(DEVICES):
        start = first + (d % 4) * SLOT  # the fleet's devices begin in four different slots
        plan = [(minutes, slot, on_time) for minutes, slot in ON_TIME]
        if d % 3 == 0:
            plan.append((*LATE, late))
        for i, (minutes, slot, into) in enumerate(plan):
            reading = validate_reading(
                f"fleet-{d:03d}",
                start + timedelta(minutes=minutes),
                round(0.1 + 0.0007 * d + 0.01 * i, 4),
                now=now,
            )
            slot_of[reading.reading_id] = start + slot * SLOT
            into.append(reading)
    return on_time, late, slot_of


def shuffled(readings: list[Reading], seed: int) -> list[Reading]:
    copy = list(readings)
    random.Random(seed).shuffle(copy)
    return copy


async def billing_counts(stack: Stack) -> tuple[float, float]:
    """Readings billing has billed and those it found billed already."""
    stack.assert_running()
    return (
        await stack.metric("BILLING", "billing_readings_total", {"result": "billed"}),
        await stack.metric("BILLING", "billing_readings_total", {"result": "duplicate"}),
    )


async def analytics_counts(stack: Stack) -> tuple[float, float]:
    """Readings analytics has counted and those it found counted already."""
    stack.assert_running()
    return (
        await stack.metric("ANALYTICS", "energy_readings_total"),
        await stack.metric("ANALYTICS", "energy_duplicate_readings_total"),
    )


async def processed(
    stack: Stack,
    counts: Callable[[Stack], Awaitable[tuple[float, float]]],
    distinct: int,
    delivered: int,
    what: str,
) -> tuple[float, float]:
    """Wait while the counts grow until ``distinct`` readings and ``delivered`` deliveries
    are in them (a resent stream delivers more; the exact checks come after)."""
    return await wait_while_progressing(
        lambda: counts(stack),
        lambda c: c[0] >= distinct and c[0] + c[1] >= delivered,
        f"{what} to process {delivered} deliveries of {distinct} readings",
    )


async def test_every_reading_of_a_fleet_is_billed_exactly_once(
    stack: Stack, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    on_time, late, slot_of = fleet(now)
    readings = on_time + late
    assert len({r.reading_id for r in readings}) == len(readings) == 1300
    # The oracle agrees with the slots worked out by hand (the boundary rule included).
    assert {(k.device_id, k.start) for k in expected_totals(readings)} == {
        (r.device_id, slot_of[r.reading_id]) for r in readings
    }

    first = shuffled(on_time + on_time[::7], seed=1)  # out of order; 172 repeated
    sent: list[ImportSummary] = [
        await send_resending(stack, first, tmp_path / "first.csv", batch=100, streams=8)
    ]
    await processed(stack, billing_counts, len(on_time), len(first), "billing")

    again = shuffled(on_time[::5] + late, seed=2)  # 240 resent, 100 late
    sent.append(await send_resending(stack, again, tmp_path / "again.csv", batch=100, streams=8))
    delivered = len(first) + len(again)
    assert [s.accepted for s in sent] == [len(first), len(again)]

    billed, duplicates = await processed(stack, billing_counts, len(readings), delivered, "billing")
    counted, recounted = await processed(
        stack, analytics_counts, len(readings), delivered, "analytics"
    )
    resent_streams = sum(s.retries for s in sent)
    print(
        f"\n{DEVICES} devices: {len(readings)} readings in {delivered} deliveries, "
        f"imports {' + '.join(f'{s.elapsed_s:.1f} s' for s in sent)}, "
        f"{resent_streams} streams resent after backpressure"
    )
    assert billed == counted == len(readings)
    if resent_streams:  # a refused stream may have delivered part of itself before
        assert duplicates >= delivered - len(readings) and recounted >= delivered - len(readings)
    else:
        assert duplicates == recounted == delivered - len(readings)
    assert math.isclose(
        await stack.metric("ANALYTICS", "energy_received_kwh_total"),
        sum(r.usage_kwh for r in readings),
        rel_tol=1e-9,
    )
    await check_read_side(stack, readings)


async def check_read_side(stack: Stack, readings: list[Reading]) -> None:
    """Per device through the gateway: 15-minute usage, stored readings, latest reading."""
    slots: dict[str, dict[datetime, Total]] = defaultdict(dict)
    for key, total in expected_totals(readings).items():
        slots[key.device_id][key.start] = total
    extremes: dict[SlotKey, list[int]] = defaultdict(list)
    by_device: dict[str, list[Reading]] = defaultdict(list)
    for r in readings:
        extremes[SlotKey.of(r)].append(r.usage_milliwh)
        by_device[r.device_id].append(r)
    limit = asyncio.Semaphore(16)

    async def check(stub: gateway_pb2_grpc.GatewayStub, device_id: str) -> None:
        expected = slots[device_id]
        request = billing_pb2.GetUsageRequest(device_id=device_id, window="15m")
        request.start.FromDatetime(min(expected) - SLOT)
        request.end.FromDatetime(max(expected) + 2 * SLOT)
        async with limit:
            buckets = (await stub.GetUsage(request, timeout=30)).buckets
            page = await stub.ListReadings(
                billing_pb2.ListReadingsRequest(device_id=device_id, page_size=100), timeout=30
            )
            latest = await stub.GetLatestReading(
                billing_pb2.GetLatestReadingRequest(device_id=device_id), timeout=30
            )
        assert len(buckets) == len(expected) + 3, device_id  # the empty slots come back too
        usage = {
            b.start.ToDatetime(tzinfo=UTC): (
                Total(b.count, round(b.sum_kwh * MILLIWH_PER_KWH)),
                round(b.min_kwh * MILLIWH_PER_KWH),
                round(b.max_kwh * MILLIWH_PER_KWH),
            )
            for b in buckets
            if b.count
        }
        assert usage == {
            start: (
                total,
                min(extremes[SlotKey(device_id, start)]),
                max(extremes[SlotKey(device_id, start)]),
            )
            for start, total in expected.items()
        }, device_id
        own = sorted(by_device[device_id], key=lambda r: r.timestamp)
        assert not page.next_page_token, device_id
        assert [
            (r.reading_id, r.timestamp.ToDatetime(tzinfo=UTC), r.usage_kwh) for r in page.readings
        ] == [(r.reading_id, r.timestamp, r.usage_kwh) for r in own], device_id
        assert latest.reading.reading_id == own[-1].reading_id, device_id

    async with gateway_channel(stack.gateway, ADMIN_TOKEN) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        await asyncio.gather(*(check(stub, device_id) for device_id in slots))
