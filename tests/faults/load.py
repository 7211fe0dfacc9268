"""The fault tests' load, their conditions on work in flight, and the exact reconciliation."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc

from common.energy.v1 import gateway_pb2, gateway_pb2_grpc, reading_pb2
from common.gateway_client import gateway_channel
from common.models import Reading, validate_reading
from scripts.client_options import should_resend
from scripts.reconcile import reconcile, reconcile_bills, render
from scripts.simulate import FleetConfig, FleetSummary, run_fleet
from tests.conftest import ADMIN_TOKEN, wait_until
from tests.e2e.conftest import Stack

# A fault test's backlog is up to about 5,000 readings, and billing on a slow machine may
# drain only a few hundred a second: this is how long reconciliation may wait for it.
RECONCILE_WAIT_S = 300
# Loggers resend what was refused for this long, as a buffering logger does.
RESEND_FOR_S = 300
# Which account and tariff bills each fault-test device (by the number in its id): flat,
# time-of-use and tiered accounts; the rest are unregistered, billed under the default.
ACCOUNTS = (("acct-flat", "flat-eur"), ("acct-tou", "tou-gbp"), ("acct-tiered", "tiered-usd"))


def fault_catalog(device_ids: Iterable[str]) -> str:
    """The fault tests' tariff catalog (YAML): three tariffs, an account on each."""
    devices = []
    for device_id in sorted(device_ids):
        group = int(re.sub(r"\D", "", device_id) or 0) % 4
        if group < len(ACCOUNTS):
            account, tariff = ACCOUNTS[group]
            devices.append(
                f"  - {{id: {device_id}, account: {account}, site: lab, tariff: {tariff}}}\n"
            )
    return (
        "default_tariff: flat-eur\n"
        "tariffs:\n"
        "  - {id: flat-eur, currency: EUR, time_zone: Europe/Berlin,\n"
        "     standing_charge_per_day: 0.45, tax_rate: 0.19,\n"
        "     energy: {kind: flat, price_per_kwh: 0.3217}}\n"
        "  - id: tou-gbp\n"
        "    currency: GBP\n"
        "    time_zone: Europe/London\n"
        "    standing_charge_per_day: 0.53\n"
        "    tax_rate: 0.05\n"
        "    energy:\n"
        "      kind: time_of_use\n"
        "      bands:\n"
        "        - {name: night, price_per_kwh: 0.15, start: '00:00', end: '07:30'}\n"
        "        - {name: day, price_per_kwh: 0.30, start: '07:30', end: '16:00'}\n"
        "        - {name: peak, price_per_kwh: 0.45, days: [mon, tue, wed, thu, fri],\n"
        "           start: '16:00', end: '19:00'}\n"
        "        - {name: day, price_per_kwh: 0.30, days: [sat, sun],\n"
        "           start: '16:00', end: '19:00'}\n"
        "        - {name: day, price_per_kwh: 0.30, start: '19:00', end: '24:00'}\n"
        "  - id: tiered-usd\n"
        "    currency: USD\n"
        "    time_zone: America/New_York\n"
        "    standing_charge_per_day: 0.33\n"
        "    tax_rate: 0.0625\n"
        "    energy:\n"
        "      kind: tiered\n"
        "      tiers:\n"
        "        - {up_to_kwh: 5, price_per_kwh: 0.14}\n"
        "        - {up_to_kwh: 50, price_per_kwh: 0.18}\n"
        "        - {up_to_kwh: null, price_per_kwh: 0.24}\n"
        "accounts:\n"
        + "".join(f"  - {{id: {account}}}\n" for account, _ in ACCOUNTS)
        + "devices:\n"
        + "".join(devices)
    )


def load_devices(prefix: str = "fault", count: int = 20) -> list[str]:
    """The device ids of :func:`steady_load`, unary and batched."""
    return [f"{prefix}-{kind}-{n:05d}" for kind in "ub" for n in range(1, count + 1)]


async def steady_load(
    stack: Stack,
    ledger: Path,
    seconds: float = 8,
    batch: int = 0,
    prefix: str = "fault",
    rate: float = 150,
) -> FleetSummary:
    """20 loggers at ``rate`` readings/s that ledger every OK and resend what was refused."""
    config = FleetConfig(
        devices=20,
        rate=rate,
        duration_s=seconds,
        target=stack.gateway,
        batch=batch,
        device_prefix=f"{prefix}-{'b' if batch else 'u'}",
        show_progress=False,
        ledger=str(ledger),
        resend_for_s=RESEND_FOR_S,
        timeout_s=5,
        token=ADMIN_TOKEN,
    )
    return await run_fleet(config)


# A load that lasts as long as its fault (:func:`steady_load_until`) sends in rounds this long.
ROUND_S = 2.0


async def steady_load_until(
    stack: Stack, ledger: Path, ended: asyncio.Event, batch: int = 0, rate: float = 150
) -> FleetSummary:
    """:func:`steady_load` in rounds of ``ROUND_S`` until ``ended`` is set, then one round
    more: a load that lasts as long as the fault however long that takes on this machine,
    and whose last round is sent wholly after it. The rounds' summaries are summed.

    It stops early after a round that gave readings up (resent for ``RESEND_FOR_S`` in
    vain), and fails if ``ended`` is not set within ``RESEND_FOR_S``: a test that failed
    before ending its fault leaves no load running for good."""
    total = FleetSummary()
    deadline = time.monotonic() + RESEND_FOR_S
    while True:
        last = ended.is_set()
        assert last or time.monotonic() < deadline, f"the fault did not end in {RESEND_FOR_S} s"
        part = await steady_load(stack, ledger, seconds=ROUND_S, batch=batch, rate=rate)
        total.planned += part.planned
        total.sent += part.sent
        total.accepted += part.accepted
        total.resent += part.resent
        total.elapsed_s += part.elapsed_s
        total.latencies_s += part.latencies_s
        for code, count in part.failed_by_code.items():
            total.record_failure(code, count, part.first_error.get(code, ""))
        if last or part.failed:
            return total


def stream_devices(prefix: str, count: int = 40) -> list[str]:
    return [f"{prefix}-{n:03d}" for n in range(1, count + 1)]


def long_stream(prefix: str, per_device: int = 300, devices: int = 10) -> list[Reading]:
    """A backfill of 15-minute readings from days ago (75 hours: across a month's end on its
    first three days) of ``devices`` devices, interleaved: 3,000 readings, six of the
    gateway's chunks. Each device gets about 150 kWh, past the tiered tariff's last tier."""
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    first = now - timedelta(minutes=15 * per_device)
    return [
        validate_reading(device, first + timedelta(minutes=15 * n), 0.125 + (n % 7) / 8, now=now)
        for n in range(per_device)
        for device in stream_devices(prefix, devices)
    ]


def _request(reading: Reading) -> gateway_pb2.SendReadingRequest:
    message = reading_pb2.Reading(
        device_id=reading.device_id, usage_kwh=reading.usage_kwh, reading_id=reading.reading_id
    )
    message.timestamp.FromDatetime(reading.timestamp)
    return gateway_pb2.SendReadingRequest(reading=message)


# Readings the gateway forwards to ingestion per call (GATEWAY_BATCH_SIZE's default).
STREAM_CHUNK = 500


async def send_stream(
    stack: Stack, readings: list[Reading], last_chunk_after: asyncio.Event | None = None
) -> int:
    """One SendReadings stream of ``readings``; the count accepted, or the call's error.

    With ``last_chunk_after``, the last ``STREAM_CHUNK`` readings are written only once it
    is set: until then the stream cannot end, however fast the machine, so a fault set
    before it lands mid-stream."""
    hold_at = len(readings) - STREAM_CHUNK if last_chunk_after is not None else -1
    async with gateway_channel(stack.gateway, ADMIN_TOKEN) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        # Written one by one rather than from an iterator, so that a call the server ends
        # while the client is still writing fails with the server's status; grpcio's
        # iterator form reports a bare INTERNAL ("Failed execute_batch") instead.
        call = stub.SendReadings(timeout=300)
        try:
            for n, reading in enumerate(readings):
                if n == hold_at and last_chunk_after is not None:
                    await last_chunk_after.wait()
                await call.write(_request(reading))
            await call.done_writing()
        except asyncio.InvalidStateError:
            pass  # the call has ended: awaiting it raises its status
        answer = await call
    return int(answer.accepted)


def accepted_before_failure(error: grpc.aio.AioRpcError) -> int | None:
    """The gateway's count of a failed stream's readings accepted before the failure."""
    found = re.search(r"(\d+) readings of this stream were accepted", error.details() or "")
    return int(found[1]) if found else None


async def resend_stream(stack: Stack, readings: list[Reading], ledger: Path) -> int:
    """Resend the whole stream (what got through is deduplicated) until it is accepted, as
    a logger does; then ledger every reading. Returns how many sends it took."""
    deadline = time.monotonic() + RESEND_FOR_S
    sends = 0
    while True:
        sends += 1
        try:
            accepted = await send_stream(stack, readings)
            break
        except grpc.aio.AioRpcError as error:
            if not should_resend(error) or time.monotonic() > deadline:
                raise
            await asyncio.sleep(1.0)
    assert accepted == len(readings), (accepted, len(readings))
    with ledger.open("a") as file:
        file.writelines(ledger_line(r) for r in readings)
    return sends


def ledger_line(reading: Reading) -> str:
    return (
        json.dumps(
            {
                "reading_id": reading.reading_id,
                "device_id": reading.device_id,
                "timestamp": reading.timestamp.isoformat(),
                "usage_kwh": reading.usage_kwh,
            }
        )
        + "\n"
    )


async def until_in_flight(stack: Stack, timeout_s: float = 120) -> float:
    """Wait until billing holds deliveries unsettled (the place for a fault that must hit
    work in flight); returns how many it held."""
    held = 0.0

    async def holding() -> bool:
        nonlocal held
        stack.assert_running()
        held = await billing_in_flight(stack)
        return held > 0

    await wait_until(holding, timeout_s=timeout_s, what="billing holding deliveries unsettled")
    return held


async def billing_in_flight(stack: Stack) -> float:
    """Deliveries billing holds unsettled now: what a crash of it would hand back."""
    return await stack.metric("BILLING", "consumer_unsettled_messages", {"consumer": "billing"})


async def billing_redelivered(stack: Stack) -> float:
    """Deliveries billing received marked redelivered (another holder had them unsettled)."""
    return await stack.metric("BILLING", "consumer_redelivered_total", {"consumer": "billing"})


async def reconciled(
    stack: Stack,
    ledger: Path,
    catalog: Path,
    fault: str,
    in_flight_at_fault: str,
    recovery_started: float,
) -> None:
    """Assert every ledgered reading is billed exactly once and every bill of the ledger's
    devices and accounts is the independent computation's; print the fault's figures."""
    # Returns as soon as billing holds everything; the bound only matters on a slow machine.
    results = await reconcile(
        ledger, stack.gateway, wait_s=RECONCILE_WAIT_S, token=ADMIN_TOKEN, catalog=catalog
    )
    took = time.monotonic() - recovery_started
    report = render(results)
    assert all(d.exact for d in results), report + "\n" + stack.logs()[-6000:]
    assert sum(len(d.expected) for d in results) > 0
    bills = await reconcile_bills(ledger, catalog, stack.gateway, token=ADMIN_TOKEN)
    print(
        f"\nFAULT {fault}: in flight at the fault: {in_flight_at_fault}; readings reconciled "
        f"{took:.1f} s after the fault ended: {report.splitlines()[-1]}; bills: "
        f"{bills.render().splitlines()[-1]}"
    )
    assert bills.exact, bills.render() + "\n" + stack.logs()[-3000:]
