"""The reconciliation's own bill computation (scripts.bill_check), on examples worked out by
hand: every expected number below was computed on paper from the catalog and the readings,
not with billing's code."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from common.energy.v1 import billing_pb2
from scripts.bill_check import (
    BillCheck,
    BillReport,
    Catalog,
    ExpectedBill,
    LedgerReading,
    Line,
    check_bills,
    compare_bill,
    compare_issued,
    expected_bill,
    milliwh,
    months_touched,
    next_month,
    period_of,
    plan,
    read_catalog,
    read_ledger_readings,
    slot_start,
    standing_days,
)

CATALOG = """
default_tariff: flat
tariffs:
  - id: flat
    currency: EUR
    time_zone: Europe/Berlin
    standing_charge_per_day: 0.45
    tax_rate: 0.19
    energy: {kind: flat, price_per_kwh: 0.30}
  - id: economy7
    currency: GBP
    time_zone: Europe/London
    standing_charge_per_day: 0.53
    tax_rate: 0.05
    energy:
      kind: time_of_use
      bands:
        - {name: peak, price_per_kwh: 0.30, start: "00:00", end: "00:30"}
        - {name: off-peak, price_per_kwh: 0.15, start: "00:30", end: "07:30"}
        - {name: peak, price_per_kwh: 0.30, start: "07:30", end: "24:00"}
  - id: berlin-tou
    currency: EUR
    time_zone: Europe/Berlin
    standing_charge_per_day: "0.30"
    tax_rate: "0.07"
    energy:
      kind: time_of_use
      bands:
        - {name: night, price_per_kwh: 0.20, start: "00:00", end: "06:00"}
        - name: day
          price_per_kwh: 0.40
          days: [mon, tue, wed, thu, fri]
          start: "06:00"
          end: "22:00"
        - {name: weekend, price_per_kwh: 0.25, days: [sat, sun], start: "06:00", end: "22:00"}
        - {name: night, price_per_kwh: 0.20, start: "22:00", end: "24:00"}
  - id: tiered
    currency: USD
    time_zone: America/New_York
    standing_charge_per_day: 0.33
    tax_rate: 0.0
    energy:
      kind: tiered
      tiers:
        - {up_to_kwh: 500, price_per_kwh: 0.14}
        - {up_to_kwh: 1000, price_per_kwh: 0.18}
        - {up_to_kwh: null, price_per_kwh: 0.24}
accounts:
  - {id: acct-a, name: A}
  - {id: acct-b, name: B}
devices:
  - {id: m-flat, account: acct-a, site: shop, tariff: flat}
  - {id: m-tou, account: acct-a, site: bakehouse, tariff: berlin-tou}
  - {id: m-tiered, account: acct-b, site: store, tariff: tiered}
"""
BERLIN = ZoneInfo("Europe/Berlin")


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    path = tmp_path / "tariffs.yaml"
    path.write_text(CATALOG)
    return read_catalog(path)


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def reading(stamp: str, usage_kwh: float) -> LedgerReading:
    return LedgerReading(utc(stamp), usage_kwh)


def lines(bill: ExpectedBill) -> list[tuple[str, str, str, str, str]]:
    return [(x.description, x.quantity, x.unit, x.unit_price, x.amount) for x in bill.lines]


def test_numbers_are_read_as_written(catalog: Catalog) -> None:
    (flat,) = catalog.tariffs["flat"].versions  # the one-version form
    assert str(flat.flat_price) == "0.30"  # not 0.3, not 0.299999...
    assert (flat.standing_per_day, flat.tax_rate) == (Decimal("0.45"), Decimal("0.19"))
    assert flat.effective_from is None
    assert catalog.tariffs["tiered"].versions[0].tiers[2] == (None, Decimal("0.24"))
    assert catalog.tariff_of("not-listed").id == "flat"  # the default tariff
    assert catalog.account_devices == {"acct-a": ["m-flat", "m-tou"], "acct-b": ["m-tiered"]}


def test_a_reading_is_energy_of_the_15_minutes_before_it() -> None:
    assert slot_start(utc("2026-10-01T07:30:00")) == utc("2026-10-01T07:15:00")
    assert slot_start(utc("2026-10-01T07:30:00.000001")) == utc("2026-10-01T07:30:00")
    assert slot_start(utc("2026-10-01T07:30:01")) == utc("2026-10-01T07:30:00")
    assert slot_start(utc("2026-10-01T07:44:59")) == utc("2026-10-01T07:30:00")


def test_energy_is_whole_milliwatt_hours_of_the_float() -> None:
    assert milliwh(1.25) == 1_250_000
    assert milliwh(2.5e-06) == 2  # the product is 2.5 exactly: half to even
    assert milliwh(0.1234565) == 123_456  # 123456.5 exactly: half to even
    # The float 1.0000005 is a hair above: its product is 1000000.5000000001, so it rounds
    # up, where the decimal text 1.0000005 would round to even (1000000).
    assert milliwh(1.0000005) == 1_000_001


def test_a_dst_month_has_its_local_days_and_hours() -> None:
    october = period_of(BERLIN, 2026, 10)
    assert (october.start, october.end) == (utc("2026-09-30T22:00"), utc("2026-10-31T23:00"))
    assert (october.days, october.end - october.start) == (31, timedelta(hours=745))
    november = period_of(ZoneInfo("America/New_York"), 2026, 11)  # clocks back on the 1st
    assert (november.start, november.end) == (utc("2026-11-01T04:00"), utc("2026-12-01T05:00"))
    assert (november.days, november.end - november.start) == (30, timedelta(hours=721))


def test_a_flat_bill(catalog: Catalog) -> None:
    readings = [
        reading("2026-10-01T10:15:00", 1.25),
        reading("2026-10-01T10:30:00", 1.5),
        reading("2026-10-01T10:45:00", 1.75),
        reading("2026-09-30T22:00:00", 9.0),  # slot 21:45Z: 23:45 on 30 September in Berlin
        reading("2026-10-31T23:00:01", 9.0),  # slot 23:00Z: 1 November in Berlin
    ]
    october = period_of(BERLIN, 2026, 10)
    bill = expected_bill(catalog.tariffs["flat"], october, readings, october.end)
    # 4.5 kWh x 0.30 = 1.35; 31 days x 0.45 = 13.95; subtotal 15.30; tax 2.907 -> 2.91
    assert lines(bill) == [
        ("Energy", "4.5", "kWh", "0.30", "1.35"),
        ("Standing charge", "31", "day", "0.45", "13.95"),
        ("Tax 19%", "15.30", "", "0.19", "2.91"),
    ]
    assert (bill.energy_kwh, bill.subtotal, bill.tax, bill.total) == (
        "4.5",
        "15.30",
        "2.91",
        "18.21",
    )


def test_standing_charge_runs_to_the_local_day_of_as_of() -> None:
    october = period_of(BERLIN, 2026, 10)
    assert standing_days(october, BERLIN, utc("2026-09-30T21:59:59")) == 0  # before it
    assert standing_days(october, BERLIN, utc("2026-09-30T22:00")) == 1  # 1 Oct 00:00
    assert standing_days(october, BERLIN, utc("2026-10-10T21:59:59")) == 10  # 10 Oct 23:59
    assert standing_days(october, BERLIN, utc("2026-10-10T22:00")) == 11  # 11 Oct 00:00
    assert standing_days(october, BERLIN, utc("2026-10-31T22:59:59")) == 31
    assert standing_days(october, BERLIN, october.end) == 31  # 1 Nov not counted


def test_lines_and_tax_round_half_up(catalog: Catalog) -> None:
    october = period_of(BERLIN, 2026, 10)
    as_of = utc("2026-10-10T12:00")  # 10 days so far
    small = expected_bill(
        catalog.tariffs["flat"], october, [reading("2026-10-02T08:00", 0.15)], as_of
    )
    # 0.15 x 0.30 = 0.045 -> 0.05 (half even would give 0.04); 10 x 0.45 = 4.50;
    # subtotal 4.55; tax 0.8645 -> 0.86
    assert lines(small)[0] == ("Energy", "0.15", "kWh", "0.30", "0.05")
    assert (small.subtotal, small.tax, small.total) == ("4.55", "0.86", "5.41")

    exact_half = expected_bill(
        catalog.tariffs["flat"], october, [reading("2026-10-02T08:00", 10.0)], as_of
    )
    # 10 x 0.30 = 3.00; + 4.50 = 7.50; tax 7.50 x 0.19 = 1.425 -> 1.43 (half even: 1.42)
    assert (exact_half.subtotal, exact_half.tax, exact_half.total) == ("7.50", "1.43", "8.93")


def test_time_of_use_band_boundaries(catalog: Catalog) -> None:
    november = period_of(ZoneInfo("Europe/London"), 2026, 11)  # GMT: local time is UTC
    readings = [
        reading("2026-11-03T00:30:00", 1.0),  # slot 00:15: peak
        reading("2026-11-03T00:45:00", 2.0),  # slot 00:30: off-peak
        reading("2026-11-03T07:30:00", 3.0),  # slot 07:15: off-peak
        reading("2026-11-03T07:30:01", 4.0),  # slot 07:30: peak
    ]
    bill = expected_bill(catalog.tariffs["economy7"], november, readings, november.end)
    # peak 5 x 0.30 = 1.50, off-peak 5 x 0.15 = 0.75 (one line per name, tariff order);
    # 30 days x 0.53 = 15.90; subtotal 18.15; tax 5% 0.9075 -> 0.91
    assert lines(bill) == [
        ("Energy (peak)", "5", "kWh", "0.30", "1.50"),
        ("Energy (off-peak)", "5", "kWh", "0.15", "0.75"),
        ("Standing charge", "30", "day", "0.53", "15.90"),
        ("Tax 5%", "18.15", "", "0.05", "0.91"),
    ]
    assert bill.total == "19.06"


def test_time_of_use_across_the_dst_night(catalog: Catalog) -> None:
    """Berlin, Saturday 24 to Monday 26 October 2026: at 01:00Z on Sunday 03:00 CEST
    becomes 02:00 CET, so the night band (00:00-06:00 local) lasts seven hours."""
    readings = [
        reading("2026-10-24T19:45:00", 1.0),  # slot 19:30Z = Sat 21:30 CEST: weekend
        reading("2026-10-24T20:15:00", 2.0),  # slot 20:00Z = Sat 22:00 CEST: night
        reading("2026-10-25T00:15:00", 0.5),  # slot 00:00Z = Sun 02:00 CEST: night
        reading("2026-10-25T01:15:00", 0.25),  # slot 01:00Z = Sun 02:00 CET (again): night
        reading("2026-10-25T05:00:00", 0.125),  # slot 04:45Z = 05:45 CET: night (not 06:45)
        reading("2026-10-25T05:15:00", 4.0),  # slot 05:00Z = Sun 06:00 CET: weekend
        reading("2026-10-26T06:00:00", 3.0),  # slot 05:45Z = Mon 06:45 CET: day
    ]
    october = period_of(BERLIN, 2026, 10)
    bill = expected_bill(catalog.tariffs["berlin-tou"], october, readings, october.end)
    # night 2.875 x 0.20 = 0.575 -> 0.58; day 3 x 0.40 = 1.20; weekend 5 x 0.25 = 1.25;
    # 31 days x 0.30 = 9.30; subtotal 12.33; tax 7% 0.8631 -> 0.86
    assert lines(bill) == [
        ("Energy (night)", "2.875", "kWh", "0.20", "0.58"),
        ("Energy (day)", "3", "kWh", "0.40", "1.20"),
        ("Energy (weekend)", "5", "kWh", "0.25", "1.25"),
        ("Standing charge", "31", "day", "0.30", "9.30"),
        ("Tax 7%", "12.33", "", "0.07", "0.86"),
    ]
    assert (bill.energy_kwh, bill.total) == ("10.875", "13.19")


def test_tiered_splits_the_month_total(catalog: Catalog) -> None:
    new_york = ZoneInfo("America/New_York")
    readings = [
        reading("2026-11-01T04:00:00", 50.0),  # slot 03:45Z = 31 Oct 23:45 EDT: October
        reading("2026-11-01T04:00:01", 400.0),  # slot 04:00Z = 1 Nov 00:00 EDT
        reading("2026-11-20T12:00:00", 200.5),
    ]
    november = period_of(new_york, 2026, 11)
    bill = expected_bill(catalog.tariffs["tiered"], november, readings, november.end)
    # 600.5 kWh: 500 x 0.14 = 70.00, 100.5 x 0.18 = 18.09, 0 x 0.24 = 0.00;
    # 30 days x 0.33 = 9.90; subtotal 97.99; tax 0
    assert lines(bill) == [
        ("Energy 0-500 kWh", "500", "kWh", "0.14", "70.00"),
        ("Energy 500-1000 kWh", "100.5", "kWh", "0.18", "18.09"),
        ("Energy above 1000 kWh", "0", "kWh", "0.24", "0.00"),
        ("Standing charge", "30", "day", "0.33", "9.90"),
        ("Tax 0%", "97.99", "", "0.0", "0.00"),
    ]
    assert (bill.energy_kwh, bill.total) == ("600.5", "97.99")
    october = period_of(new_york, 2026, 10)
    assert [p.label for p in months_touched(new_york, readings)] == ["2026-10", "2026-11"]
    assert expected_bill(catalog.tariffs["tiered"], october, readings, october.end).energy_kwh == (
        "50"
    )


def test_the_plan_covers_every_device_month_and_account_month(catalog: Catalog) -> None:
    readings = {
        "m-flat": {"r1": reading("2026-10-31T23:00:00", 1.0)},  # Berlin October
        "m-tou": {"r2": reading("2026-10-31T23:00:01", 1.0)},  # Berlin November
        "stray": {"r3": reading("2026-11-02T10:00:00", 1.0)},  # default tariff, no account
    }
    jobs = [(type(job).__name__, *vars(job).values()) for job in plan(catalog, readings)]
    assert [(kind, subject, period.label) for kind, subject, period in jobs] == [
        ("_DeviceJob", "m-flat", "2026-10"),
        ("_DeviceJob", "m-tou", "2026-11"),
        ("_DeviceJob", "stray", "2026-11"),
        ("_AccountJob", "acct-a", "2026-10"),
        ("_AccountJob", "acct-a", "2026-11"),
    ]


def test_the_ledger_counts_a_resent_reading_once(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    line = '{"reading_id": "r1", "device_id": "d", "timestamp": "2026-10-01T10:15:00+00:00", '
    path.write_text(line + '"usage_kwh": 1.25}\n' + line + '"usage_kwh": 1.25}\n\n')
    assert read_ledger_readings(path) == {"d": {"r1": reading("2026-10-01T10:15:00", 1.25)}}
    path.write_text('{"device_id": "d"}\n')
    with pytest.raises(ValueError, match="ledger.jsonl:1: not a ledger line"):
        read_ledger_readings(path)


def _as_billed(bill: ExpectedBill, as_of: datetime) -> billing_pb2.Bill:
    message = billing_pb2.Bill(
        tariff_id=bill.tariff_id,
        currency=bill.currency,
        period=bill.period.label,
        energy_kwh=bill.energy_kwh,
        subtotal=bill.subtotal,
        tax=bill.tax,
        total=bill.total,
    )
    message.period_start.FromDatetime(bill.period.start)
    message.period_end.FromDatetime(bill.period.end)
    message.as_of.FromDatetime(as_of)
    for line in bill.lines:
        message.lines.add(**vars(line))
    return message


def test_a_difference_is_named_and_shown(catalog: Catalog) -> None:
    october = period_of(BERLIN, 2026, 10)
    expected = expected_bill(
        catalog.tariffs["flat"], october, [reading("2026-10-01T10:15:00", 4.5)], october.end
    )
    asked_at = utc("2026-12-01T12:00")
    billed = _as_billed(expected, october.end)
    assert compare_bill(expected, billed, False, asked_at) == []

    billed.lines[0].amount, billed.total = "1.36", "18.22"
    billed.as_of.FromDatetime(utc("2026-10-20T00:00"))  # a closed month billed part-way
    differences = compare_bill(expected, billed, True, asked_at)
    assert differences == [
        "unregistered: expected True, billed False",
        f"line 1: expected {Line('Energy', '4.5', 'kWh', '0.30', '1.35')}, "
        "billed Energy: 4.5 kWh x 0.30 = 1.36",
        "total: expected 18.21, billed 18.22",
        "as_of 2026-10-20T00:00:00+00:00: the period is closed, expected its end",
    ]
    report = BillReport(
        [
            BillCheck("m-flat", "2026-10", False, "flat", "EUR", "4.5", "18.21", "18.22"),
            BillCheck("acct-a", "2026-10", True, "", "EUR", "4.5", "18.21", "18.21"),
        ],
        checked_devices=1,
        checked_accounts=1,
    )
    report.checks[0].differences = differences
    text = report.render().splitlines()
    assert not report.exact
    assert text[1].startswith("m-flat") and text[1].endswith("18.22   <-- differs")
    assert text[2] == "    unregistered: expected True, billed False"
    assert text[-2].startswith("account acct-a")
    assert text[-1] == "1 device bills (1 devices), 1 account bills (1 accounts): 1 differ"


# --- issued months: the ledger's bill = issued charges + later adjustments + open adjustment --
#
# m-flat's October (flat: 0.30 per kWh, 31 days x 0.45 = 13.95, tax 19%), worked by hand:
# - issued with 4.5 kWh: 1.35 + 13.95 = 15.30, tax 2.907 -> 2.91, charges 18.21; the bill
#   also carried 0.50 for September, so its total is 18.71;
# - one late kWh, then November issued: October recomputed with 5.5 kWh is 1.65 + 13.95 =
#   15.60, tax 2.964 -> 2.96, 18.56: November carries 18.56 - 18.21 = 0.35 and 1 kWh;
# - one more late kWh: with 6.5 kWh 1.95 + 13.95 = 15.90, tax 3.021 -> 3.02, 18.92: open
#   December carries 18.92 - 18.21 - 0.35 = 0.36 and 1 kWh.
# The ledger holds all 6.5 kWh: 18.92 = 18.21 + 0.35 + 0.36, 6.5 = 4.5 + 1 + 1.

OCTOBER_READINGS = [
    reading("2026-10-01T10:15:00", 4.5),  # billed when October was issued
    reading("2026-10-12T08:00:00", 1.0),  # late, carried by November
    reading("2026-10-20T08:00:00", 1.0),  # late, carried by open December
]
ASKED_AT = utc("2026-12-02T12:00")


def bill_message(
    device_id: str,
    tariff_id: str,
    period: str,
    energy_kwh: str,
    subtotal: str,
    tax: str,
    total: str,
    adjustments: tuple[tuple[str, str, str], ...] = (),  # (period, kWh, amount)
    status: int = billing_pb2.BILL_STATUS_ESTIMATE,
    bill_id: str = "",
    zone: ZoneInfo = BERLIN,
    currency: str = "EUR",
) -> billing_pb2.Bill:
    """A device bill as billing answers it; lines are left out (an issued month's are not
    compared)."""
    year, month = (int(part) for part in period.split("-"))
    bounds = period_of(zone, year, month)
    message = billing_pb2.Bill(
        device_id=device_id,
        tariff_id=tariff_id,
        currency=currency,
        period=period,
        energy_kwh=energy_kwh,
        subtotal=subtotal,
        tax=tax,
        total=total,
        status=status,  # type: ignore[arg-type]
        bill_id=bill_id,
    )
    message.period_start.FromDatetime(bounds.start)
    message.period_end.FromDatetime(bounds.end)
    message.as_of.FromDatetime(bounds.end)
    for adjusted, kwh, amount in adjustments:
        message.adjustments.add(
            period=adjusted, issued_bill_id=f"acct-a-{adjusted}", energy_kwh=kwh, amount=amount
        )
    return message


def issued_october() -> billing_pb2.Bill:
    return bill_message(
        "m-flat",
        "flat",
        "2026-10",
        "4.5",
        "15.30",
        "2.91",
        "18.71",
        adjustments=(("2026-09", "1", "0.50"),),
        status=billing_pb2.BILL_STATUS_ISSUED,
        bill_id="acct-a-2026-10",
    )


def issued_november() -> billing_pb2.Bill:
    """November's own charges do not matter here; it carries 0.35 for October and 0.10 for
    September (not October's: left out)."""
    return bill_message(
        "m-flat",
        "flat",
        "2026-11",
        "0",
        "13.50",
        "2.57",
        "16.52",
        adjustments=(("2026-09", "0.5", "0.10"), ("2026-10", "1", "0.35")),
        status=billing_pb2.BILL_STATUS_ISSUED,
        bill_id="acct-a-2026-11",
    )


def open_december(october: str = "0.36", october_kwh: str = "1") -> billing_pb2.Bill:
    """Carries October's rest and 0.20 for November (not October's)."""
    return bill_message(
        "m-flat",
        "flat",
        "2026-12",
        "0",
        "0.45",
        "0.09",
        str(Decimal("0.54") + Decimal(october) + Decimal("0.20")),
        adjustments=(("2026-10", october_kwh, october), ("2026-11", "0.5", "0.20")),
    )


def account_bill(period: str, *bills: billing_pb2.Bill) -> billing_pb2.GetAccountBillResponse:
    total = sum((Decimal(bill.total) for bill in bills), Decimal(0))
    return billing_pb2.GetAccountBillResponse(
        account_id="acct-a",
        currency="EUR",
        period=period,
        bills=list(bills),
        total=str(total),
        status=billing_pb2.BILL_STATUS_ISSUED,
        bill_id=f"acct-a-{period}",
    )


def listed() -> list[billing_pb2.GetAccountBillResponse]:
    """ListBills of acct-a, newest first."""
    september = bill_message("m-flat", "flat", "2026-09", "1", "1", "1", "2", bill_id="x")
    return [
        account_bill("2026-11", issued_november()),
        account_bill("2026-10", issued_october()),
        account_bill("2026-09", september),
    ]


def ledger_october(catalog: Catalog, readings: list[LedgerReading]) -> ExpectedBill:
    october = period_of(BERLIN, 2026, 10)
    return expected_bill(catalog.tariffs["flat"], october, readings, october.end)


def test_an_issued_month_adds_up_with_its_adjustments(catalog: Catalog) -> None:
    expected = ledger_october(catalog, OCTOBER_READINGS)
    assert (expected.energy_kwh, expected.total) == ("6.5", "18.92")
    parts, differences = compare_issued(
        expected, issued_october(), listed(), "2026-12", open_december(), ASKED_AT
    )
    assert differences == []
    assert (parts.issued, parts.later, parts.open) == (
        Decimal("18.21"),  # subtotal + tax: not the 0.50 October carried for September
        Decimal("0.35"),
        Decimal("0.36"),
    )
    assert (parts.issued_kwh, parts.later_kwh, parts.open_kwh) == (
        Decimal("4.5"),
        Decimal("1"),
        Decimal("1"),
    )
    assert parts.brief() == "issued acct-a-2026-10 18.21 + later bills 0.35 + open 2026-12 0.36"
    # Before November was issued, December carried both kWh: 18.92 - 18.21 = 0.71.
    before = [b for b in listed() if b.period != "2026-11"]
    _, differences = compare_issued(
        expected, issued_october(), before, "2026-11", open_december("0.71", "2"), ASKED_AT
    )
    assert differences == []
    assert next_month("2026-12") == "2027-01" and next_month("2026-09") == "2026-10"


def test_an_issued_month_that_does_not_add_up_is_named_with_its_parts(catalog: Catalog) -> None:
    expected = ledger_october(catalog, OCTOBER_READINGS)
    _, differences = compare_issued(
        expected, issued_october(), listed(), "2026-12", open_december("0.30", "0.5"), ASKED_AT
    )
    assert differences == [
        "2026-10 issued as acct-a-2026-10: ledger charges 18.92, billed 18.21 issued "
        "+ 0.35 on later issued bills + 0.30 on open 2026-12 = 18.86",
        "2026-10 issued as acct-a-2026-10: ledger 6.5 kWh, billed 4.5 issued "
        "+ 1 on later issued bills + 0.5 on open 2026-12 = 6",
    ]
    # One more kWh in the ledger that billing never got: 7.5 kWh x 0.30 = 2.25 + 13.95 =
    # 16.20, tax 3.078 -> 3.08, 19.28.
    more = ledger_october(catalog, [*OCTOBER_READINGS, reading("2026-10-25T12:00:00", 1.0)])
    _, differences = compare_issued(
        more, issued_october(), listed(), "2026-12", open_december(), ASKED_AT
    )
    assert differences == [
        "2026-10 issued as acct-a-2026-10: ledger charges 19.28, billed 18.21 issued "
        "+ 0.35 on later issued bills + 0.36 on open 2026-12 = 18.92",
        "2026-10 issued as acct-a-2026-10: ledger 7.5 kWh, billed 4.5 issued "
        "+ 1 on later issued bills + 1 on open 2026-12 = 6.5",
    ]


def test_an_issued_bill_and_its_adjustments_must_be_consistent(catalog: Catalog) -> None:
    expected = ledger_october(catalog, OCTOBER_READINGS)
    october = issued_october()
    october.total = "18.21"  # without the 0.50 it carried for September
    bills = listed()
    bills[0].bills[0].adjustments[1].issued_bill_id = "acct-b-2026-10"
    issued_meanwhile = open_december()
    issued_meanwhile.status = billing_pb2.BILL_STATUS_ISSUED
    _, differences = compare_issued(expected, october, bills, "2026-12", issued_meanwhile, ASKED_AT)
    assert differences == [
        "the adjustment for 2026-10 on 2026-11 names bill acct-b-2026-10, not acct-a-2026-10",
        "ListBills' 2026-10 bill is not GetDeviceBill's",
        "2026-12 was issued while checking; ask again",
        "total: issued 18.21, but subtotal + tax + its adjustments = 18.71",
        "2026-10 issued as acct-a-2026-10: ledger charges 18.92, billed 18.21 issued "
        "+ 0.35 on later issued bills + 0.00 on open 2026-12 = 18.56",
        "2026-10 issued as acct-a-2026-10: ledger 6.5 kWh, billed 4.5 issued "
        "+ 1 on later issued bills + 0 on open 2026-12 = 5.5",
    ]


class FakeGateway:
    """GetDeviceBill, GetAccountBill and ListBills (two pages) of acct-a: October and
    November issued, December open. m-tou, with no readings, was issued 31 days x 0.30 =
    9.30, tax 7% 0.651 -> 0.65, 9.95."""

    def __init__(self, december: billing_pb2.Bill) -> None:
        tou = bill_message(
            "m-tou",
            "berlin-tou",
            "2026-10",
            "0",
            "9.30",
            "0.65",
            "9.95",
            status=billing_pb2.BILL_STATUS_ISSUED,
            bill_id="acct-a-2026-10",
        )
        self.listed = listed()
        self.listed[1].bills.append(tou)
        self.listed[1].total = "28.66"
        self.device = {("m-flat", "2026-10"): issued_october(), ("m-flat", "2026-12"): december}
        tou_december = bill_message("m-tou", "berlin-tou", "2026-12", "0", "0.30", "0.02", "0.32")
        self.account = {
            "2026-10": self.listed[1],
            "2026-12": billing_pb2.GetAccountBillResponse(
                account_id="acct-a", period="2026-12", bills=[december, tou_december]
            ),
        }
        self.pages: list[str] = []

    async def GetDeviceBill(  # noqa: N802 - the gRPC method's name
        self, request: billing_pb2.GetDeviceBillRequest, **_: object
    ) -> billing_pb2.GetDeviceBillResponse:
        return billing_pb2.GetDeviceBillResponse(
            bill=self.device[request.device_id, request.period]
        )

    async def GetAccountBill(  # noqa: N802
        self, request: billing_pb2.GetAccountBillRequest, **_: object
    ) -> billing_pb2.GetAccountBillResponse:
        return self.account[request.period]

    async def ListBills(  # noqa: N802
        self, request: billing_pb2.ListBillsRequest, **_: object
    ) -> billing_pb2.ListBillsResponse:
        self.pages.append(request.page_token)
        if not request.page_token:
            return billing_pb2.ListBillsResponse(bills=self.listed[:1], next_page_token="p2")
        return billing_pb2.ListBillsResponse(bills=self.listed[1:])


async def test_the_check_reads_every_page_and_the_open_month(catalog: Catalog) -> None:
    ledger = {"m-flat": {f"r{n}": r for n, r in enumerate(OCTOBER_READINGS)}}
    gateway = FakeGateway(open_december())
    report = await check_bills(gateway, catalog, ledger, settle_s=0)  # type: ignore[arg-type]
    assert report.exact, report.render()
    assert gateway.pages == ["", "p2", "", "p2"]  # the device's check, then the account's
    rows = report.render().splitlines()
    assert rows[1].startswith("m-flat") and rows[1].endswith(
        "EUR 18.92        18.92   issued acct-a-2026-10 18.21 + later bills 0.35 "
        "+ open 2026-12 0.36"
    )
    # The account: 18.92 + 9.95 = 28.87 = (18.21 + 9.95) + 0.35 + 0.36
    assert rows[2].startswith("account acct-a") and "EUR 28.87        28.87" in rows[2]

    # The ledger has a reading billing never got: both rows differ, naming the month.
    ledger["m-flat"]["r9"] = reading("2026-10-25T12:00:00", 1.0)
    report = await check_bills(FakeGateway(open_december()), catalog, ledger, settle_s=0)  # type: ignore[arg-type]
    text = report.render()
    assert text.splitlines()[-1].endswith("2 differ"), text
    assert "    2026-10 issued as acct-a-2026-10: ledger charges 19.28, billed 18.21" in text
    assert "    m-flat: 2026-10 issued as acct-a-2026-10: ledger 7.5 kWh, billed 4.5" in text


async def test_an_open_account_bill_adds_the_adjustments_its_devices_carry(
    catalog: Catalog,
) -> None:
    """December open, carrying October's and November's adjustments: the account total is
    the ledger's bills plus those, as billed."""
    ledger = {"m-flat": {"r1": reading("2026-12-01T10:00:00", 0.0)}}
    december = period_of(BERLIN, 2026, 12)
    as_of = utc("2026-12-01T12:00")  # 1 day: 0.45, tax 0.0855 -> 0.09, 0.54
    flat = expected_bill(catalog.tariffs["flat"], december, ledger["m-flat"].values(), as_of)
    tou = expected_bill(catalog.tariffs["berlin-tou"], december, [], as_of)
    assert (flat.total, tou.total) == ("0.54", "0.32")  # 0.30, tax 0.021 -> 0.02
    gateway = FakeGateway(open_december())
    for bill in gateway.account["2026-12"].bills:
        bill.as_of.FromDatetime(as_of)
        for line in (flat if bill.device_id == "m-flat" else tou).lines:
            bill.lines.add(**vars(line))
    gateway.device["m-flat", "2026-12"] = gateway.account["2026-12"].bills[0]
    gateway.account["2026-12"].currency = "EUR"
    gateway.account["2026-12"].total = "1.42"  # 0.54 + 0.36 + 0.20 + 0.32
    report = await check_bills(gateway, catalog, ledger, settle_s=0)  # type: ignore[arg-type]
    assert report.exact, report.render()
