"""Late writes (billing_service/domain/late.py): which readings are marked, which issued months
an open bill recomputes, and that skipping the others changes no bill. The marks on the real
MongoDB-wire server: tests/component/test_billing_close.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo, available_timezones

import pytest
from mongomock_motor import AsyncMongoMockClient

from billing_service.adapters.catalog_file import parse_catalog
from billing_service.adapters.mongo_bills import MongoBillStore
from billing_service.closing import BillCloser, DeviceBiller, PeriodNotClosable
from billing_service.domain.bill import Bill, period_of_month
from billing_service.domain.late import (
    CLOSE_AFTER_END,
    LATE_AFTER,
    MARGIN,
    ROLLOUT,
    LateWrites,
    earliest_month_end,
    late_days,
)
from billing_service.domain.ledger import SlotKey
from common.models import validate_reading
from common.slots import SLOT
from tests.unit.test_bill_closing import CATALOG  # acme's m1, Europe/Berlin, flat

UTC_DAY = datetime(2025, 2, 10, tzinfo=UTC)
NOW = datetime(2025, 6, 1, tzinfo=UTC)


def test_a_reading_is_late_once_its_month_may_have_ended_late_after_before_the_write() -> None:
    berlin_march_end = datetime(2025, 3, 31, 22, 0, tzinfo=UTC)  # the earliest: UTC+14
    earliest = datetime(2025, 3, 31, 10, 0, tzinfo=UTC)
    reading = validate_reading("m1", datetime(2025, 3, 10, 7, 5, tzinfo=UTC), 0.1, now=NOW)
    assert (
        late_days([SlotKey.of(reading)], earliest + LATE_AFTER - timedelta(microseconds=1)) == set()
    )
    assert late_days([SlotKey.of(reading)], earliest + LATE_AFTER) == {
        ("m1", datetime(2025, 3, 10, tzinfo=UTC))
    }
    assert earliest < berlin_march_end
    # A slot within 12 h after a UTC month's start may still be in the month before (UTC-12):
    # late 15 minutes after it ends.
    early = validate_reading("m2", datetime(2025, 4, 1, 11, 55, tzinfo=UTC), 0.1, now=NOW)
    slot_end = datetime(2025, 4, 1, 12, 0, tzinfo=UTC)
    assert earliest_month_end(slot_end) == slot_end
    assert late_days([SlotKey.of(early)], slot_end + LATE_AFTER) == {
        ("m2", datetime(2025, 4, 1, tzinfo=UTC))
    }
    assert earliest_month_end(slot_end + SLOT) == datetime(2025, 4, 30, 10, 0, tzinfo=UTC)


def test_no_time_zone_ends_a_month_before_the_earliest_end() -> None:
    """Slots every 75 minutes from 15 h before to 15 h after each UTC month boundary of
    2025, and mid-month, in every IANA zone."""
    boundaries = [datetime(2025, month, 1, tzinfo=UTC) for month in range(1, 13)]
    slot_ends = [
        boundary + timedelta(minutes=minutes)
        for boundary in boundaries
        for minutes in [*range(-15 * 60, 15 * 60 + 1, 75), 10 * 24 * 60]
    ]
    for zone in available_timezones():
        tz = ZoneInfo(zone)
        for slot_end in slot_ends:
            local = (slot_end - timedelta(microseconds=1)).astimezone(tz)
            following = (local.replace(day=1) + timedelta(days=32)).replace(day=1)
            month_end = datetime(following.year, following.month, 1, tzinfo=tz)
            assert earliest_month_end(slot_end) <= month_end, (zone, slot_end, month_end)


def test_a_month_is_recomputed_only_for_a_mark_in_it_since_it_was_last_seen() -> None:
    seen = datetime(2025, 3, 4, tzinfo=UTC)
    february = (datetime(2025, 2, 1, tzinfo=UTC), datetime(2025, 3, 1, tzinfo=UTC))
    reliable = datetime(2025, 1, 1, tzinfo=UTC)

    def changed(days: dict[datetime, datetime], reliable_from: datetime | None = reliable) -> bool:
        return LateWrites(reliable_from, days).may_have_changed(*february, seen)

    assert not changed({})
    assert changed({UTC_DAY: seen - MARGIN})
    assert not changed({UTC_DAY: seen - MARGIN - timedelta(microseconds=1)})
    assert not changed({datetime(2025, 3, 1, tzinfo=UTC): seen})  # a day after the month
    assert changed({datetime(2025, 2, 28, tzinfo=UTC): seen})  # its last day
    assert changed({datetime(2025, 1, 31, tzinfo=UTC): seen}) is False
    # Marks not yet known complete when the month was last seen: always recomputed.
    assert changed({}, reliable_from=None)
    assert changed({}, reliable_from=seen - MARGIN + timedelta(seconds=1))
    since = datetime(2025, 1, 1, tzinfo=UTC)
    assert LateWrites.marked_since(since, {}).reliable_from == since + ROLLOUT
    assert MARGIN == CLOSE_AFTER_END - LATE_AFTER > timedelta(0)


class Slots:
    """Milliwatt-hours by slot, and which ranges a biller asked for."""

    def __init__(self) -> None:
        self.energy: dict[datetime, int] = {}
        self.asked: list[datetime] = []

    async def __call__(self, device_id: str, start: datetime, end: datetime) -> dict[datetime, int]:
        self.asked.append(start)
        return {slot: mwh for slot, mwh in self.energy.items() if start <= slot < end}


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


async def test_an_open_bill_recomputes_the_issued_months_late_writes_touched_and_no_other() -> None:
    catalog = parse_catalog(CATALOG, "test")
    tariff = catalog.tariff("t")
    slots = Slots()
    for month in ("2025-01", "2025-02", "2025-03", "2025-04"):
        slots.energy[datetime.fromisoformat(f"{month}-10T08:00:00+00:00")] = 1_000_000
    marks: dict[datetime, datetime] = {}

    async def late_writes(device_id: str) -> LateWrites:
        return LateWrites(datetime(2024, 1, 1, tzinfo=UTC), dict(marks))

    bills = MongoBillStore(AsyncMongoMockClient()["bills"])  # type: ignore[arg-type]
    clock = Clock(datetime(2025, 4, 3, tzinfo=UTC))
    marked = DeviceBiller(slots, late_writes)
    closer = BillCloser(marked, bills, lambda: catalog, clock)
    for month, closed_at in (("2025-01", "2025-02-03"), ("2025-02", "2025-03-03")):
        clock.now = datetime.fromisoformat(f"{closed_at}T00:00:00+00:00")
        await closer.close_period("acme", month)
    april = period_of_month(tariff, "2025-04")
    as_of = datetime(2025, 4, 20, tzinfo=UTC)

    async def open_bill(biller: DeviceBiller) -> Bill:
        slots.asked.clear()
        issued = await bills.of_account("acme")
        return await biller.bill("m1", tariff, april, as_of, catalog, issued)

    # March was never issued; January and February: no late write, nothing recomputed.
    quiet = await open_bill(marked)
    assert slots.asked == [april.start] and quiet.adjustments == ()
    assert quiet == await open_bill(DeviceBiller(slots))  # recomputing every month: the same

    # A late reading in February, after its bill: February alone is recomputed, adjusted.
    slots.energy[datetime(2025, 2, 20, 9, 0, tzinfo=UTC)] = 500_000
    marks[datetime(2025, 2, 20, tzinfo=UTC)] = datetime(2025, 4, 5, tzinfo=UTC)
    adjusted = await open_bill(marked)
    february = period_of_month(tariff, "2025-02")
    assert slots.asked == [april.start, february.start]
    assert [(a.period_label, a.energy_kwh, a.amount) for a in adjusted.adjustments] == [
        ("2025-02", Decimal("0.5"), Decimal("0.15"))
    ]
    assert adjusted == await open_bill(DeviceBiller(slots))

    # Issued with April's bill, the adjustment is not carried again by May's.
    clock.now = datetime(2025, 5, 3, tzinfo=UTC)
    april_bill = await closer.close_period("acme", "2025-04")
    assert [a.period for a in april_bill.bill.devices[0].adjustments] == ["2025-02"]
    may = period_of_month(tariff, "2025-05")
    slots.asked.clear()
    issued = await bills.of_account("acme")
    bill = await marked.bill("m1", tariff, may, datetime(2025, 5, 20, tzinfo=UTC), catalog, issued)
    assert slots.asked == [may.start] and bill.adjustments == ()


async def test_a_period_closes_no_earlier_than_an_hour_after_its_end() -> None:
    catalog = parse_catalog(CATALOG, "test")
    end = datetime(2025, 3, 31, 22, 0, tzinfo=UTC)  # March in Berlin (CEST)
    clock = Clock(end + CLOSE_AFTER_END - timedelta(seconds=1))
    bills = MongoBillStore(AsyncMongoMockClient()["bills"])  # type: ignore[arg-type]
    closer = BillCloser(DeviceBiller(Slots()), bills, lambda: catalog, clock)
    with pytest.raises(PeriodNotClosable, match=r"ended less than 1 h ago.*close it after"):
        await closer.close_period("acme", "2025-03")
    assert await bills.of_account("acme") == []
    clock.now = end + CLOSE_AFTER_END
    assert (await closer.close_period("acme", "2025-03")).issued_now
