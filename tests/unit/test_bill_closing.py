"""Closing without servers: the bill store's numbering and pages on mongomock-motor, which
month is due, and the closing settings. The same store runs against the real local
MongoDB-wire server in tests/component/test_billing_close.py."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from mongomock_motor import AsyncMongoMockClient

from billing_service.adapters.catalog_file import parse_catalog
from billing_service.adapters.mongo_bills import (
    IssuedBill,
    IssuedDevice,
    MongoBillStore,
    UsedVersion,
)
from billing_service.closing import BillCloser, DeviceBiller
from billing_service.domain.ledger import TransientFailure
from billing_service.settings import BillingSettings
from common.settings import load_settings

CATALOG = """
default_tariff: t
tariffs:
  - {id: t, currency: EUR, time_zone: Europe/Berlin, energy: {kind: flat, price_per_kwh: "0.3"}}
accounts: [{id: acme}]
devices: [{id: m1, account: acme, site: s, tariff: t}]
"""


def store() -> MongoBillStore:
    return MongoBillStore(AsyncMongoMockClient()["bills"])  # type: ignore[arg-type]


def bill(period: str, number: int) -> IssuedBill:
    return IssuedBill(
        account_id="acme",
        period=period,
        period_end_local_date=f"{period}-28",
        number=number,
        bill_id=f"acme-{period}",
        issued_at=datetime(2026, 1, 1, tzinfo=UTC),
        currency="EUR",
        total=Decimal("1.50"),
        devices=(IssuedDevice("m1", "t", Decimal("1.50"), Decimal("1.50"), Decimal("5"), ()),),
        versions=(UsedVersion("t", None, "abc"),),
        response_bytes=period.encode(),
    )


async def test_numbers_are_sequential_per_account_and_a_period_keeps_its_number() -> None:
    bills = store()
    assert await bills.reserve_number("acme", "2025-01") == 1
    assert await bills.reserve_number("acme", "2025-02") == 2
    assert await bills.reserve_number("acme", "2025-01") == 1  # a retried close reuses it
    assert await bills.reserve_number("other", "2025-01") == 1


async def test_concurrent_reservations_take_distinct_numbers() -> None:
    bills = store()
    periods = [f"2024-{month:02d}" for month in range(1, 13)]
    numbers = await asyncio.gather(*(bills.reserve_number("acme", p) for p in periods * 2))
    assert sorted(set(numbers)) == list(range(1, 13))
    assert numbers[:12] == numbers[12:]


async def test_an_issued_bill_is_stored_once_and_pages_newest_first() -> None:
    bills = store()
    for number, period in enumerate(["2025-01", "2025-02", "2025-03"], start=1):
        assert await bills.reserve_number("acme", period) == number
        stored, now = await bills.insert(bill(period, number))
        assert now and stored.number == number
    stored, now = await bills.insert(bill("2025-02", 99))  # a second close: the first wins
    assert not now and stored.number == 2 and stored.response_bytes == b"2025-02"
    page, token = await bills.page("acme", 2, "")
    assert [b.period for b in page] == ["2025-03", "2025-02"] and token
    rest, end = await bills.page("acme", 2, token)
    assert [b.period for b in rest] == ["2025-01"] and end == ""
    with pytest.raises(ValueError, match="another account_id"):
        await bills.page("other", 2, token)


async def test_a_period_numbered_but_not_stored_is_not_listed() -> None:
    bills = store()
    await bills.reserve_number("acme", "2025-01")
    await bills.insert(bill("2025-01", 1))
    await bills.reserve_number("acme", "2025-02")  # the close crashed before storing
    assert [b.period for b in await bills.of_account("acme")] == ["2025-01"]
    assert [b.period for b in (await bills.page("acme", 12, ""))[0]] == ["2025-01"]


def test_the_due_period_is_the_latest_month_ended_a_grace_ago() -> None:
    catalog = parse_catalog(CATALOG, "test")

    def due(now: datetime, grace_h: float) -> str | None:
        closer = BillCloser(DeviceBiller(_no_slots), store(), lambda: catalog, lambda: now)
        return closer.due_period(catalog, "acme", timedelta(hours=grace_h))

    # March ends 2025-03-31T22:00Z in Berlin (CEST).
    assert due(datetime(2025, 4, 3, 21, 59, tzinfo=UTC), 72) == "2025-02"
    assert due(datetime(2025, 4, 3, 22, 0, tzinfo=UTC), 72) == "2025-03"
    # A grace below CLOSE_AFTER_END (1 h) waits that long: readings still on their way.
    assert due(datetime(2025, 3, 31, 23, 0, tzinfo=UTC), 0) == "2025-03"
    assert due(datetime(2025, 3, 31, 22, 59, tzinfo=UTC), 0) == "2025-02"
    assert due(datetime(2025, 3, 31, 22, 59, tzinfo=UTC), 0.5) == "2025-02"
    assert due(datetime(2025, 4, 3, tzinfo=UTC), 0) is not None


async def _no_slots(device_id: str, start: datetime, end: datetime) -> dict[datetime, int]:
    raise TransientFailure("not used")


async def _empty_slots(device_id: str, start: datetime, end: datetime) -> dict[datetime, int]:
    return {}


async def test_a_month_numbered_by_a_close_that_stopped_is_issued_with_its_number() -> None:
    catalog = parse_catalog(CATALOG, "test")
    bills = store()
    now = datetime(2025, 4, 10, tzinfo=UTC)  # March is due (72 h after its end)
    closer = BillCloser(DeviceBiller(_empty_slots), bills, lambda: catalog, lambda: now)
    assert await bills.reserve_number("acme", "2025-01") == 1  # then the close stopped
    assert await bills.numbered_unissued("acme") == ["2025-01"]

    closed = await closer.close_due(timedelta(hours=72))
    assert [(c.bill.period, c.bill.number, c.issued_now) for c in closed] == [
        ("2025-01", 1, True),
        ("2025-03", 2, True),
    ]
    assert await bills.numbered_unissued("acme") == []
    assert await closer.close_due(timedelta(hours=72)) == []  # nothing left to issue


def test_closing_settings_default_and_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = BillingSettings()
    assert (defaults.close_grace_hours, defaults.close_check_interval_s) == (72, 300)
    monkeypatch.setenv("BILLING_CLOSE_CHECK_INTERVAL_S", "0")
    assert load_settings(BillingSettings).close_check_interval_s == 0
    monkeypatch.setenv("BILLING_CLOSE_GRACE_HOURS", "-1")
    with pytest.raises(SystemExit) as stopped:
        load_settings(BillingSettings)
    assert "BILLING_CLOSE_GRACE_HOURS='-1'" in str(stopped.value.code)
