"""The fleet's peak demand reaches /metrics from readings consumed from the real RabbitMQ.

Readings of three devices end in the same 15-minute slot of this month, one of them is
redelivered (inside a batch and in a message of its own), and a larger reading belongs to
last month's final slot: /metrics shows the three summed, times 4, and that slot's start.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from prometheus_client import REGISTRY, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from analytics_service.app import AnalyticsApp
from common.models import validate_reading
from tests.component.test_batch_messages import (  # noqa: F401 (analytics: a fixture)
    Grown,
    analytics,
    publish,
    v1,
    v2,
)
from tests.conftest import wait_until

pytestmark = pytest.mark.component


@pytest.fixture
def metrics_url() -> Iterator[str]:
    """/metrics of this process's registry on a port of its own, as analytics serves it."""
    server, thread = start_http_server(0, addr="127.0.0.1", registry=REGISTRY)
    yield f"http://127.0.0.1:{server.server_port}/metrics"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


async def scrape(url: str) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(url)).text
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("fleet_peak_demand")
    }


async def test_peak_demand_on_metrics_after_readings_flow(
    prefix: str,
    analytics: AnalyticsApp,  # noqa: F811
    metrics_url: str,
) -> None:
    now = datetime.now(UTC)
    month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    # In this month's slot that holds now (or its first, in the month's first second).
    ends = max(now - timedelta(seconds=1), month_start + timedelta(microseconds=1))
    slot_start = month_start + (ends - month_start - timedelta(microseconds=1)) // timedelta(
        minutes=15
    ) * timedelta(minutes=15)
    a, b, c = (
        validate_reading(device, ends, kwh, now=now)
        for device, kwh in (("meter-a", 1.0), ("meter-b", 0.5), ("meter-c", 0.25))
    )
    # Ends at midnight: last month's final slot, not this month's.
    last_month = validate_reading("meter-a", month_start, 100.0, now=now)
    messages = [v2("demand-1", [a, b, a]), v1(c), v1(a), v1(last_month)]
    grown = Grown("analytics")
    before = await scrape(metrics_url)
    assert before == {"fleet_peak_demand_kw": 0.0, "fleet_peak_demand_slot_start_seconds": 0.0}

    await publish(prefix, messages)
    await wait_until(lambda: grown.reached(messages_acked=4), what="four messages acked")

    assert await scrape(metrics_url) == {
        "fleet_peak_demand_kw": pytest.approx((1.0 + 0.5 + 0.25) * 4),  # a once
        "fleet_peak_demand_slot_start_seconds": slot_start.timestamp(),
    }
    assert analytics.demand.peak().kw == pytest.approx(7.0)
