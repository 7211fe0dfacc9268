"""Through the gateway: readings in, then bills, usage windows, latest and pages read back.

The expected bill is worked out here with plain Decimal arithmetic, not with billing's
own code: a flat tariff, a closed month, a daily standing charge and tax.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal

import grpc

from billing_service.adapters.mongo import MongoCatalog
from common.energy.v1 import billing_pb2, gateway_pb2, gateway_pb2_grpc, reading_pb2
from common.gateway_client import gateway_channel
from common.models import Reading, validate_reading
from tests.conftest import ADMIN_TOKEN, wait_until
from tests.e2e.conftest import Stack

CATALOG = """
default_tariff: home
tariffs:
  - id: home
    currency: EUR
    time_zone: UTC
    standing_charge_per_day: "0.40"
    tax_rate: "0.20"
    energy: {kind: flat, price_per_kwh: "0.25"}
accounts:
  - {id: household, name: A household}
devices:
  - {id: home-meter, account: household, site: house, tariff: home}
"""
NOW = datetime.now(UTC)
MONTH_START = (
    NOW.replace(day=1, hour=0, minute=0, second=0, microsecond=0) - timedelta(days=1)
).replace(day=1)
MONTH_END = (MONTH_START + timedelta(days=32)).replace(day=1)
PERIOD = MONTH_START.strftime("%Y-%m")


def fleet() -> list[Reading]:
    start = MONTH_START + timedelta(days=3, hours=6)
    return [
        validate_reading(
            "home-meter",
            start + timedelta(minutes=10 * i),
            round(0.05 + 0.01 * (i % 9), 3),
            now=NOW,
        )
        for i in range(144)  # one day, a reading every 10 minutes
    ]


def cents(amount: Decimal) -> Decimal:
    return amount.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


async def test_bill_usage_latest_and_pages_read_back_through_the_gateway(stack: Stack) -> None:
    ledger = stack.ledger()
    await MongoCatalog(ledger.database).save(CATALOG, "e2e catalog")
    ledger.close()
    readings = fleet()
    async with gateway_channel(stack.gateway, ADMIN_TOKEN) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)

        async def requests():
            for r in readings + readings[:30]:  # some sent twice
                message = reading_pb2.Reading(device_id=r.device_id, usage_kwh=r.usage_kwh)
                message.timestamp.FromDatetime(r.timestamp)
                yield gateway_pb2.SendReadingRequest(reading=message)

        assert (await stub.SendReadings(requests(), timeout=30)).accepted == 174
        bill_request = billing_pb2.GetDeviceBillRequest(device_id="home-meter", period=PERIOD)

        async def billed() -> bool:
            try:
                bill = (await stub.GetDeviceBill(bill_request, timeout=10)).bill
            except grpc.aio.AioRpcError:
                return False  # the catalog is not loaded yet
            return Decimal(bill.energy_kwh) == sum(Decimal(str(r.usage_kwh)) for r in readings)

        await wait_until(billed, what="the month's bill to include every reading")
        bill = (await stub.GetDeviceBill(bill_request, timeout=10)).bill

        energy = sum(Decimal(str(r.usage_kwh)) for r in readings)
        days = (MONTH_END - MONTH_START).days
        energy_amount = cents(energy * Decimal("0.25"))
        standing = cents(days * Decimal("0.40"))
        tax = cents((energy_amount + standing) * Decimal("0.20"))
        assert [(line.unit, line.amount) for line in bill.lines] == [
            ("kWh", str(energy_amount)),
            ("day", str(standing)),
            ("", str(tax)),
        ]
        assert bill.total == str(energy_amount + standing + tax)
        assert (bill.currency, bill.period, bill.tariff_id) == ("EUR", PERIOD, "home")

        account = await stub.GetAccountBill(
            billing_pb2.GetAccountBillRequest(account_id="household", period=PERIOD), timeout=10
        )
        assert account.total == bill.total
        # Forwarded to billing; the test stack never closes a period on its own, so last
        # month is still an estimate and no bill is issued.
        assert account.status == billing_pb2.BILL_STATUS_ESTIMATE
        listed_bills = await stub.ListBills(
            billing_pb2.ListBillsRequest(account_id="household"), timeout=10
        )
        assert list(listed_bills.bills) == [] and not listed_bills.next_page_token
        try:
            await stub.ListBills(
                billing_pb2.ListBillsRequest(account_id="household", page_size=1000), timeout=10
            )
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        else:
            raise AssertionError("a page of 1000 bills was answered")

        usage_request = billing_pb2.GetUsageRequest(device_id="home-meter", window="1h")
        usage_request.start.FromDatetime(readings[0].timestamp - timedelta(hours=1))
        usage_request.end.FromDatetime(readings[0].timestamp + timedelta(hours=25))
        buckets = (await stub.GetUsage(usage_request, timeout=10)).buckets
        for bucket in buckets:
            lo = bucket.start.ToDatetime(tzinfo=UTC)
            inside = [r.usage_kwh for r in readings if lo < r.timestamp <= lo + timedelta(hours=1)]
            assert (bucket.count, round(bucket.sum_kwh, 9)) == (len(inside), round(sum(inside), 9))
        assert sum(b.count for b in buckets) == len(readings)

        latest = await stub.GetLatestReading(
            billing_pb2.GetLatestReadingRequest(device_id="home-meter"), timeout=10
        )
        assert latest.reading.reading_id == readings[-1].reading_id

        listed, token = [], ""
        while True:
            page = await stub.ListReadings(
                billing_pb2.ListReadingsRequest(
                    device_id="home-meter", page_size=50, page_token=token
                ),
                timeout=10,
            )
            listed += [r.reading_id for r in page.readings]
            if not (token := page.next_page_token):
                break
        assert listed == [r.reading_id for r in readings]

        try:
            await stub.GetUsage(billing_pb2.GetUsageRequest(device_id="home-meter"), timeout=10)
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "start is missing" in (error.details() or "")
        else:
            raise AssertionError("a usage query without a range was answered")
    await asyncio.sleep(0)
