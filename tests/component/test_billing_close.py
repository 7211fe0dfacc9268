"""Issued bills against SecantusDB, real Redis and RabbitMQ: closing a period stores one bill
that never changes, a late reading becomes one adjustment on the next bill, ListBills pages
newest first, and a catalog edit that would change a closed period is refused.

Periods are months of 2025, long ended whatever day the tests run; billing's own closing
loop is off (BILLING_CLOSE_CHECK_INTERVAL_S=0), the tests close periods themselves.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import grpc
import pymongo
import pytest

from billing_service.adapters.mongo import LATE_MARKS, MongoCatalog
from billing_service.adapters.mongo_bills import MongoBillStore
from billing_service.app import BillingApp
from billing_service.domain.tariff import CatalogError
from common.energy.v1 import billing_pb2, billing_pb2_grpc
from common.models import Reading, validate_reading
from tests.component.test_billing import cleanup, settings
from tests.component.test_queries import send
from tests.conftest import ACME_CATALOG, MONGODB_URL

CATALOG = ACME_CATALOG
# The price of a closed period edited: refused.
EDITED = CATALOG.replace('price_per_kwh: "0.30"', 'price_per_kwh: "0.31"')
# A new version after the closed periods: accepted.
NEW_VERSION = CATALOG.replace(
    """    standing_charge_per_day: "0.45"
    tax_rate: "0.19"
    energy: {kind: flat, price_per_kwh: "0.30"}""",
    """    versions:
      - standing_charge_per_day: "0.45"
        tax_rate: "0.19"
        energy: {kind: flat, price_per_kwh: "0.30"}
      - effective_from: 2025-06-01
        standing_charge_per_day: "0.45"
        tax_rate: "0.19"
        energy: {kind: flat, price_per_kwh: "0.35"}""",
)
NOW = datetime.now(UTC)
REPO = Path(__file__).resolve().parents[2]


def month_readings(month: str, device: str, kwh: float = 0.5, count: int = 8) -> list[Reading]:
    base = datetime.fromisoformat(f"{month}-10T08:00:00+00:00")
    return [
        validate_reading(device, base + timedelta(minutes=15 * i), kwh, now=NOW)
        for i in range(count)
    ]


@dataclass
class Running:
    app: BillingApp
    stub: billing_pb2_grpc.BillingStub
    prefix: str


@pytest.fixture
async def running(prefix: str) -> AsyncIterator[Running]:
    app = BillingApp(settings(prefix))
    await MongoCatalog(app.ledger.database).save(CATALOG, "tariffs.yaml")
    # Late-write marks complete for days (domain/late.py), as on a database billing has
    # written for a while: open bills recompute only the issued months marks touched.
    await app.ledger.database["meta"].insert_one({"_id": LATE_MARKS, "since": NOW - timedelta(7)})
    await app.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    try:
        yield Running(app, billing_pb2_grpc.BillingStub(channel), prefix)
    finally:
        await channel.close()
        await app.stop()
        await cleanup(prefix, app)


async def device_bill(running: Running, device: str, period: str) -> billing_pb2.Bill:
    response = await running.stub.GetDeviceBill(
        billing_pb2.GetDeviceBillRequest(device_id=device, period=period), timeout=10
    )
    return response.bill


async def account_bill(running: Running, period: str) -> billing_pb2.GetAccountBillResponse:
    return await running.stub.GetAccountBill(
        billing_pb2.GetAccountBillRequest(account_id="acme", period=period), timeout=10
    )


def charges_with(subtotal: Decimal, added: Decimal) -> Decimal:
    """Subtotal + tax (19%, rounded half up to cents) of a subtotal with ``added`` more."""
    new = subtotal + added
    return new + (Decimal("0.19") * new).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


async def test_a_closed_period_is_issued_once_and_late_readings_become_one_adjustment(
    running: Running,
) -> None:
    app = running.app
    await send(running, month_readings("2025-01", "meter-1") + month_readings("2025-01", "meter-2"))  # type: ignore[arg-type]

    first = await app.closer.close_period("acme", "2025-01")
    assert first.issued_now and first.bill.number == 1
    assert first.bill.bill_id == "acme-2025-01"
    again = await app.closer.close_period("acme", "2025-01")
    assert not again.issued_now and again.bill.response_bytes == first.bill.response_bytes

    issued_account = await account_bill(running, "2025-01")
    assert issued_account.SerializeToString(deterministic=True) == first.bill.response_bytes
    assert issued_account.status == billing_pb2.BILL_STATUS_ISSUED
    assert (issued_account.number, issued_account.bill_id) == (1, "acme-2025-01")
    issued_device = await device_bill(running, "meter-1", "2025-01")
    stored_device = first.bill.device("meter-1")
    assert stored_device is not None
    assert issued_device.SerializeToString(deterministic=True) == stored_device.bill_bytes
    assert issued_device.status == billing_pb2.BILL_STATUS_ISSUED
    assert issued_device.energy_kwh == "4"

    # A late reading for January: the issued bills do not change, byte for byte.
    late = validate_reading("meter-1", datetime(2025, 1, 20, 10, 0, tzinfo=UTC), 1.0, now=NOW)
    await send(running, [late])  # type: ignore[arg-type]
    marks = await app.ledger.late_writes("meter-1")
    assert (
        marks.days.keys() == {datetime(2025, 1, day, tzinfo=UTC) for day in (10, 20)}
        and marks.reliable_from is not None
    )
    assert (await account_bill(running, "2025-01")).SerializeToString(
        deterministic=True
    ) == first.bill.response_bytes
    assert (await device_bill(running, "meter-1", "2025-01")).SerializeToString(
        deterministic=True
    ) == stored_device.bill_bytes

    # February (not issued): an estimate carrying the correction of January once.
    estimate = await device_bill(running, "meter-1", "2025-02")
    assert estimate.status == billing_pb2.BILL_STATUS_ESTIMATE
    assert len(estimate.adjustments) == 1
    adjustment = estimate.adjustments[0]
    expected = charges_with(Decimal(issued_device.subtotal), Decimal("0.30")) - (
        Decimal(issued_device.subtotal) + Decimal(issued_device.tax)
    )
    assert (adjustment.period, adjustment.issued_bill_id) == ("2025-01", "acme-2025-01")
    assert Decimal(adjustment.energy_kwh) == 1 and Decimal(adjustment.amount) == expected
    assert Decimal(estimate.total) == Decimal(estimate.subtotal) + Decimal(estimate.tax) + expected
    assert not (await device_bill(running, "meter-2", "2025-02")).adjustments

    # Issued in February's bill, once; March carries nothing more for January.
    february = await app.closer.close_period("acme", "2025-02")
    assert february.issued_now and february.bill.number == 2
    issued_february = await device_bill(running, "meter-1", "2025-02")
    assert issued_february.status == billing_pb2.BILL_STATUS_ISSUED
    assert [(a.period, a.amount) for a in issued_february.adjustments] == [
        ("2025-01", str(adjustment.amount))
    ]
    assert Decimal(february.bill.total) == Decimal((await account_bill(running, "2025-02")).total)
    assert not (await device_bill(running, "meter-1", "2025-03")).adjustments

    # ListBills: newest first, a page at a time.
    page = await running.stub.ListBills(
        billing_pb2.ListBillsRequest(account_id="acme", page_size=1), timeout=10
    )
    assert [b.period for b in page.bills] == ["2025-02"] and page.next_page_token
    assert page.bills[0].SerializeToString(deterministic=True) == february.bill.response_bytes
    rest = await running.stub.ListBills(
        billing_pb2.ListBillsRequest(
            account_id="acme", page_size=1, page_token=page.next_page_token
        ),
        timeout=10,
    )
    assert [b.period for b in rest.bills] == ["2025-01"] and not rest.next_page_token
    everything = await running.stub.ListBills(
        billing_pb2.ListBillsRequest(account_id="acme"), timeout=10
    )
    assert [(b.period, b.number) for b in everything.bills] == [("2025-02", 2), ("2025-01", 1)]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await running.stub.ListBills(
            billing_pb2.ListBillsRequest(account_id="acme", page_size=101), timeout=10
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # A period not ended cannot be closed.
    this_month = NOW.astimezone(UTC).strftime("%Y-%m")
    with pytest.raises(ValueError, match="has not ended"):
        await app.closer.close_period("acme", this_month)

    # Billing refuses a stored catalog that would change a closed period; keeps its own.
    held = app.catalog.current
    await MongoCatalog(app.ledger.database).save(EDITED, "tariffs.yaml")
    with pytest.raises(CatalogError, match=r"tariffs\.yaml:\d+: tariffs\[0\]"):
        await app.catalog.refresh()
    assert app.catalog.current is held


async def run_module(prefix: str, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        *args,
        cwd=REPO,
        env={
            "PATH": "/usr/bin:/bin",
            "MONGODB_URL": MONGODB_URL,
            "MONGODB_DATABASE": prefix.strip("-"),
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_two_close_period_processes_at_once_store_one_bill(
    running: Running, tmp_path: Path
) -> None:
    await send(running, month_readings("2025-03", "meter-1"))  # type: ignore[arg-type]
    prefix = running.prefix
    for month, number in (("2025-03", 1), ("2025-04", 2)):
        results = await asyncio.gather(
            *(run_module(prefix, "billing_service.close_period", month) for _ in range(2))
        )
        for code, _, err in results:
            assert code == 0, err
        outputs = "".join(out for _, out, _ in results)
        assert outputs.count(f"bill acme-{month} number {number} ") == 2, outputs
        assert outputs.count("already issued:") == 1, outputs
    # And a third, later: already issued.
    code, out, _ = await run_module(prefix, "billing_service.close_period", "2025-03")
    assert code == 0 and out.startswith("already issued: bill acme-2025-03 number 1 "), out
    with pymongo.MongoClient(MONGODB_URL) as client:
        database = client[prefix.strip("-")]
        assert sorted(d["_id"] for d in database["issued_bills"].find()) == [
            "acme|2025-03",
            "acme|2025-04",
        ]
        assert database["bill_books"].find_one({"_id": "acme"}) == {
            "_id": "acme",
            "last": 2,
            "periods": {"2025-03": 1, "2025-04": 2},
        }
    code, _, err = await run_module(prefix, "billing_service.close_period", "2999-01")
    assert code == 1 and "has not ended" in err

    # seed refuses an edit of the version that priced them (nothing written); accepts a
    # new version after them.
    stored_before = await MongoCatalog(running.app.ledger.database).load()
    edited = tmp_path / "tariffs.yaml"
    edited.write_text(EDITED)
    code, _, err = await run_module(prefix, "scripts.seed", str(edited))
    assert code == 1
    assert f"{edited}:" in err and "tariffs[0]" in err and "2025-03" in err, err
    assert await MongoCatalog(running.app.ledger.database).load() == stored_before
    edited.write_text(NEW_VERSION)
    code, out, err = await run_module(prefix, "scripts.seed", str(edited))
    assert code == 0, err
    bills = MongoBillStore(running.app.ledger.database)
    assert [b.period for b in await bills.of_account("acme")] == ["2025-03", "2025-04"]


async def test_two_billing_processes_issue_last_month_once_and_a_restart_does_not_again(
    tmp_path: Path,
) -> None:
    """Two ``python -m billing_service`` closing on their own (grace 0, every 0.2 s): one
    bill for last month, number 1; billing restarted does not issue it again."""
    from tests.conftest import wait_until
    from tests.e2e.conftest import TEST_SETTINGS, Stack

    prefix = f"close{NOW.strftime('%H%M%S%f')}-"
    closing = {
        **TEST_SETTINGS,
        "BILLING_CLOSE_CHECK_INTERVAL_S": "0.2",
        "BILLING_CLOSE_GRACE_HOURS": "0",
    }
    stacks = [
        Stack(
            prefix=prefix,
            log_dir=tmp_path / f"billing-{n}",
            services=("billing_service",),
            settings=dict(closing),
        )
        for n in range(2)
    ]
    for stack in stacks:
        stack.log_dir.mkdir()
    ledger = stacks[0].ledger()
    await MongoCatalog(ledger.database).save(CATALOG, "tariffs.yaml")
    bills = MongoBillStore(ledger.database)
    try:
        await asyncio.gather(*(stack.start() for stack in stacks))

        async def issued() -> bool:
            return len(await bills.of_account("acme")) > 0

        await wait_until(issued, 30, "billing to issue last month's bill")
        await asyncio.sleep(1)  # several more checks by both processes
        first = await bills.of_account("acme")
        assert len(first) == 1 and first[0].number == 1, first
        await stacks[0].restart("billing_service")
        await asyncio.sleep(1)
        assert await bills.of_account("acme") == first
        for stack in stacks:
            stack.assert_running()
    finally:
        for stack in stacks:
            await stack.stop()
        await stacks[0].clean()
        ledger.close()
