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
    compare_bill,
    expected_bill,
    milliwh,
    months_touched,
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
