"""The reconciliation's bill check against the four services: every device and account bill
of a ledger exact, with billing's Redis warm, flushed and killed; a ledger that does not
match what billing holds is caught; and issued months with late readings add up (issued
charges + adjustments on later bills), a ledger reading billing never got is caught there.
Billing's late-write marks count as complete (domain/late.py), so the adjustments the
checker proves are the ones billing found through them.

The stack has a Redis of its own, so the test may kill it. The catalog is seeded with
billing's MongoDB adapter (the test may; the checker never imports billing).
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
import redis.asyncio as redis

from billing_service.adapters.mongo import LATE_MARKS, MongoCatalog
from common.energy.v1 import billing_pb2, gateway_pb2_grpc
from common.gateway_client import gateway_channel
from common.models import Reading, validate_reading
from scripts.bill_check import BillReport, reconcile_bills
from scripts.client_options import should_resend
from scripts.reconcile import DeviceCheck, reconcile, render
from tests.component.test_queries import start_redis
from tests.conftest import ADMIN_TOKEN, free_port, wait_until
from tests.e2e.conftest import Stack, send_resending

CATALOG = """
default_tariff: flat-eur
tariffs:
  - id: flat-eur
    currency: EUR
    time_zone: Europe/Berlin
    standing_charge_per_day: 0.45
    tax_rate: 0.19
    energy: {kind: flat, price_per_kwh: 0.32}
  - id: tou-eur
    currency: EUR
    time_zone: Europe/Berlin
    standing_charge_per_day: "0.30"
    tax_rate: 0.07
    energy:
      kind: time_of_use
      bands:
        - {name: night, price_per_kwh: 0.20, start: "00:00", end: "06:00"}
        - {name: day, price_per_kwh: 0.40, days: [mon, tue, wed, thu, fri], start: "06:00",
           end: "22:00"}
        - {name: weekend, price_per_kwh: 0.25, days: [sat, sun], start: "06:00", end: "22:00"}
        - {name: night, price_per_kwh: 0.20, start: "22:00", end: "24:00"}
  - id: tiered-usd
    currency: USD
    time_zone: America/New_York
    standing_charge_per_day: 0.33
    tax_rate: 0.04
    energy:
      kind: tiered
      tiers:
        - {up_to_kwh: 2, price_per_kwh: 0.14}
        - {up_to_kwh: 5, price_per_kwh: 0.18}
        - {up_to_kwh: null, price_per_kwh: 0.24}
accounts:
  - {id: berlin-shop, name: Bakery}
  - {id: ny-store, name: Deli}
  - {id: late-shop, name: Kiosk}
devices:
  - {id: b-flat, account: berlin-shop, site: shop, tariff: flat-eur}
  - {id: b-tou, account: berlin-shop, site: bakehouse, tariff: tou-eur}
  - {id: ny-1, account: ny-store, site: store, tariff: tiered-usd}
  - {id: ny-2, account: ny-store, site: cold room, tariff: tiered-usd}
  - {id: ny-idle, account: ny-store, site: back office, tariff: tiered-usd}
  - {id: late-1, account: late-shop, site: kiosk, tariff: flat-eur}
  - {id: late-2, account: late-shop, site: kiosk, tariff: tou-eur}
"""
ROOT = Path(__file__).parents[2]
NOW = datetime.now(UTC).replace(microsecond=0)
QUARTER = timedelta(minutes=15)


@dataclass
class BillStack:
    stack: Stack
    redis_port: int
    redis_process: asyncio.subprocess.Process
    catalog: Path

    def redis(self) -> redis.Redis:
        return redis.Redis(port=self.redis_port, socket_timeout=5)

    async def cached_months(self) -> int:
        """The device-months billing holds in Redis (``{prefix}mtd:{device}:{month}``)."""
        client = self.redis()
        try:
            pattern = f"{self.stack.redis_prefix}mtd:*"
            return len([key async for key in client.scan_iter(pattern)])
        finally:
            await client.aclose()


@pytest.fixture(scope="module")
async def bills(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[BillStack]:
    """A stack on a Redis of its own, with the test catalog loaded by billing."""
    port = free_port()
    process = await start_redis(port)
    stack = Stack(
        prefix=f"e2eb{uuid.uuid4().hex[:8]}-",
        log_dir=tmp_path_factory.mktemp("logs"),
        redis_url=f"redis://127.0.0.1:{port}/0",
    )
    catalog = tmp_path_factory.mktemp("catalog") / "tariffs.yaml"
    catalog.write_text(CATALOG)
    bills = BillStack(stack, port, process, catalog)
    try:
        ledger = stack.ledger()
        # Late-write marks complete for a week, as on a database billing has written for a
        # while: open bills recompute only the issued months that late readings touched.
        await ledger.database["meta"].insert_one(
            {"_id": LATE_MARKS, "since": datetime.now(UTC) - timedelta(days=7)}
        )
        await stack.start()
        await MongoCatalog(ledger.database).save(CATALOG, str(catalog))
        ledger.close()
        await wait_until(lambda: _catalog_loaded(stack), what="billing to load the catalog")
        yield bills
        stack.assert_running()
    finally:
        await stack.stop()
        if bills.redis_process.returncode is not None:  # killed by a test: back, so clean() can run
            bills.redis_process = await start_redis(port)
        await stack.clean()
        bills.redis_process.kill()
        await bills.redis_process.wait()


async def _catalog_loaded(stack: Stack) -> bool:
    request = billing_pb2.GetDeviceBillRequest(device_id="b-flat", period="2026-10")
    async with gateway_channel(stack.gateway, ADMIN_TOKEN) as channel:
        try:
            await gateway_pb2_grpc.GatewayStub(channel).GetDeviceBill(request, timeout=10)
        except grpc.aio.AioRpcError:
            return False  # FAILED_PRECONDITION until billing loaded it
    return True


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def every_quarter(first: str, last: str) -> list[datetime]:
    stamps, stamp = [], utc(first)
    while stamp <= utc(last):
        stamps.append(stamp)
        stamp += QUARTER
    return stamps


def berlin_times() -> list[datetime]:
    """The DST night (25 Oct: 03:00 CEST -> 02:00 CET at 01:00Z) from Saturday 21:00 to
    Sunday 07:00 local; the October/November boundary (23:00Z on the 31st, a reading at
    23:00:00 is October's, at 23:00:01 November's); Monday 2 November across the 06:00
    band boundary; and the current month."""
    return [
        *every_quarter("2026-10-24T19:00", "2026-10-25T06:00"),
        utc("2026-10-31T22:45"),
        utc("2026-10-31T23:00"),
        utc("2026-10-31T23:00:01"),
        utc("2026-10-31T23:15"),
        *every_quarter("2026-11-02T04:30", "2026-11-02T06:30"),
        *now_times(),
    ]


def new_york_times() -> list[datetime]:
    """New York's month starts at 04:00Z on 1 November and its clocks go back at 06:00Z."""
    return [*every_quarter("2026-11-01T03:00", "2026-11-01T07:00"), *now_times()]


def now_times() -> list[datetime]:
    return [NOW - timedelta(minutes=7 * k) for k in range(1, 5)]


def readings(device_id: str, times: Iterable[datetime], base_kwh: float) -> list[Reading]:
    """Usage with awkward decimals (7 places: whole milliwatt-hours are rounded)."""
    return [
        validate_reading(device_id, stamp, round(base_kwh + 0.0137 * (k % 9), 7), now=NOW)
        for k, stamp in enumerate(times)
    ]


def write_ledger(path: Path, sent: Iterable[Reading]) -> None:
    with path.open("w") as ledger:
        for r in sent:
            line = {
                "reading_id": r.reading_id,
                "device_id": r.device_id,
                "timestamp": r.timestamp.isoformat(),
                "usage_kwh": r.usage_kwh,
            }
            ledger.write(json.dumps(line) + "\n")


async def send_with_ledger(bills: BillStack, sent: list[Reading], ledger: Path) -> None:
    """Send the readings as an import does and keep them as a ledger; wait until the
    readings check holds every one of them."""
    await send_resending(bills.stack, sent, ledger.with_suffix(".csv"), batch=200, streams=2)
    write_ledger(ledger, sent)
    await readings_reconciled(bills, ledger, timeout_s=120)


async def readings_reconciled(bills: BillStack, ledger: Path, timeout_s: float) -> None:
    """Wait until the readings check of ``ledger`` holds (every reading billed exactly once),
    asking every 0.1 s (the check's own wait asks again after 1 s); fail with its report."""
    results: list[DeviceCheck] = []

    async def exact() -> bool:
        nonlocal results
        try:
            results = await reconcile(
                ledger, bills.stack.gateway, wait_s=0, token=ADMIN_TOKEN, catalog=bills.catalog
            )
        except grpc.aio.AioRpcError as error:
            if not should_resend(error):  # a service not answering yet is "not yet"
                raise
            return False
        return all(d.exact for d in results)

    try:
        await wait_until(exact, timeout_s, what="the readings check to hold")
    except AssertionError as timed_out:
        raise AssertionError(f"{timed_out}\n{render(results)}") from None


async def check(bills: BillStack, ledger: Path, when: str, settle_s: float = 10) -> BillReport:
    report = await reconcile_bills(
        ledger, bills.catalog, bills.stack.gateway, ADMIN_TOKEN, settle_s=settle_s
    )
    print(f"\nbills, {when}:\n{report.render()}")
    return report


async def test_every_bill_is_exact_with_redis_warm_flushed_and_down(
    bills: BillStack, tmp_path: Path
) -> None:
    sent = [
        *readings("b-flat", berlin_times(), 0.21),
        *readings("b-tou", berlin_times(), 0.1234565),
        *readings("stray-1", berlin_times(), 0.05),  # not in the catalog: default tariff
        *readings("ny-1", new_york_times(), 0.55),  # November crosses both tier bounds
        *readings("ny-2", new_york_times(), 0.1),
    ]
    ledger = tmp_path / "ledger.jsonl"
    await send_with_ledger(bills, sent, ledger)

    first = await check(bills, ledger, "first read")
    assert first.exact, first.render()
    assert (first.checked_devices, first.checked_accounts) == (5, 2)
    # October, November and the current month, for each device and account (at least:
    # a current month that began within the last half hour adds one).
    assert len(first.checks) >= 3 * 5 + 3 * 2
    assert await bills.cached_months() > 0, "the first read did not fill the cache"

    warm = await check(bills, ledger, "again, Redis warm")
    assert warm.exact, warm.render()

    client = bills.redis()
    keys = [key async for key in client.scan_iter(f"{bills.stack.redis_prefix}*")]
    await client.delete(*keys)
    await client.aclose()
    assert await bills.cached_months() == 0
    flushed = await check(bills, ledger, "Redis flushed")
    assert flushed.exact, flushed.render()
    assert await bills.cached_months() > 0, "billing did not refill the cache"

    bills.redis_process.kill()
    await bills.redis_process.wait()
    try:
        down = await check(bills, ledger, "Redis killed")
        assert down.exact, down.render()
        failures = await bills.stack.metric(
            "BILLING", "billing_query_cache_failures_total", {"operation": "month_slots"}
        )
        assert failures > 0, "billing did not notice Redis was down: who answered?"
    finally:
        # Back (empty, as after a restart): the module's other tests, in whatever order they
        # run, meet a Redis that answers, not seconds of billing's retries while it is down.
        bills.redis_process = await start_redis(bills.redis_port)


async def test_the_check_finds_a_ledger_that_does_not_match(
    bills: BillStack, tmp_path: Path
) -> None:
    device = f"odd-{uuid.uuid4().hex[:6]}"  # not in the catalog, in no account
    sent = readings(device, every_quarter("2026-11-10T08:00", "2026-11-10T09:00"), 0.5)
    ledger = tmp_path / "ledger.jsonl"
    await send_with_ledger(bills, sent, ledger)
    assert (await check(bills, ledger, "as sent")).exact

    changed = tmp_path / "changed.jsonl"
    lines = ledger.read_text().splitlines(keepends=True)
    entry = json.loads(lines[0])
    entry["usage_kwh"] += 0.25
    changed.write_text(json.dumps(entry) + "\n" + "".join(lines[1:]))
    # settle_s=0: the bills were just found exact for the ledger as sent, billing holds
    # nothing new, so the first answer that differs is the check's finding (no 10 s of asking
    # again in vain).
    report = await check(bills, changed, "a ledger line changed by 0.25 kWh", settle_s=0)
    assert not report.exact
    row = next(line for line in report.render().splitlines() if line.startswith(device))
    assert row.endswith("<-- differs")
    assert "energy_kwh: expected " in report.render()
    assert report.render().splitlines()[-1].endswith("1 differ")

    # A reading billing holds that the ledger lacks, later in the same month: the readings
    # check covers the whole month now, and the bill differs.
    extra = readings(device, [utc("2026-11-20T12:00")], 1.0)
    await send_resending(bills.stack, extra, tmp_path / "extra.csv", batch=1, streams=1)

    async def stray_seen() -> bool:
        results = await reconcile(
            ledger, bills.stack.gateway, wait_s=0, token=ADMIN_TOKEN, catalog=bills.catalog
        )
        return len(results[0].unexpected) == 1

    await wait_until(stray_seen, timeout_s=60, what="the readings check to see the extra one")
    # settle_s=0 as well: billing holds the extra reading (the readings check saw it), and
    # asking again for 10 s could not make the bill match a ledger that lacks it.
    report = await check(bills, ledger, "a reading outside the ledger", settle_s=0)
    assert not report.exact
    assert f"{device}" in report.render() and "total: expected" in report.render()


async def close_period(bills: BillStack, period: str, account: str) -> str:
    """``make close-period PERIOD=period ACCOUNT=account`` against the stack."""
    process = await asyncio.create_subprocess_exec(
        *f"{sys.executable} -m billing_service.close_period {period} --account {account}".split(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=ROOT,
        env=bills.stack.env(),
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, output.decode()
    return output.decode()


async def send_late(
    bills: BillStack, ledger: Path, known: list[Reading], new: list[Reading]
) -> list[Reading]:
    """Send ``new``, add it to the ledger of ``known``; wait until billing holds them all."""
    await send_resending(bills.stack, new, ledger.with_suffix(f".{len(known)}.csv"), 50, 1)
    everything = [*known, *new]
    write_ledger(ledger, everything)
    await readings_reconciled(bills, ledger, timeout_s=60)
    return everything


async def test_issued_months_add_up_with_their_late_readings(
    bills: BillStack, tmp_path: Path
) -> None:
    """late-shop's October is issued, a late reading for it arrives, November is issued
    (carrying October's adjustment), then late readings for both arrive (open December
    carries them). Every issued month adds up; a ledger reading never sent is caught."""
    ledger = tmp_path / "ledger.jsonl"
    october = every_quarter("2026-10-05T08:00", "2026-10-05T09:00")
    sent = await send_late(
        bills,
        ledger,
        [],
        [
            *readings("late-1", october, 0.4),
            *readings("late-1", every_quarter("2026-11-05T08:00", "2026-11-05T08:30"), 0.3),
            *readings("late-2", october, 0.2),
        ],
    )
    closed = await close_period(bills, "2026-10", "late-shop")
    assert "issued: bill late-shop-2026-10 number 1 " in closed, closed
    sent = await send_late(bills, ledger, sent, readings("late-1", [utc("2026-10-20T10:00")], 1.5))
    closed = await close_period(bills, "2026-11", "late-shop")
    assert "issued: bill late-shop-2026-11 number 2 " in closed, closed
    sent = await send_late(
        bills,
        ledger,
        sent,
        [
            *readings("late-1", [utc("2026-10-27T10:00"), utc("2026-11-22T10:00")], 0.75),
            *readings("late-2", [utc("2026-10-28T19:00")], 0.5),  # a weekday's day band
        ],
    )

    report = await check(bills, ledger, "October and November issued, late readings since")
    assert report.exact, report.render()
    rows = {tuple(row.split()[:3]): row for row in report.render().splitlines()}
    assert (report.checked_devices, report.checked_accounts) == (2, 1)
    # late-1's October: all three parts in play (late-2's: issued and open December).
    october_row = rows["late-1", "2026-10", "flat-eur"]
    assert "issued late-shop-2026-10 " in october_row, october_row
    assert "later bills 0.00" not in october_row and "open 2026-12 0.00" not in october_row
    assert "issued late-shop-2026-11 " in rows["late-1", "2026-11", "flat-eur"]
    assert "issued late-shop-2026-10 " in rows["account", "late-shop", "2026-10"]

    # A late October reading in the ledger that was never sent: October does not add up.
    tampered = tmp_path / "tampered.jsonl"
    write_ledger(tampered, [*sent, *readings("late-1", [utc("2026-10-29T10:00")], 2.0)])
    report = await check(bills, tampered, "a late reading billing never got", settle_s=0)
    text = report.render()
    assert not report.exact
    assert text.splitlines()[-1].endswith("2 differ"), text  # late-1's October and the account's
    assert "    2026-10 issued as late-shop-2026-10: ledger charges " in text, text
    assert "on later issued bills + " in text and " on open 2026-12 = " in text, text
    assert "    late-1: 2026-10 issued as late-shop-2026-10: ledger " in text, text
