"""The web page against a gateway whose read bucket is nearly empty: a read refused for its
rate (HTTP 429 with Retry-After) is tried again after the wait, so the page shows its data
instead of the refusal. Real refusals: GATEWAY_READ_BURST 1 and 2 reads a second per token,
while the page's sign-in and first refresh make three reads at once.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import grpc
import pytest

from billing_service.adapters.mongo import MongoCatalog
from common.energy.v1 import billing_pb2, gateway_pb2, gateway_pb2_grpc, reading_pb2
from common.gateway_client import gateway_channel
from tests.browser.test_web_page import CATALOG, fresh_page, sign_in, visible, wait_for
from tests.conftest import ADMIN_TOKEN, wait_until
from tests.e2e.conftest import TEST_SETTINGS, Stack, running

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

pytestmark = pytest.mark.e2e

DEVICE = "lathe-meter"  # of the browser tests' catalog


@pytest.fixture(scope="module")
async def web_stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """This module's own stack (the name overrides the browser tests' default one)."""
    stack = Stack(
        prefix=f"webrl{uuid.uuid4().hex[:6]}-",
        log_dir=tmp_path_factory.mktemp("logs"),
        settings={**TEST_SETTINGS, "GATEWAY_READ_RATE_PER_S": "2", "GATEWAY_READ_BURST": "1"},
    )
    async with running(stack):
        yield stack


@pytest.fixture(scope="module")
async def device_token(web_stack: Stack) -> str:
    """The device's token, once its reading is stored and billing has its tariff."""
    ledger = web_stack.ledger()
    await MongoCatalog(ledger.database).save(CATALOG, "read limit test catalog")
    ledger.close()
    async with gateway_channel(web_stack.gateway, ADMIN_TOKEN) as channel:
        admin = gateway_pb2_grpc.DeviceAdminStub(channel)
        issued = await admin.RegisterDevice(
            gateway_pb2.RegisterDeviceRequest(device_id=DEVICE), timeout=10
        )
        reading = reading_pb2.Reading(device_id=DEVICE, usage_kwh=0.75)
        reading.timestamp.FromDatetime(datetime.now(UTC) - timedelta(minutes=5))
        gateway = gateway_pb2_grpc.GatewayStub(channel)
        await gateway.SendReading(gateway_pb2.SendReadingRequest(reading=reading), timeout=10)

        async def billable() -> bool:  # the admin token reads without a bucket
            try:
                await gateway.GetLatestReading(
                    billing_pb2.GetLatestReadingRequest(device_id=DEVICE), timeout=10
                )
                await gateway.GetDeviceBill(
                    billing_pb2.GetDeviceBillRequest(device_id=DEVICE), timeout=10
                )
            except grpc.aio.AioRpcError:
                return False
            return True

        await wait_until(billable, what="the reading stored and the catalog loaded")
    return issued.token


async def test_reads_refused_for_their_rate_are_tried_again_after_the_wait(
    chrome: WebDriver, web_stack: Stack, device_token: str
) -> None:
    refused = {"scope": "reads"}
    before = await web_stack.metric("GATEWAY", "gateway_ratelimited_readings_total", refused)
    fresh_page(chrome, web_stack.gateway_http)
    sign_in(chrome, "device", DEVICE, device_token)
    wait_for(
        chrome,
        lambda d: (
            d.find_elements("id", "latest-usage")
            and d.find_element("id", "latest-usage").text == "0.75 kWh"
        ),
        "the latest reading",
    )
    assert not visible(chrome, "error"), chrome.find_element("id", "error").text
    after = await web_stack.metric("GATEWAY", "gateway_ratelimited_readings_total", refused)
    assert after > before, "no read was refused: the test shows nothing about the retry"
