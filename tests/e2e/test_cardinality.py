"""Label cardinality: 10,000 distinct devices, and every /metrics stays under a fixed bound.

No metric carries a label per device except the bounded top-N of analytics, so the series
count of each service must not grow with the fleet. It runs twice: on the broker, and with
ingestion's broker connection slowed (the broker confirms several times slower), where the
streams meet ingestion's bound on readings in flight and are resent after its retry delay.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from common.models import validate_reading
from tests.conftest import wait_while_progressing
from tests.e2e.conftest import Stack, send_resending

pytestmark = pytest.mark.timeout(1800)  # the waits end on a stall, not on a deadline


@pytest.fixture(scope="module", params=["stack", "slow_broker_stack"], ids=["broker", "slow"])
def broker_stack(request: pytest.FixtureRequest) -> Stack:
    """The module's stack on the broker, then the one whose broker confirms slower."""
    return request.getfixturevalue(request.param)


DEVICES = 10_000
MAX_SERIES = 400  # per service; measured well below it, see the printed counts


async def series(stack: Stack, service: str) -> int:
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(stack.metrics_url(service))).text
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


async def test_series_do_not_grow_with_the_number_of_devices(
    broker_stack: Stack, tmp_path: Path
) -> None:
    stack = broker_stack
    before = {s: await series(stack, s) for s in ("GATEWAY", "INGESTION", "BILLING", "ANALYTICS")}
    now = datetime.now(UTC)
    # Recent, so every device counts as active (a reading within 15 minutes) at the end.
    stamp = now.replace(microsecond=0) - timedelta(seconds=1)
    readings = [
        validate_reading(f"fleet-{number:05d}", stamp, 0.25, now=now) for number in range(DEVICES)
    ]
    # 10 concurrent streams of 1,000; a stream refused under backpressure is resent.
    sent = await send_resending(stack, readings, tmp_path / "fleet.csv", batch=1000, streams=10)
    assert sent.accepted == DEVICES

    async def analytics_readings() -> float:
        stack.assert_running()
        return await stack.metric("ANALYTICS", "energy_readings_total")

    await wait_while_progressing(
        analytics_readings, lambda n: n >= DEVICES, "analytics to count every device"
    )
    assert await stack.metric("ANALYTICS", "energy_active_devices") == DEVICES

    async def billed() -> float:  # billing drains slowly on FerretDB; its labels appear
        stack.assert_running()
        return await stack.metric("BILLING", "billing_readings_total", {"result": "billed"})

    await wait_while_progressing(billed, lambda n: n >= 500, "billing to bill readings")
    after = {s: await series(stack, s) for s in before}
    print(
        f"\n{DEVICES} readings sent with {sent.retries} resent streams in {sent.elapsed_s:.1f} s;"
        f" series per /metrics before and after {DEVICES} devices: "
        + ", ".join(f"{s.lower()} {before[s]} -> {after[s]}" for s in after)
    )
    for service, count in after.items():
        assert count < MAX_SERIES, (service, count)
    top = await stack.metric("ANALYTICS", "energy_top_consumer_kwh", {"rank": "10"})
    assert top == 0.25
