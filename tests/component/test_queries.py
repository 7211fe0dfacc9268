"""The read API of billing_service against SecantusDB and real Redis, Redis flushed and stopped.

Readings go in through the broker and the consumer; the queries come out over gRPC from
billing's own server. Bills are checked against plain Decimal arithmetic on the readings
the test made (not billing's compute_bill), so the storage path (slots in MongoDB, copies
in Redis) and the pricing are both under test.
"""

from __future__ import annotations

import asyncio
import calendar
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal

import grpc
import pytest
import redis.asyncio as redis
from prometheus_client import REGISTRY

from billing_service.adapters.mongo import MongoCatalog
from billing_service.app import BillingApp
from billing_service.domain.ledger import SlotKey
from common.energy.v1 import billing_pb2, billing_pb2_grpc
from common.messages import encode_reading
from common.models import Reading, validate_reading
from tests.component.test_billing import cleanup, publish, settings
from tests.conftest import free_port, wait_until

CATALOG = """
default_tariff: fallback
tariffs:
  - id: flat-eur
    currency: EUR
    time_zone: Europe/Berlin
    standing_charge_per_day: "0.45"
    tax_rate: "0.19"
    energy: {kind: flat, price_per_kwh: "0.30"}
  - id: fallback
    currency: EUR
    time_zone: Europe/Berlin
    energy: {kind: flat, price_per_kwh: "0.50"}
accounts:
  - {id: acme, name: ACME}
devices:
  - {id: meter-1, account: acme, site: plant, tariff: flat-eur}
  - {id: meter-2, account: acme, site: office, tariff: flat-eur}
"""
NOW = datetime.now(UTC)
# The previous month, in Berlin: a closed period, whatever day the test runs.
_first_of_month = NOW.astimezone().replace(day=1)
PERIOD = (_first_of_month - timedelta(days=1)).strftime("%Y-%m")
BASE = datetime.fromisoformat(f"{PERIOD}-10T08:00:00+00:00")


def readings(device: str, count: int = 90) -> list[Reading]:
    return [
        validate_reading(
            device, BASE + timedelta(minutes=i), round(0.01 * (i % 7) + 0.1, 3), now=NOW
        )
        for i in range(count)
    ]


@dataclass
class Running:
    app: BillingApp
    stub: billing_pb2_grpc.BillingStub
    redis_process: asyncio.subprocess.Process
    prefix: str


async def start_redis(port: int) -> asyncio.subprocess.Process:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    process = await asyncio.create_subprocess_exec(
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        stdout=asyncio.subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)

    async def answers() -> bool:
        try:
            return bool(await client.ping())
        except OSError:
            return False
        except redis.ConnectionError:
            return False

    await wait_until(answers, what="private Redis")
    await client.aclose()
    return process


@pytest.fixture
async def running(prefix: str) -> AsyncIterator[Running]:
    port = free_port()
    redis_process = await start_redis(port)
    app = BillingApp(
        settings(prefix).model_copy(
            update={
                "redis_url": f"redis://127.0.0.1:{port}/0",
                "redis_timeout_s": 0.5,
                "cache_retry_s": 0.2,
            }
        )
    )
    await MongoCatalog(app.ledger.database).save(CATALOG, "test catalog")
    await app.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    yield Running(app, billing_pb2_grpc.BillingStub(channel), redis_process, prefix)
    await channel.close()
    await app.stop()
    if redis_process.returncode is None:
        redis_process.terminate()
        await redis_process.wait()
    await cleanup(prefix, app)


async def send(running: Running, batch: list[Reading]) -> None:
    """Publish the batch and wait until billing has acked every message (so every slot it
    marks changed is marked before the test reads)."""
    before = acked()
    await publish(running.prefix, [encode_reading(r) for r in batch])

    async def all_acked() -> bool:
        return acked() - before >= len(batch)

    await wait_until(all_acked, what="every message acked")


def acked() -> float:
    labels = {"consumer": "billing", "outcome": "acked"}
    return REGISTRY.get_sample_value("consumer_messages_total", labels) or 0.0


# The catalog's flat tariffs as the test reads them: price per kWh, standing charge per
# day, tax rate. Bills are worked out below with Decimal, not with billing's code.
TARIFFS = {
    "flat-eur": (Decimal("0.30"), Decimal("0.45"), Decimal("0.19")),
    "fallback": (Decimal("0.50"), Decimal(0), Decimal(0)),
}


@dataclass(frozen=True)
class ExpectedBill:
    total: Decimal
    energy_kwh: Decimal
    amounts: list[Decimal]  # energy, standing charge, tax


def cents(amount: Decimal) -> Decimal:
    return amount.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def expected_bill(batch: list[Reading], tariff_id: str = "flat-eur") -> ExpectedBill:
    """A closed month of a flat tariff: every distinct reading's energy (all of them fall
    on one day in the middle of the month), the standing charge for each day, and tax."""
    price, per_day, tax_rate = TARIFFS[tariff_id]
    energy = sum(Decimal(repr(r.usage_kwh)) for r in {r.reading_id: r for r in batch}.values())
    year, month = int(PERIOD[:4]), int(PERIOD[5:])
    energy_amount = cents(energy * price)
    standing = cents(calendar.monthrange(year, month)[1] * per_day)
    tax = cents((energy_amount + standing) * tax_rate)
    return ExpectedBill(energy_amount + standing + tax, energy, [energy_amount, standing, tax])


async def device_bill(running: Running, device: str, period: str = PERIOD) -> billing_pb2.Bill:
    request = billing_pb2.GetDeviceBillRequest(device_id=device, period=period)
    return (await running.stub.GetDeviceBill(request, timeout=10)).bill


async def status_of(call) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code(), caught.value.details()


async def test_bills_are_the_same_from_redis_from_mongodb_and_with_redis_down(running) -> None:
    batch = readings("meter-1")
    await send(running, batch + batch[:20])
    expected = expected_bill(batch)
    first = await device_bill(running, "meter-1")  # MongoDB; fills Redis
    assert (Decimal(first.total), Decimal(first.energy_kwh), first.currency) == (
        expected.total,
        expected.energy_kwh,
        "EUR",
    )
    assert [Decimal(line.amount) for line in first.lines] == expected.amounts
    assert not first.unregistered
    months = {SlotKey.of(r).month for r in batch}
    assert await redis_holds_all_of(running, months)  # the first bill filled Redis
    assert await device_bill(running, "meter-1") == first  # now from Redis's complete copy

    client = redis.Redis.from_url(running.app.settings.redis_url)
    await client.flushall()
    await client.aclose()
    assert not await redis_holds_all_of(running, months)
    assert await device_bill(running, "meter-1") == first  # flushed: rebuilt from MongoDB
    assert await redis_holds_all_of(running, months)

    running.redis_process.kill()
    await running.redis_process.wait()
    failures = cache_failures()
    assert await device_bill(running, "meter-1") == first  # Redis down: MongoDB answers
    assert cache_failures() > failures, "Redis down, yet no query fell back to MongoDB"


async def redis_holds_all_of(running, months: set[str]) -> bool:  # type: ignore[no-untyped-def]
    """Every month of meter-1 cached in full with no slot awaiting a refresh."""
    cached = [await running.app.cache.month_slots("meter-1", month) for month in months]
    return all(month.current for month in cached)


def cache_failures() -> float:
    return sum(
        REGISTRY.get_sample_value("billing_query_cache_failures_total", {"operation": op}) or 0
        for op in ("month_slots", "refresh_month", "latest", "put_latest")
    )


async def test_an_account_bill_sums_its_devices(running) -> None:
    one, two = readings("meter-1", 30), readings("meter-2", 45)
    await send(running, one + two)
    request = billing_pb2.GetAccountBillRequest(account_id="acme", period=PERIOD)
    account = await running.stub.GetAccountBill(request, timeout=10)
    totals = {b.device_id: Decimal(b.total) for b in account.bills}
    assert totals == {"meter-1": expected_bill(one).total, "meter-2": expected_bill(two).total}
    assert Decimal(account.total) == expected_bill(one).total + expected_bill(two).total


async def test_an_unregistered_device_is_billed_under_the_default_tariff(running) -> None:
    batch = readings("stranger-7", 12)
    await send(running, batch)
    bill = await device_bill(running, "stranger-7")
    assert bill.unregistered and bill.tariff_id == "fallback"
    assert Decimal(bill.total) == expected_bill(batch, "fallback").total


async def test_latest_reading_from_redis_then_mongodb(running) -> None:
    batch = readings("meter-1", 10)
    await send(running, list(reversed(batch)))
    request = billing_pb2.GetLatestReadingRequest(device_id="meter-1")
    answer = (await running.stub.GetLatestReading(request, timeout=10)).reading
    assert answer.reading_id == batch[-1].reading_id
    client = redis.Redis.from_url(running.app.settings.redis_url)
    await client.flushall()
    await client.aclose()
    again = (await running.stub.GetLatestReading(request, timeout=10)).reading
    assert again == answer
    assert await running.app.cache.latest("meter-1") == batch[-1]  # refilled
    running.redis_process.kill()
    await running.redis_process.wait()
    assert (await running.stub.GetLatestReading(request, timeout=10)).reading == answer


def usage_request(window: str, start: datetime, end: datetime, **extra: str):  # type: ignore[no-untyped-def]
    request = billing_pb2.GetUsageRequest(device_id="meter-1", window=window, **extra)
    request.start.FromDatetime(start)
    request.end.FromDatetime(end)
    return request


async def test_usage_windows_match_the_readings(running) -> None:
    batch = readings("meter-1", 90)  # 08:00 .. 09:29, one a minute
    await send(running, batch)
    start, end = BASE - timedelta(hours=1), BASE + timedelta(hours=3)
    hourly = (await running.stub.GetUsage(usage_request("1h", start, end), timeout=10)).buckets
    assert len(hourly) == 4
    for bucket in hourly:
        lo = bucket.start.ToDatetime(tzinfo=UTC)
        inside = [r for r in batch if lo < r.timestamp <= lo + timedelta(hours=1)]
        assert bucket.count == len(inside)
        assert bucket.sum_kwh == pytest.approx(sum(r.usage_kwh for r in inside))
        if inside:
            assert bucket.min_kwh == min(r.usage_kwh for r in inside)
            assert bucket.max_kwh == max(r.usage_kwh for r in inside)
            assert bucket.avg_kwh == pytest.approx(bucket.sum_kwh / bucket.count)
    minutes = (
        await running.stub.GetUsage(
            usage_request("5m", BASE, BASE + timedelta(minutes=30)), timeout=10
        )
    ).buckets
    assert [b.count for b in minutes] == [5] * 6
    empty = (
        await running.stub.GetUsage(
            usage_request(
                "1d",
                BASE - timedelta(hours=8) - timedelta(days=20),
                BASE - timedelta(hours=8) - timedelta(days=10),
            ),
            timeout=10,
        )
    ).buckets
    assert len(empty) == 10 and all(b.count == 0 and b.sum_kwh == 0 for b in empty)


@pytest.mark.parametrize(
    ("request_args", "message"),
    [
        (("2h", BASE, BASE + timedelta(hours=2)), "use one of 1m, 5m, 15m, 1h, 1d"),
        (("1h", BASE + timedelta(minutes=5), BASE + timedelta(hours=2)), "not on a 1h boundary"),
        (("1m", BASE, BASE + timedelta(days=20)), "narrow the range or use a larger window"),
        (("1h", BASE, BASE), "must be after start"),
    ],
)
async def test_invalid_usage_queries(running, request_args, message: str) -> None:
    code, details = await status_of(running.stub.GetUsage(usage_request(*request_args), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details


async def test_invalid_arguments_and_missing_things(running) -> None:
    stub = running.stub
    # Each call is already under way; status_of awaits it.
    cases = [
        (
            stub.GetUsage(
                usage_request("1d", BASE, BASE + timedelta(days=1), time_zone="Mars/Base")
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "not an IANA time zone",
        ),
        (
            stub.GetDeviceBill(billing_pb2.GetDeviceBillRequest(device_id="meter 1")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "device_id 'meter 1' is not valid",
        ),
        (
            stub.GetDeviceBill(
                billing_pb2.GetDeviceBillRequest(device_id="meter-1", period="2026-13")
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "use YYYY-MM",
        ),
        (
            stub.GetDeviceBill(
                billing_pb2.GetDeviceBillRequest(device_id="meter-1", period="2999-01")
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "has not started",
        ),
        (
            stub.GetDeviceBill(billing_pb2.GetDeviceBillRequest(device_id="nobody")),
            grpc.StatusCode.NOT_FOUND,
            "not registered and has no readings",
        ),
        (
            stub.GetAccountBill(billing_pb2.GetAccountBillRequest(account_id="ghost")),
            grpc.StatusCode.NOT_FOUND,
            "account 'ghost'",
        ),
        (
            stub.GetLatestReading(billing_pb2.GetLatestReadingRequest(device_id="meter-9")),
            grpc.StatusCode.NOT_FOUND,
            "has no readings",
        ),
        (
            stub.ListReadings(
                billing_pb2.ListReadingsRequest(device_id="meter-1", page_token="xx")
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "page_token is not one this service issued",
        ),
        (
            stub.ListReadings(billing_pb2.ListReadingsRequest(device_id="meter-1", page_size=5000)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "page_size 5000 is above 1000",
        ),
    ]
    for call, code, message in cases:
        actual, details = await status_of(call)
        assert (actual, message in details) == (code, True), details


async def test_pages_of_readings_cover_everything_once(running) -> None:
    batch = readings("meter-1", 23)
    await send(running, batch)
    seen, token = [], ""
    while True:
        request = billing_pb2.ListReadingsRequest(
            device_id="meter-1", page_size=5, page_token=token
        )
        page = await running.stub.ListReadings(request, timeout=10)
        seen += [r.reading_id for r in page.readings]
        token = page.next_page_token
        if not token:
            break
    assert seen == [r.reading_id for r in batch]
    other = billing_pb2.ListReadingsRequest(device_id="meter-2", page_size=5)
    first = await running.stub.ListReadings(
        billing_pb2.ListReadingsRequest(device_id="meter-1", page_size=5), timeout=10
    )
    other.page_token = first.next_page_token
    code, details = await status_of(running.stub.ListReadings(other, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "another device_id" in details


async def test_no_catalog_means_failed_precondition(running) -> None:
    running.app.catalog.current = None
    code, details = await status_of(
        running.stub.GetDeviceBill(billing_pb2.GetDeviceBillRequest(device_id="meter-1"))
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "make seed" in details
