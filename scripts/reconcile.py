"""Compare a ledger of acknowledged readings with what billing holds: ``make reconcile``.

    python -m scripts.reconcile LEDGER.jsonl [--catalog deployments/tariffs.yaml]
        [--target 127.0.0.1:50051] [--wait-s 60] [--no-bills]

The ledger is JSON lines of readings the gateway answered OK (``make simulate`` writes one
with ``--ledger``). For each device, through the public read API only, it checks that:
- every acknowledged reading is stored (ListReadings), none missing;
- no reading is stored that was not acknowledged, over the whole local months (in the
  device's tariff zone, from the catalog) that the ledger touches: a bill covers its month,
  so a stray reading anywhere in it would change the bill;
- the billed energy (the 15-minute slots, read with GetUsage) has exactly the ledger's
  readings and kWh.
--wait-s keeps checking for that long while billing catches up. Once every reading
matches, the bills are checked (``scripts.bill_check``): GetDeviceBill of every device
and month, GetAccountBill of every account and month, against a computation of the
check's own from the catalog file and the ledger; twice, the second time from the cache
the first may have filled. A month billing has issued is not compared line by line (late
readings are carried by later bills): the ledger's bill for it must equal its issued
charges + the adjustments for it on bills issued since (ListBills) + the one on the open
month after the last issued, in money and kWh. It prints expected against billed and exits
1 on any difference. Useful after an incident too. The token must read every account's
bills (the admin token).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Annotated
from zoneinfo import ZoneInfo

import grpc
import typer

from common.energy.v1 import billing_pb2, gateway_pb2_grpc
from scripts import client_options as client
from scripts.bill_check import (
    MILLIWH_PER_KWH,
    BillReport,
    Catalog,
    milliwh,
    months_touched,
    read_catalog,
    read_ledger_readings,
    reconcile_bills,
)

TICK = timedelta(microseconds=1)
DEFAULT_CATALOG = Path("deployments/tariffs.yaml")


@dataclass
class DeviceCheck:
    device_id: str
    expected: dict[str, int]  # reading_id -> milliwatt-hours, as billing stores it
    zone: ZoneInfo  # where its days and months begin: its tariff's
    start: datetime  # [start, end): the whole local months the ledger touches
    end: datetime
    stored: set[str] = field(default_factory=set)
    billed_count: int = 0
    billed_milliwh: int = 0

    @property
    def missing(self) -> set[str]:
        return set(self.expected) - self.stored

    @property
    def unexpected(self) -> set[str]:
        return self.stored - set(self.expected)

    @property
    def exact(self) -> bool:
        return (
            not self.missing
            and not self.unexpected
            and self.billed_count == len(self.expected)
            and self.billed_milliwh == sum(self.expected.values())
        )


def read_ledger(path: Path, catalog: Catalog | None = None) -> dict[str, DeviceCheck]:
    """The ledger's devices, each checked over the local months of its tariff's zone (UTC
    months without a catalog)."""
    try:
        ledger = read_ledger_readings(path)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    devices: dict[str, DeviceCheck] = {}
    for device_id, readings in ledger.items():
        zone = catalog.tariff_of(device_id).zone if catalog else ZoneInfo("UTC")
        months = months_touched(zone, readings.values())
        devices[device_id] = DeviceCheck(
            device_id,
            {rid: milliwh(r.usage_kwh) for rid, r in readings.items()},
            zone,
            months[0].start,
            months[-1].end,
        )
    return devices


async def check(stub: gateway_pb2_grpc.GatewayStub, device: DeviceCheck) -> None:
    """Fill in what billing holds for the device over the months its ledger touches."""
    device.stored, token = set(), ""
    while True:  # readings with start < timestamp <= end: their slots are in [start, end)
        request = billing_pb2.ListReadingsRequest(
            device_id=device.device_id, page_size=1000, page_token=token
        )
        request.start.FromDatetime(device.start + TICK)
        request.end.FromDatetime(device.end + TICK)
        page = await stub.ListReadings(request, timeout=30)
        device.stored |= {r.reading_id for r in page.readings}
        if not (token := page.next_page_token):
            break
    usage = billing_pb2.GetUsageRequest(
        device_id=device.device_id, window="1d", time_zone=device.zone.key
    )
    usage.start.FromDatetime(device.start)
    usage.end.FromDatetime(device.end)
    buckets = (await stub.GetUsage(usage, timeout=30)).buckets
    device.billed_count = sum(b.count for b in buckets)
    # sum_kwh is whole milliwatt-hours / 1e6 as a double: exact back to milliwatt-hours
    device.billed_milliwh = sum(round(b.sum_kwh * MILLIWH_PER_KWH) for b in buckets)


async def reconcile(
    ledger: Path,
    target: str,
    wait_s: float,
    token: str | None = None,
    tls: client.ClientTls | None = None,
    catalog: Path | None = None,
) -> list[DeviceCheck]:
    """Check the ledger's readings until they match or ``wait_s`` passes; ``catalog`` (the
    file billing loaded) sets each device's time zone, UTC without it."""
    devices = read_ledger(ledger, read_catalog(catalog) if catalog else None)
    deadline = time.monotonic() + wait_s
    async with client.open_channel(target, token, tls) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        while True:
            pending = [d for d in devices.values() if not d.exact]
            try:
                for device in pending:
                    await check(stub, device)
            except grpc.aio.AioRpcError as error:
                # A service restarted moments ago (after an incident, a fault test) may not
                # answer yet: within --wait-s that is "not yet", as for a logger.
                if not client.should_resend(error) or time.monotonic() > deadline:
                    raise
            if all(d.exact for d in devices.values()) or time.monotonic() > deadline:
                return sorted(devices.values(), key=lambda d: d.device_id)
            await asyncio.sleep(1)


def render(results: list[DeviceCheck]) -> str:
    lines = [
        f"{'device':24} {'expected':>9} {'billed':>9} {'expected kWh':>14} "
        f"{'billed kWh':>14} {'missing':>8} {'unacked':>8}"
    ]
    for d in results:
        mark = "" if d.exact else "   <-- differs"
        lines.append(
            f"{d.device_id:24} {len(d.expected):9} {d.billed_count:9} "
            f"{_kwh(sum(d.expected.values())):>14} {_kwh(d.billed_milliwh):>14} "
            f"{len(d.missing):8} {len(d.unexpected):8}{mark}"
        )
    differing = [d for d in results if not d.exact]
    total = sum(len(d.expected) for d in results)
    lines.append(
        f"{len(results)} devices, {total} acknowledged readings: "
        + ("every one billed exactly once" if not differing else f"{len(differing)} differ")
    )
    for d in differing[:10]:
        for rid in sorted(d.missing)[:5]:
            lines.append(f"  missing from billing: {d.device_id} {rid}")
        for rid in sorted(d.unexpected)[:5]:
            lines.append(f"  stored but not in the ledger: {d.device_id} {rid}")
    return "\n".join(lines)


def _kwh(milliwatt_hours: int) -> str:
    return f"{Decimal(milliwatt_hours).scaleb(-6):.6f}"


app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    ledger: Annotated[Path, typer.Argument(help="JSONL ledger of acknowledged readings")],
    catalog: Annotated[
        Path,
        typer.Option(exists=True, dir_okay=False, help="The tariff catalog billing has loaded"),
    ] = DEFAULT_CATALOG,
    bills: Annotated[
        bool, typer.Option(help="Check the bills too, once the readings match")
    ] = True,
    target: client.Target = client.DEFAULT_TARGET,
    wait_s: Annotated[
        float, typer.Option(help="Keep checking this long while billing catches up")
    ] = 0.0,
    token: client.Token = None,
    tls_ca: client.TlsCa = None,
    tls_cert: client.TlsCert = None,
    tls_key: client.TlsKey = None,
) -> None:
    """Print expected against billed per device, then per bill; exit 1 on any difference."""
    tls = client.client_tls(tls_ca, tls_cert, tls_key)
    exact = asyncio.run(_run(ledger, catalog, bills, target, wait_s, token, tls))
    raise typer.Exit(0 if exact else 1)


async def _run(
    ledger: Path,
    catalog: Path,
    bills: bool,
    target: str,
    wait_s: float,
    token: str | None,
    tls: client.ClientTls | None,
) -> bool:
    try:
        read_catalog(catalog)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    results = await reconcile(ledger, target, wait_s, token, tls, catalog)
    typer.echo(render(results))
    if not all(d.exact for d in results):
        if bills:
            typer.echo("bills not checked: the readings differ")
        return False
    if not bills:
        return True
    reports: list[BillReport] = []
    for heading in ("bills, first read (it may fill the cache)", "bills again, cache warm"):
        reports.append(await reconcile_bills(ledger, catalog, target, token, tls))
        typer.echo(f"\n{heading}:\n{reports[-1].render()}")
    return all(report.exact for report in reports)


if __name__ == "__main__":
    app()
