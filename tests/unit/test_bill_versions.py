"""Bills under tariff versions and demand charges, worked out by hand in the comments, and
the reconciliation's own computation (scripts.bill_check) agreeing with billing's."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from billing_service.adapters.catalog_file import parse_catalog
from billing_service.domain.bill import Bill, compute_bill, period_of_month
from common.slots import SLOT
from scripts import bill_check

CATALOG = """\
default_tariff: change-15th
tariffs:
  - id: change-15th  # Berlin: flat 0.30, 0.40/day, 19%; from 15 November 0.40, 0.50/day, 20%
    currency: EUR
    time_zone: Europe/Berlin
    versions:
      - {standing_charge_per_day: 0.40, tax_rate: 0.19, energy: {kind: flat, price_per_kwh: 0.30}}
      - effective_from: 2026-11-15
        standing_charge_per_day: 0.50
        tax_rate: 0.20
        energy: {kind: flat, price_per_kwh: 0.40}
  - id: dst-change  # from 25 October 2026 (clocks go back that night): time of use
    currency: EUR
    time_zone: Europe/Berlin
    versions:
      - {standing_charge_per_day: 0.40, tax_rate: 0.19, energy: {kind: flat, price_per_kwh: 0.30}}
      - effective_from: 2026-10-25
        standing_charge_per_day: 0.50
        tax_rate: 0.19
        energy:
          kind: time_of_use
          bands:
            - {name: night, price_per_kwh: 0.20, start: "00:00", end: "06:00"}
            - {name: day, price_per_kwh: 0.40, start: "06:00", end: "24:00"}
  - id: demand  # Oslo: 1.00 NOK/kWh and 30 NOK per kW of the month's peak
    currency: NOK
    time_zone: Europe/Oslo
    energy: {kind: flat, price_per_kwh: 1.00}
    demand: {price_per_kw: 30}
  - id: day-demand  # Oslo: the peak counts only in the day band
    currency: NOK
    time_zone: Europe/Oslo
    tax_rate: 0.25
    energy:
      kind: time_of_use
      bands:
        - {name: night, price_per_kwh: 0.50, start: "00:00", end: "06:00"}
        - {name: day, price_per_kwh: 1.00, start: "06:00", end: "22:00"}
        - {name: night, price_per_kwh: 0.50, start: "22:00", end: "24:00"}
    demand: {price_per_kw: 40, bands: [day]}
  - id: tiers-change  # New York: tiers repriced on 15 November, filled by the month's energy
    currency: USD
    time_zone: America/New_York
    versions:
      - energy:
          kind: tiered
          tiers: [{up_to_kwh: 10, price_per_kwh: 0.10}, {up_to_kwh: null, price_per_kwh: 0.20}]
      - effective_from: 2026-11-15
        energy:
          kind: tiered
          tiers: [{up_to_kwh: 10, price_per_kwh: 0.15}, {up_to_kwh: null, price_per_kwh: 0.30}]
  - id: three  # Berlin: a new price on the 10th and the 20th, a demand charge from the 20th
    currency: EUR
    time_zone: Europe/Berlin
    versions:
      - {standing_charge_per_day: 0.10, tax_rate: 0.19, energy: {kind: flat, price_per_kwh: 0.30}}
      - effective_from: 2026-11-10
        standing_charge_per_day: 0.20
        tax_rate: 0.07
        energy:
          kind: tiered
          tiers: [{up_to_kwh: 5, price_per_kwh: 0.10}, {up_to_kwh: null, price_per_kwh: 0.20}]
      - effective_from: 2026-11-20
        standing_charge_per_day: 0.30
        tax_rate: 0.19
        energy:
          kind: time_of_use
          bands:
            - {name: off-peak, price_per_kwh: 0.15, start: "00:00", end: "07:00"}
            - {name: peak, price_per_kwh: 0.35, start: "07:00", end: "24:00"}
        demand: {price_per_kw: 2.5, bands: [peak]}
"""
DOMAIN = parse_catalog(CATALOG, "versions.yaml")
KWH = 1_000_000  # milliwatt-hours


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def rows(bill: Bill) -> list[tuple[str, str, str, str, str]]:
    return [
        (x.description, str(x.quantity), x.unit, str(x.unit_price), str(x.amount))
        for x in bill.lines
    ]


def bill(tariff_id: str, month: str, slots: dict[str, int], as_of: datetime | None = None) -> Bill:
    tariff = DOMAIN.tariff(tariff_id)
    period = period_of_month(tariff, month)
    return compute_bill(
        tariff, period, {utc(start): e for start, e in slots.items()}, as_of or period.end
    )


@pytest.fixture(scope="module")
def checker_catalog(tmp_path_factory: pytest.TempPathFactory) -> bill_check.Catalog:
    path = tmp_path_factory.mktemp("catalog") / "versions.yaml"
    path.write_text(CATALOG, encoding="utf-8")
    return bill_check.read_catalog(path)


def assert_bill_check_agrees(catalog: bill_check.Catalog, billed: Bill) -> None:
    """The reconciliation's computation from readings gives the same bill, line by line."""
    tariff = catalog.tariffs[billed.tariff_id]
    local = billed.period.start.astimezone(tariff.zone)
    period = bill_check.period_of(tariff.zone, local.year, local.month)
    # A reading stamped at its slot's end, carrying the slot's energy as a float.
    readings = [
        bill_check.LedgerReading(start + SLOT, milliwh / KWH)
        for start, milliwh in slots_of(billed).items()
    ]
    expected = bill_check.expected_bill(tariff, period, readings, billed.as_of)
    assert [
        (x.description, x.quantity, x.unit, x.unit_price, x.amount) for x in expected.lines
    ] == rows(billed)
    assert (expected.subtotal, expected.tax, expected.total) == (
        str(billed.subtotal),
        str(billed.tax),
        str(billed.total),
    )
    assert expected.energy_kwh == str(billed.energy_kwh)


_SLOTS: dict[int, dict[datetime, int]] = {}  # id(bill) -> its slots, for bill_check


def slots_of(billed: Bill) -> dict[datetime, int]:
    return _SLOTS[id(billed)]


def billed(
    tariff_id: str, month: str, slots: dict[str, int], as_of: datetime | None = None
) -> Bill:
    result = bill(tariff_id, month, slots, as_of)
    _SLOTS[id(result)] = {utc(start): e for start, e in slots.items()}
    return result


def test_a_price_change_on_the_15th(checker_catalog: bill_check.Catalog) -> None:
    # November in Berlin is UTC+1. 22:45Z on the 14th is 23:45 local, the old price;
    # 23:00Z on the 14th is 00:00 on the 15th, the new one.
    result = billed(
        "change-15th", "2026-11", {"2026-11-14T22:45": 2 * KWH, "2026-11-14T23:00": 3 * KWH}
    )
    # energy:   2 kWh x 0.30 = 0.60 | 3 kWh x 0.40 = 1.20
    # standing: 14 days (1-14) x 0.40 = 5.60 | 16 days (15-30) x 0.50 = 8.00
    # tax:      (0.60 + 5.60) = 6.20 x 0.19 = 1.178 -> 1.18 | (1.20 + 8.00) = 9.20 x 0.20 = 1.84
    assert rows(result) == [
        ("Energy to 2026-11-14", "2", "kWh", "0.30", "0.60"),
        ("Energy from 2026-11-15", "3", "kWh", "0.40", "1.20"),
        ("Standing charge to 2026-11-14", "14", "day", "0.40", "5.60"),
        ("Standing charge from 2026-11-15", "16", "day", "0.50", "8.00"),
        ("Tax 19% to 2026-11-14", "6.20", "", "0.19", "1.18"),
        ("Tax 20% from 2026-11-15", "9.20", "", "0.20", "1.84"),
    ]
    # subtotal 0.60 + 1.20 + 5.60 + 8.00 = 15.40; tax 1.18 + 1.84 = 3.02; total 18.42
    assert (result.subtotal, result.tax, result.total) == (
        Decimal("15.40"),
        Decimal("3.02"),
        Decimal("18.42"),
    )
    assert result.energy_kwh == 5
    assert_bill_check_agrees(checker_catalog, result)


def test_month_to_date_standing_charge_splits_by_day(checker_catalog: bill_check.Catalog) -> None:
    # As of 10:00Z on the 20th: days 1-14 at 0.40 (5.60) and 15-20 at 0.50 (6 days, 3.00).
    result = billed("change-15th", "2026-11", {}, utc("2026-11-20T10:00"))
    assert rows(result) == [
        ("Energy to 2026-11-14", "0", "kWh", "0.30", "0.00"),
        ("Energy from 2026-11-15", "0", "kWh", "0.40", "0.00"),
        ("Standing charge to 2026-11-14", "14", "day", "0.40", "5.60"),
        ("Standing charge from 2026-11-15", "6", "day", "0.50", "3.00"),
        ("Tax 19% to 2026-11-14", "5.60", "", "0.19", "1.06"),  # 1.064
        ("Tax 20% from 2026-11-15", "3.00", "", "0.20", "0.60"),
    ]
    assert result.total == Decimal("10.26")  # 8.60 + 1.66
    assert_bill_check_agrees(checker_catalog, result)


def test_a_version_from_the_day_the_clocks_go_back(checker_catalog: bill_check.Catalog) -> None:
    # Berlin, 25 October 2026: 03:00 CEST becomes 02:00 CET (01:00Z). The 25th starts at
    # 22:00Z on the 24th (UTC+2) and has 25 hours.
    result = billed(
        "dst-change",
        "2026-10",
        {
            "2026-10-24T21:45": 1 * KWH,  # 23:45 on the 24th: old version, flat 0.30
            "2026-10-24T22:00": 2 * KWH,  # 00:00 on the 25th: new version, night
            "2026-10-25T00:45": 1 * KWH,  # 02:45 CEST, the first 02:45: night
            "2026-10-25T01:45": 2 * KWH,  # 02:45 CET, the second 02:45: night
            "2026-10-25T11:00": 4 * KWH,  # 12:00 CET: day
        },
    )
    # energy:   1 x 0.30 = 0.30 | night 5 x 0.20 = 1.00, day 4 x 0.40 = 1.60
    # standing: 24 days x 0.40 = 9.60 | 7 days (25-31) x 0.50 = 3.50
    # tax 19%:  (0.30 + 9.60) = 9.90 -> 1.881 -> 1.88 | (1.00 + 1.60 + 3.50) = 6.10 -> 1.159 -> 1.16
    assert rows(result) == [
        ("Energy to 2026-10-24", "1", "kWh", "0.30", "0.30"),
        ("Energy (night) from 2026-10-25", "5", "kWh", "0.20", "1.00"),
        ("Energy (day) from 2026-10-25", "4", "kWh", "0.40", "1.60"),
        ("Standing charge to 2026-10-24", "24", "day", "0.40", "9.60"),
        ("Standing charge from 2026-10-25", "7", "day", "0.50", "3.50"),
        ("Tax 19% to 2026-10-24", "9.90", "", "0.19", "1.88"),
        ("Tax 19% from 2026-10-25", "6.10", "", "0.19", "1.16"),
    ]
    assert (result.subtotal, result.tax, result.total) == (
        Decimal("16.00"),
        Decimal("3.04"),
        Decimal("19.04"),
    )
    assert_bill_check_agrees(checker_catalog, result)


def test_a_demand_charge_names_its_peak_slot(checker_catalog: bill_check.Catalog) -> None:
    # Oslo in November is UTC+1. Two slots of 2.345678 kWh tie for the peak; the earlier,
    # 17:15Z on the 3rd = 18:15-18:30 local, is named.
    result = billed(
        "demand",
        "2026-11",
        {
            "2026-11-10T08:00": 2_345_678,
            "2026-11-03T17:15": 2_345_678,
            "2026-11-04T12:00": 1 * KWH,
        },
    )
    # energy 5.691356 kWh x 1.00 = 5.691356 -> 5.69
    # demand 2.345678 kWh x 4 = 9.382712 kW x 30 = 281.48136 -> 281.48
    # standing 30 x 0 = 0; subtotal 287.17; tax 0
    assert rows(result) == [
        ("Energy", "5.691356", "kWh", "1.00", "5.69"),
        (
            "Demand charge (peak 2026-11-03 18:15-18:30 Europe/Oslo)",
            "9.382712",
            "kW",
            "30",
            "281.48",
        ),
        ("Standing charge", "30", "day", "0", "0.00"),
        ("Tax 0%", "287.17", "", "0", "0.00"),
    ]
    assert result.total == Decimal("287.17")
    assert_bill_check_agrees(checker_catalog, result)


def test_a_demand_charge_limited_to_a_band(checker_catalog: bill_check.Catalog) -> None:
    result = billed(
        "day-demand",
        "2026-11",
        {
            "2026-11-05T01:00": 5 * KWH,  # 02:00 local: night, the highest slot, not counted
            "2026-11-05T11:00": 1_500_000,  # 12:00 local: day, 1.5 kWh = 6 kW
            "2026-11-06T12:00": 1_250_000,  # 13:00 local: day, lower
        },
    )
    # night 5 x 0.50 = 2.50; day 2.75 x 1.00 = 2.75; demand 6 kW x 40 = 240.00
    # subtotal 245.25; tax 25% = 61.3125 -> 61.31; total 306.56
    assert rows(result) == [
        ("Energy (night)", "5", "kWh", "0.50", "2.50"),
        ("Energy (day)", "2.75", "kWh", "1.00", "2.75"),
        ("Demand charge (peak 2026-11-05 12:00-12:15 Europe/Oslo)", "6", "kW", "40", "240.00"),
        ("Standing charge", "30", "day", "0", "0.00"),
        ("Tax 25%", "245.25", "", "0.25", "61.31"),
    ]
    assert result.total == Decimal("306.56")
    assert_bill_check_agrees(checker_catalog, result)
    # Only night slots: a demand charge of 0 kW, still listed.
    night_only = billed("day-demand", "2026-11", {"2026-11-05T01:00": 5 * KWH})
    assert rows(night_only)[2] == ("Demand charge", "0", "kW", "40", "0.00")
    assert_bill_check_agrees(checker_catalog, night_only)


def test_no_demand_line_without_a_demand_charge() -> None:
    result = bill("change-15th", "2026-11", {"2026-11-14T22:45": 2 * KWH})
    assert all(line.unit != "kW" for line in result.lines)


def test_tiers_fill_with_the_months_energy_across_versions(
    checker_catalog: bill_check.Catalog,
) -> None:
    # New York in November: 6 kWh on the 5th (old tiers), 8 kWh on the 20th (new tiers).
    # The 6 fill the old first tier to 6; the 8 go from 6 to 14: 4 in the new first tier
    # (to 10), 4 above it.
    result = billed(
        "tiers-change", "2026-11", {"2026-11-05T17:00": 6 * KWH, "2026-11-20T17:00": 8 * KWH}
    )
    assert rows(result)[:4] == [
        ("Energy 0-10 kWh to 2026-11-14", "6", "kWh", "0.10", "0.60"),
        ("Energy above 10 kWh to 2026-11-14", "0", "kWh", "0.20", "0.00"),
        ("Energy 0-10 kWh from 2026-11-15", "4", "kWh", "0.15", "0.60"),
        ("Energy above 10 kWh from 2026-11-15", "4", "kWh", "0.30", "1.20"),
    ]
    assert result.total == Decimal("2.40")
    assert_bill_check_agrees(checker_catalog, result)


def test_three_versions_name_the_middle_span_by_both_days(
    checker_catalog: bill_check.Catalog,
) -> None:
    result = billed("three", "2026-11", {"2026-11-12T10:00": 7 * KWH, "2026-11-25T10:00": KWH})
    descriptions = [line.description for line in result.lines]
    assert descriptions == [
        "Energy to 2026-11-09",
        "Energy 0-5 kWh from 2026-11-10 to 2026-11-19",
        "Energy above 5 kWh from 2026-11-10 to 2026-11-19",
        "Energy (off-peak) from 2026-11-20",
        "Energy (peak) from 2026-11-20",
        "Demand charge (peak 2026-11-25 11:00-11:15 Europe/Berlin)",
        "Standing charge to 2026-11-09",
        "Standing charge from 2026-11-10 to 2026-11-19",
        "Standing charge from 2026-11-20",
        "Tax 19% to 2026-11-09",
        "Tax 7% from 2026-11-10 to 2026-11-19",
        "Tax 19% from 2026-11-20",
    ]
    assert_bill_check_agrees(checker_catalog, result)


def test_a_single_version_in_the_new_form_bills_as_the_old_form() -> None:
    old = DOMAIN.tariff("demand")
    new = old.model_copy(update={"versions": [old.versions[0].model_copy()]})
    slots = {utc("2026-11-03T17:15"): 2 * KWH}
    period = period_of_month(old, "2026-11")
    assert compute_bill(new, period, slots, period.end) == compute_bill(
        old, period, slots, period.end
    )


@settings(max_examples=60, deadline=None)
@given(
    tariff_id=st.sampled_from(["change-15th", "dst-change", "day-demand", "tiers-change", "three"]),
    data=st.data(),
)
def test_bill_check_agrees_on_random_months(
    checker_catalog: bill_check.Catalog, tariff_id: str, data: st.DataObject
) -> None:
    tariff = DOMAIN.tariff(tariff_id)
    month = "2026-10" if tariff_id == "dst-change" else "2026-11"
    period = period_of_month(tariff, month)
    count = (period.end - period.start) // SLOT
    chosen = data.draw(
        st.dictionaries(st.integers(0, count - 1), st.integers(0, 9 * KWH), max_size=40)
    )
    as_of = period.start + data.draw(st.integers(0, count)) * SLOT
    slots = {period.start + n * SLOT: energy for n, energy in chosen.items()}
    result = compute_bill(tariff, period, slots, as_of)
    _SLOTS[id(result)] = slots
    try:
        assert_bill_check_agrees(checker_catalog, result)
    finally:
        del _SLOTS[id(result)]


def test_period_days_are_local(checker_catalog: bill_check.Catalog) -> None:
    # The reconciliation's period for October in Berlin has 31 local days, 745 hours.
    period = bill_check.period_of(checker_catalog.tariffs["dst-change"].zone, 2026, 10)
    assert (period.days, period.end - period.start) == (31, timedelta(hours=745))
