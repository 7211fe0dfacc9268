"""Bills computed by hand (the arithmetic is in the comments) and by property.

Readings are aggregated into slots the way the ledger does it: deduplicated by reading id,
energy in the slot of ``slot_start(timestamp)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from billing_service.adapters.catalog_file import load_catalog
from billing_service.domain.bill import (
    Bill,
    Period,
    billing_period,
    combine_bills,
    compute_bill,
    period_of_month,
)
from billing_service.domain.tariff import Tariff, minor_units
from common.slots import slot_start

CATALOG = load_catalog(Path(__file__).resolve().parents[2] / "deployments" / "tariffs.yaml")
# The sample's standard tariff before its price change of 2026-11-16 (one version).
STANDARD = Tariff.model_validate(
    {
        "id": "standard",
        "currency": "EUR",
        "time_zone": "Europe/Berlin",
        "standing_charge_per_day": "0.45",
        "tax_rate": "0.19",
        "energy": {"kind": "flat", "price_per_kwh": "0.32"},
    }
)  # EUR Berlin, 0.32/kWh, 0.45/day, tax 19%
ECONOMY7 = CATALOG.tariff("peak-offpeak")  # GBP London, off-peak 00:30-07:30 0.15, peak 0.30
TIERED = CATALOG.tariff("tiered-residential")  # USD New York, 500 @0.14, 500 @0.18, @0.24
NIGHT_DAY = Tariff.model_validate(
    {
        "id": "night-day",
        "currency": "EUR",
        "time_zone": "Europe/Berlin",
        "energy": {
            "kind": "time_of_use",
            "bands": [
                {"name": "night", "price_per_kwh": "0.20", "start": "00:00", "end": "06:00"},
                {"name": "day", "price_per_kwh": "0.40", "start": "06:00", "end": "24:00"},
            ],
        },
    }
)
YEN = Tariff.model_validate(
    {
        "id": "yen",
        "currency": "JPY",
        "time_zone": "Asia/Tokyo",
        "standing_charge_per_day": "28.6",
        "tax_rate": "0.10",
        "energy": {"kind": "flat", "price_per_kwh": "31"},
    }
)
KWH = 1_000_000  # milliwatt-hours


@dataclass(frozen=True)
class R:
    """A reading as the ledger sees it."""

    reading_id: str
    timestamp: datetime
    milliwh: int


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def aggregate(readings: Iterable[R]) -> dict[datetime, int]:
    """The reference ledger: each reading id counts once, in the slot its timestamp ends."""
    unique = {reading.reading_id: reading for reading in readings}
    slots: dict[datetime, int] = {}
    for reading in unique.values():
        start = slot_start(reading.timestamp)
        slots[start] = slots.get(start, 0) + reading.milliwh
    return slots


def bill_of(tariff: Tariff, month: str, readings: Iterable[R], as_of: datetime) -> Bill:
    return compute_bill(tariff, period_of_month(tariff, month), aggregate(readings), as_of)


def amounts(bill: Bill) -> dict[str, Decimal]:
    return {line.description: line.amount for line in bill.lines}


def test_economy7_band_boundary_at_0730_local() -> None:
    # 2026-07-15 is BST (UTC+1): 07:30:00 local = 06:30:00Z, 07:30:01 local = 06:30:01Z.
    # slot_start(06:30:00Z) = 06:15Z = 07:15 local -> off-peak (00:30-07:30): 2 kWh x 0.15 = 0.30
    # slot_start(06:30:01Z) = 06:30Z = 07:30 local -> peak:                  3 kWh x 0.30 = 0.90
    # Standing: July 1..15 = 15 days x 0.53 = 7.95. Subtotal 0.90 + 0.30 + 7.95 = 9.15.
    # Tax 5% of 9.15 = 0.4575 -> 0.46. Total 9.61.
    readings = [
        R("a", utc(2026, 7, 15, 6, 30, 0), 2 * KWH),
        R("b", utc(2026, 7, 15, 6, 30, 1), 3 * KWH),
    ]
    bill = bill_of(ECONOMY7, "2026-07", readings, as_of=utc(2026, 7, 15, 12))
    assert [(line.description, line.quantity, line.amount) for line in bill.lines] == [
        ("Energy (peak)", 3, Decimal("0.90")),
        ("Energy (off-peak)", 2, Decimal("0.30")),
        ("Standing charge", 15, Decimal("7.95")),
        ("Tax 5%", Decimal("9.15"), Decimal("0.46")),
    ]
    assert (bill.subtotal, bill.tax, bill.total) == (
        Decimal("9.15"),
        Decimal("0.46"),
        Decimal("9.61"),
    )
    assert bill.energy_kwh == 5 and bill.currency == "GBP"


def one_kwh_per_slot(start: datetime, end: datetime) -> dict[datetime, int]:
    slots, at = {}, start
    while at < end:
        slots[at], at = KWH, at + timedelta(minutes=15)
    return slots


@pytest.mark.parametrize(
    ("local_day", "night_kwh", "day_kwh"),
    [
        # 2026-03-29: local midnight = 03-28T23:00Z (CET), next = 03-29T22:00Z (CEST): 23 h,
        # 92 slots. Night 00:00-06:00 local = 23:00Z-04:00Z = 5 h (02:00-03:00 never happens)
        # = 20 kWh; day 06:00-24:00 = 04:00Z-22:00Z = 18 h = 72 kWh.
        ("2026-03-29", 20, 72),
        # 2026-10-25: local midnight = 10-24T22:00Z (CEST), next = 10-25T23:00Z (CET): 25 h,
        # 100 slots. Night = 22:00Z-05:00Z = 7 h (02:00-03:00 happens twice) = 28 kWh; day 72.
        ("2026-10-25", 28, 72),
    ],
)
def test_dst_change_day_bands_follow_local_time(
    local_day: str, night_kwh: int, day_kwh: int
) -> None:
    zone = ZoneInfo("Europe/Berlin")
    midnight = datetime.fromisoformat(local_day).replace(tzinfo=zone)
    slots = one_kwh_per_slot(
        midnight.astimezone(UTC), (midnight + timedelta(days=1)).astimezone(UTC)
    )
    assert len(slots) == night_kwh + day_kwh
    period = period_of_month(NIGHT_DAY, local_day[:7])
    bill = compute_bill(NIGHT_DAY, period, slots, as_of=period.end)
    # night x 0.20 and day x 0.40: 20 x 0.20 = 4.00 / 28 x 0.20 = 5.60; 72 x 0.40 = 28.80.
    assert amounts(bill)["Energy (night)"] == Decimal("0.20") * night_kwh
    assert amounts(bill)["Energy (day)"] == Decimal("28.80")
    assert bill.energy_kwh == night_kwh + day_kwh


def test_dst_months_start_at_local_midnight() -> None:
    # March 2026 in Berlin starts at 00:00 CET (= 02-28T23:00Z) and ends at 00:00 CEST on
    # April 1st (= 03-31T22:00Z): 31 days, one hour short.
    march = period_of_month(STANDARD, "2026-03")
    assert (march.start, march.end, march.label) == (
        utc(2026, 2, 28, 23),
        utc(2026, 3, 31, 22),
        "2026-03",
    )
    # New York, November 2026: 00:00 EDT (04:00Z) to 00:00 EST on December 1st (05:00Z).
    assert period_of_month(TIERED, "2026-11") == Period(
        utc(2026, 11, 1, 4), utc(2026, 12, 1, 5), "2026-11"
    )


def test_month_boundary_in_berlin() -> None:
    # 2026-10-31T23:30:00Z: slot 23:15Z = 2026-11-01 00:15 CET -> the November period, which
    # starts at 2026-10-31T23:00Z. A reading stamped exactly 23:00:00Z is energy used before
    # local midnight: slot 22:45Z = 10-31 23:45 CET -> October.
    november_reading = R("nov", utc(2026, 10, 31, 23, 30), 5 * KWH)
    october_reading = R("oct", utc(2026, 10, 31, 23, 0), 2 * KWH)
    november = billing_period(STANDARD, slot_start(november_reading.timestamp))
    assert (november.label, november.start) == ("2026-11", utc(2026, 10, 31, 23))
    assert billing_period(STANDARD, slot_start(october_reading.timestamp)).label == "2026-10"
    readings = [november_reading, october_reading]
    # November: 5 kWh x 0.32 = 1.60; October: 2 kWh x 0.32 = 0.64 (standing charge: none yet).
    before = utc(2026, 10, 1)
    assert amounts(bill_of(STANDARD, "2026-11", readings, before))["Energy"] == Decimal("1.60")
    assert amounts(bill_of(STANDARD, "2026-10", readings, before))["Energy"] == Decimal("0.64")


def test_a_tier_boundary_inside_one_reading() -> None:
    # 499.5 kWh, then a 2 kWh reading that passes 500: total 501.5 kWh.
    # 0-500 kWh: 500 x 0.14 = 70.00; 500-1000: 1.5 x 0.18 = 0.27; above 1000: 0.
    # Standing: November 2026 has 30 days x 0.33 = 9.90. Subtotal 80.17, tax 0%, total 80.17.
    readings = [
        R("a", utc(2026, 11, 2, 15), 499_500_000),
        R("b", utc(2026, 11, 2, 15, 15), 2 * KWH),
    ]
    bill = bill_of(TIERED, "2026-11", readings, as_of=utc(2026, 12, 3))
    assert amounts(bill) == {
        "Energy 0-500 kWh": Decimal("70.00"),
        "Energy 500-1000 kWh": Decimal("0.27"),
        "Energy above 1000 kWh": Decimal("0.00"),
        "Standing charge": Decimal("9.90"),
        "Tax 0%": Decimal("0.00"),
    }
    assert bill.total == Decimal("80.17")
    # One more reading of 600 kWh crosses two boundaries: total 1101.5 kWh.
    # 500 x 0.14 = 70.00; 500 x 0.18 = 90.00; 101.5 x 0.24 = 24.36.
    bill = bill_of(
        TIERED, "2026-11", [*readings, R("c", utc(2026, 11, 3), 600 * KWH)], utc(2026, 12, 3)
    )
    assert [line.amount for line in bill.lines[:3]] == [
        Decimal("70.00"),
        Decimal("90.00"),
        Decimal("24.36"),
    ]


@pytest.mark.parametrize(
    ("as_of", "days"),
    [
        (utc(2026, 10, 31, 22, 59), 0),  # 23:59 on October 31st in Berlin: before the period
        (utc(2026, 10, 31, 23, 0), 1),  # 00:00 on November 1st: the first day has begun
        (utc(2026, 11, 10, 22, 59, 59), 10),  # 23:59:59 on November 10th
        (utc(2026, 11, 10, 23, 0), 11),  # 00:00 on November 11th
        (utc(2026, 11, 30, 23, 0), 30),  # the period's end: the whole month
        (utc(2027, 1, 15), 30),  # long after: still the whole month
    ],
)
def test_standing_charge_month_to_date(as_of: datetime, days: int) -> None:
    # days x 0.45: 10 -> 4.50, 11 -> 4.95, 30 (a full November) -> 13.50.
    bill = bill_of(STANDARD, "2026-11", [], as_of)
    (standing,) = [line for line in bill.lines if line.unit == "day"]
    assert (standing.quantity, standing.amount) == (days, Decimal("0.45") * days)


def test_tax_is_rounded_half_up_on_the_subtotal() -> None:
    # 100 kWh x 0.32 = 32.00; standing 30 x 0.45 = 13.50; subtotal 45.50.
    # Tax 19% of 45.50 = 8.645 -> 8.65 (half up); total 54.15.
    bill = bill_of(STANDARD, "2026-11", [R("a", utc(2026, 11, 5, 12), 100 * KWH)], utc(2026, 12, 1))
    assert bill.lines[-1].description == "Tax 19%"
    assert (bill.subtotal, bill.tax, bill.total) == (
        Decimal("45.50"),
        Decimal("8.65"),
        Decimal("54.15"),
    )


def test_yen_has_no_minor_unit() -> None:
    # 10.5 kWh x 31 = 325.5 -> 326; standing 30 days x 28.6 = 858.0 -> 858; subtotal 1184.
    # Tax 10% = 118.4 -> 118; total 1302.
    bill = bill_of(YEN, "2026-11", [R("a", utc(2026, 11, 5), 10_500_000)], utc(2026, 12, 1))
    assert [str(line.amount) for line in bill.lines] == ["326", "858", "118"]
    assert (str(bill.subtotal), str(bill.tax), str(bill.total)) == ("1184", "118", "1302")


def test_combine_bills() -> None:
    period = period_of_month(STANDARD, "2026-11")
    first = bill_of(STANDARD, "2026-11", [R("a", utc(2026, 11, 5), KWH)], period.end)
    second = bill_of(STANDARD, "2026-11", [], period.end)
    combined = combine_bills("acct-1001", {"meter-001": first, "meter-002": second})
    assert combined.total == first.total + second.total and combined.currency == "EUR"
    assert list(combined.bills) == ["meter-001", "meter-002"] and combined.period == period
    pounds = bill_of(ECONOMY7, "2026-11", [], period.end)
    with pytest.raises(ValueError, match="cannot mix currencies"):
        combine_bills("acct-1001", {"meter-001": first, "meter-003": pounds})
    with pytest.raises(ValueError, match="no device bills"):
        combine_bills("acct-1001", {})


def test_bad_input_is_rejected() -> None:
    period = period_of_month(STANDARD, "2026-11")
    with pytest.raises(ValueError, match="15-minute grid"):
        compute_bill(STANDARD, period, {utc(2026, 11, 5, 0, 5): 1}, period.end)
    with pytest.raises(ValueError, match="whole milliwatt-hours"):
        compute_bill(STANDARD, period, {utc(2026, 11, 5): -1}, period.end)
    with pytest.raises(ValueError, match="no time zone"):
        compute_bill(STANDARD, period, {}, datetime(2026, 11, 5))
    with pytest.raises(ValueError, match="YYYY-MM"):
        period_of_month(STANDARD, "2026-13")


# --- properties ------------------------------------------------------------------------

TARIFFS = [STANDARD, ECONOMY7, TIERED, NIGHT_DAY, YEN]
MONTHS = ["2026-01", "2026-03", "2026-10", "2026-11"]  # two of them change clocks


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Tariff, Period, list[R]]:
    """A tariff, a month, and distinct readings stamped inside it (up to 6000 kWh in all)."""
    tariff = draw(st.sampled_from(TARIFFS))
    period = period_of_month(tariff, draw(st.sampled_from(MONTHS)))
    span = (period.end - period.start) // timedelta(microseconds=1)
    offsets = st.integers(1, span)  # (start, end]: the energy of such a stamp is in the period
    usage = st.integers(0, 200 * KWH)
    pairs = draw(st.lists(st.tuples(offsets, usage), max_size=30))
    readings = [
        R(f"r{n}", period.start + timedelta(microseconds=offset), milliwh)
        for n, (offset, milliwh) in enumerate(pairs)
    ]
    return tariff, period, readings


@settings(max_examples=200, deadline=None)
@given(scenario=scenarios(), data=st.data())
def test_the_bill_ignores_order_and_duplicates(scenario, data) -> None:
    tariff, period, readings = scenario
    copies = data.draw(st.lists(st.sampled_from(readings), max_size=10)) if readings else []
    delivered = data.draw(st.permutations(readings + copies))
    as_of = period.end
    assert compute_bill(tariff, period, aggregate(delivered), as_of) == compute_bill(
        tariff, period, aggregate(readings), as_of
    )


def reading_band(tariff: Tariff, reading: R) -> str:
    """The band of a reading, found directly from the band definitions."""
    local = slot_start(reading.timestamp).astimezone(ZoneInfo(tariff.time_zone))
    day = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")[local.weekday()]
    minute = local.strftime("%H:%M")
    return next(
        band.name
        for band in tariff.energy.bands
        if day in band.days and band.start <= minute and (minute < band.end or band.end == "24:00")
    )


def expected_energy_amounts(tariff: Tariff, readings: list[R]) -> list[Decimal]:
    """Each energy line from per-reading kWh x price, summed, then rounded once."""
    energy = tariff.energy
    kwh = {r.reading_id: Decimal(r.milliwh) / Decimal(1_000_000) for r in readings}
    if energy.kind == "flat":
        sums = [sum((kwh[r.reading_id] * energy.price_per_kwh for r in readings), Decimal(0))]
    elif energy.kind == "time_of_use":
        price = {band.name: band.price_per_kwh for band in energy.bands}
        per_band = dict.fromkeys(price, Decimal(0))
        for r in readings:
            band = reading_band(tariff, r)
            per_band[band] += kwh[r.reading_id] * price[band]
        sums = list(per_band.values())
    else:
        # Walk the readings in time order; each one's kWh fills the tiers from where the
        # previous one stopped, so a reading may be split across a boundary.
        sums, used = [Decimal(0)] * len(energy.tiers), Decimal(0)
        for r in sorted(readings, key=lambda r: r.timestamp):
            low = Decimal(0)
            for n, tier in enumerate(energy.tiers):
                high = tier.up_to_kwh if tier.up_to_kwh is not None else Decimal("Infinity")
                part = max(Decimal(0), min(used + kwh[r.reading_id], high) - max(used, low))
                sums[n] += part * tier.price_per_kwh
                low = high
            used += kwh[r.reading_id]
    unit = Decimal(10) ** -minor_units(tariff.currency)
    return [amount.quantize(unit, rounding=ROUND_HALF_UP) for amount in sums]


@settings(max_examples=200, deadline=None)
@given(scenario=scenarios())
def test_energy_lines_equal_the_rounded_sum_over_readings(scenario) -> None:
    tariff, period, readings = scenario
    bill = compute_bill(tariff, period, aggregate(readings), period.end)
    expected = expected_energy_amounts(tariff, readings)
    energy_lines = [line for line in bill.lines if line.unit == "kWh"]
    assert [line.amount for line in energy_lines] == expected
    assert sum(line.quantity for line in energy_lines) == bill.energy_kwh
    assert bill.subtotal == sum(line.amount for line in bill.lines[:-1])
    assert bill.total == bill.subtotal + bill.tax == sum(line.amount for line in bill.lines)
