"""A meter's local-time CSV of each night the clocks change, imported with the device's own
token, followed through to its bill: in autumn both 02:00-03:00 hours billed, in spring the
hour that never happened absent from the file, and every row billed once.

The expected bill is plain Decimal arithmetic on the file, not billing's code.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import grpc
import pytest

from billing_service.adapters.mongo import MongoCatalog
from common.energy.v1 import billing_pb2, gateway_pb2, gateway_pb2_grpc
from common.gateway_client import gateway_channel
from scripts.import_csv import ImportConfig, import_csv
from tests.conftest import ADMIN_TOKEN, wait_until
from tests.e2e.conftest import Stack

CATALOG = """
default_tariff: oslo
tariffs:
  - id: oslo
    currency: NOK
    time_zone: Europe/Oslo
    standing_charge_per_day: "2.00"
    tax_rate: "0.25"
    energy: {kind: flat, price_per_kwh: "1.10"}
accounts:
  - {id: cabin, name: A cabin}
devices:
  - {id: cabin-meter-2026-10, account: cabin, site: cabin, tariff: oslo}
  - {id: cabin-meter-2026-03, account: cabin, site: cabin, tariff: oslo}
"""
OSLO = ZoneInfo("Europe/Oslo")
FALL_BACK = datetime(2026, 10, 25)  # 03:00 summer time becomes 02:00 winter time
SPRING_FORWARD = datetime(2026, 3, 29)  # 02:00 winter time becomes 03:00 summer time


def meter_file(path: Path, day: datetime) -> tuple[int, Decimal]:
    """Every 15 minutes of the Oslo day, wall-clock times in order, as a meter writes them:
    02:00-02:45 twice in autumn, never in spring."""
    start = day.replace(tzinfo=OSLO).astimezone(UTC)
    end = (day + timedelta(days=1)).replace(tzinfo=OSLO).astimezone(UTC)
    lines, energy, stamp, k = ["time,meterusage\n"], Decimal(0), start, 0
    while (stamp := stamp + timedelta(minutes=15)) <= end:
        kwh = Decimal("0.200") + Decimal(k % 7) / 100
        lines.append(f"{stamp.astimezone(OSLO):%Y-%m-%d %H:%M:%S},{kwh}\n")
        energy, k = energy + kwh, k + 1
    path.write_text("".join(lines))
    return k, energy


def cents(amount: Decimal) -> Decimal:
    return amount.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


@pytest.mark.parametrize(
    ("night", "rows"),
    [(FALL_BACK, 100), (SPRING_FORWARD, 92)],  # a 25-hour day and a 23-hour day
    ids=["clocks-go-back", "clocks-go-forward"],
)
async def test_a_dst_night_imported_with_a_device_token_is_billed_in_full(
    stack: Stack, tmp_path: Path, night: datetime, rows: int
) -> None:
    month = f"{night:%Y-%m}"
    device = f"cabin-meter-{month}"
    ledger = stack.ledger()
    await MongoCatalog(ledger.database).save(CATALOG, "e2e catalog")
    ledger.close()
    async with gateway_channel(stack.gateway, ADMIN_TOKEN) as channel:
        admin = gateway_pb2_grpc.DeviceAdminStub(channel)
        register = gateway_pb2.RegisterDeviceRequest(device_id=device)
        token = (await admin.RegisterDevice(register, timeout=10)).token
    written, energy = meter_file(tmp_path / "cabin.csv", night)
    assert written == rows

    config = ImportConfig(
        tmp_path / "cabin.csv",
        device=device,
        target=stack.gateway,
        time_zone="Europe/Oslo",
        show_progress=False,
        token=token,  # the device's own token: auth is on
    )
    summary = await import_csv(config)
    assert (summary.rows_read, summary.accepted, summary.duplicates) == (rows, rows, 0)
    assert summary.problems == []

    request = billing_pb2.GetDeviceBillRequest(device_id=device, period=month)
    async with gateway_channel(stack.gateway, ADMIN_TOKEN) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)

        async def billed_in_full() -> bool:
            try:
                bill = (await stub.GetDeviceBill(request, timeout=10)).bill
            except grpc.aio.AioRpcError:
                return False  # the catalog is not loaded yet
            return Decimal(bill.energy_kwh) == energy

        await wait_until(billed_in_full, timeout_s=120, what="the day's energy in the bill")
        bill = (await stub.GetDeviceBill(request, timeout=10)).bill
        usage = billing_pb2.GetUsageRequest(device_id=device, window="1d", time_zone="Europe/Oslo")
        usage.start.FromDatetime(night.replace(tzinfo=OSLO))
        usage.end.FromDatetime((night + timedelta(days=1)).replace(tzinfo=OSLO))
        (day,) = (await stub.GetUsage(usage, timeout=10)).buckets
    # The local day's billed energy is the file's: every row once, none lost or doubled.
    assert (day.count, Decimal(str(day.sum_kwh)).quantize(Decimal("0.001"))) == (rows, energy)
    print(
        f"\n{night:%Y-%m-%d} in Oslo: {rows} rows, {energy} kWh imported; billed {bill.energy_kwh}"
    )

    energy_amount = cents(energy * Decimal("1.10"))
    standing = cents(31 * Decimal("2.00"))  # October and March in Oslo: 31 days
    tax = cents((energy_amount + standing) * Decimal("0.25"))
    assert [(line.unit, line.amount) for line in bill.lines] == [
        ("kWh", str(energy_amount)),
        ("day", str(standing)),
        ("", str(tax)),
    ]
    assert (bill.total, bill.currency) == (str(energy_amount + standing + tax), "NOK")
