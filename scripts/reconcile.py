"""Compare a ledger of acknowledged readings with what billing holds: ``make reconcile``.

    python -m scripts.reconcile LEDGER.jsonl [--target 127.0.0.1:50051] [--wait-s 60]

The ledger is JSON lines of readings the gateway answered OK (``make simulate`` writes one
with ``--ledger``). For each device, through the public read API only, it checks that:
- every acknowledged reading is stored (ListReadings), none missing;
- no reading is stored in that time span that was not acknowledged;
- the billed energy (the 15-minute slots, read with GetUsage) has exactly the ledger's
  readings and kWh.
It prints expected against billed per device and exits 1 on any difference; --wait-s
keeps checking for that long while billing catches up. Useful after an incident too.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Annotated

import typer

from common.energy.v1 import billing_pb2, gateway_pb2_grpc
from scripts import client_options as client

DAY = timedelta(days=1)
TICK = timedelta(microseconds=1)


@dataclass
class DeviceCheck:
    device_id: str
    expected: dict[str, Decimal]  # reading_id -> kWh
    first: datetime
    last: datetime
    stored: set[str] = field(default_factory=set)
    billed_count: int = 0
    billed_kwh: Decimal = Decimal(0)

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
            and abs(self.billed_kwh - sum(self.expected.values())) < Decimal("0.000001")
        )


def read_ledger(path: Path) -> dict[str, DeviceCheck]:
    devices: dict[str, DeviceCheck] = {}
    seen: dict[str, dict[str, tuple[datetime, Decimal]]] = defaultdict(dict)
    with path.open() as ledger:
        for number, line in enumerate(ledger, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                stamp = datetime.fromisoformat(entry["timestamp"])
                seen[entry["device_id"]][entry["reading_id"]] = (
                    stamp,
                    Decimal(str(entry["usage_kwh"])),
                )
            except (ValueError, KeyError) as error:
                raise typer.BadParameter(f"{path}:{number}: not a ledger line ({error})") from None
    for device_id, readings in seen.items():
        stamps = [stamp for stamp, _ in readings.values()]
        devices[device_id] = DeviceCheck(
            device_id, {rid: kwh for rid, (_, kwh) in readings.items()}, min(stamps), max(stamps)
        )
    return devices


async def check(stub: gateway_pb2_grpc.GatewayStub, device: DeviceCheck) -> None:
    """Fill in what billing holds for the device over the UTC days its ledger spans."""
    day_start = _day(device.first - TICK)
    day_end = _day(device.last - TICK) + DAY
    device.stored, token = set(), ""
    while True:  # readings with day_start < timestamp <= day_end, as the windows count them
        request = billing_pb2.ListReadingsRequest(
            device_id=device.device_id, page_size=1000, page_token=token
        )
        request.start.FromDatetime(day_start + TICK)
        request.end.FromDatetime(day_end + TICK)
        page = await stub.ListReadings(request, timeout=30)
        device.stored |= {r.reading_id for r in page.readings}
        if not (token := page.next_page_token):
            break
    usage = billing_pb2.GetUsageRequest(device_id=device.device_id, window="1d")
    usage.start.FromDatetime(day_start)
    usage.end.FromDatetime(day_end)
    buckets = (await stub.GetUsage(usage, timeout=30)).buckets
    device.billed_count = sum(b.count for b in buckets)
    device.billed_kwh = sum((Decimal(str(b.sum_kwh)) for b in buckets), Decimal(0))


def _day(instant: datetime) -> datetime:
    return instant.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


async def reconcile(
    ledger: Path,
    target: str,
    wait_s: float,
    token: str | None = None,
    tls: client.ClientTls | None = None,
) -> list[DeviceCheck]:
    devices = read_ledger(ledger)
    deadline = time.monotonic() + wait_s
    async with client.open_channel(target, token, tls) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        while True:
            pending = [d for d in devices.values() if not d.exact]
            for device in pending:
                await check(stub, device)
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
            f"{sum(d.expected.values()):14.6f} {d.billed_kwh:14.6f} "
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


app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    ledger: Annotated[Path, typer.Argument(help="JSONL ledger of acknowledged readings")],
    target: client.Target = client.DEFAULT_TARGET,
    wait_s: Annotated[
        float, typer.Option(help="Keep checking this long while billing catches up")
    ] = 0.0,
    token: client.Token = None,
    tls_ca: client.TlsCa = None,
    tls_cert: client.TlsCert = None,
    tls_key: client.TlsKey = None,
) -> None:
    """Print expected against billed per device; exit 1 on any difference."""
    tls = client.client_tls(tls_ca, tls_cert, tls_key)
    results = asyncio.run(reconcile(ledger, target, wait_s, token, tls))
    typer.echo(render(results))
    raise typer.Exit(0 if all(d.exact for d in results) else 1)


if __name__ == "__main__":
    app()
