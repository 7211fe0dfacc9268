"""Bills: a tariff applied to a device's 15-minute energy slots over a local calendar month.

Pure domain code. Quantities are exact ``Decimal`` (milliwatt-hours scaled to kWh), so the
same slots give the same bill in any order. Each line's amount is rounded once, half up,
to the currency's minor unit; the subtotal adds the rounded lines and tax is rounded once
more on the subtotal, the way an invoice is read and checked by hand.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Literal
from zoneinfo import ZoneInfo

from billing_service.domain.ledger import SLOT, slot_start
from billing_service.domain.tariff import (
    FlatEnergy,
    Tariff,
    TieredEnergy,
    TimeOfUseEnergy,
    minor_units,
)

Unit = Literal["kWh", "day", ""]


@dataclass(frozen=True)
class Period:
    """A billing period [start, end) in UTC; ``label`` is its local month, YYYY-MM."""

    start: datetime
    end: datetime
    label: str


@dataclass(frozen=True)
class LineItem:
    description: str
    quantity: Decimal
    unit: Unit
    unit_price: Decimal
    amount: Decimal  # rounded to the currency's minor unit


@dataclass(frozen=True)
class Bill:
    """One device's bill. ``lines`` ends with the tax line; ``subtotal`` is before tax."""

    tariff_id: str
    currency: str
    period: Period
    as_of: datetime
    energy_kwh: Decimal
    lines: list[LineItem]
    subtotal: Decimal
    tax: Decimal
    total: Decimal


@dataclass(frozen=True)
class AccountBill:
    """The bills of an account's devices for one period, in one currency."""

    account_id: str
    currency: str
    period: Period
    as_of: datetime
    bills: dict[str, Bill]  # by device id
    total: Decimal


def billing_period(tariff: Tariff, instant: datetime) -> Period:
    """The calendar month, in the tariff's time zone, that contains ``instant``."""
    local = _aware(instant, "instant").astimezone(tariff.zone)
    return _month(tariff.zone, local.year, local.month)


def period_of_month(tariff: Tariff, month: str) -> Period:
    """The period of a local month written YYYY-MM."""
    match = re.fullmatch(r"(\d{4})-(\d{2})", month)
    if not match or not 1 <= int(match[2]) <= 12:
        raise ValueError(f"{month!r} is not a month; write YYYY-MM, like '2026-11'")
    return _month(tariff.zone, int(match[1]), int(match[2]))


def _month(zone: ZoneInfo, year: int, month: int) -> Period:
    # Local midnight of the 1st. Where DST skips midnight, zoneinfo's fold=0 reading maps
    # the missing wall time to the instant of the jump, which is when the day starts.
    following = (year + 1, 1) if month == 12 else (year, month + 1)
    start = datetime(year, month, 1, tzinfo=zone).astimezone(UTC)
    end = datetime(*following, 1, tzinfo=zone).astimezone(UTC)
    return Period(start, end, f"{year:04d}-{month:02d}")


def round_money(amount: Decimal, currency: str) -> Decimal:
    """Round half up to the currency's minor unit (cents; yen; fils)."""
    return amount.quantize(Decimal(1).scaleb(-minor_units(currency)), rounding=ROUND_HALF_UP)


def kwh(milliwh: int) -> Decimal:
    """Exact kWh of an energy in milliwatt-hours, written plainly (1.5, 600, 0)."""
    return _tidy(Decimal(milliwh).scaleb(-6))


def compute_bill(
    tariff: Tariff, period: Period, slots: Mapping[datetime, int], as_of: datetime
) -> Bill:
    """Bill the slots (UTC slot start -> milliwatt-hours) that lie in ``period``.

    Standing charge runs up to and including the local day of ``as_of``.
    """
    _aware(as_of, "as_of")
    used: dict[datetime, int] = {}
    for start, milliwh in slots.items():
        if _aware(start, "slot start") != slot_start(start + SLOT):
            raise ValueError(f"slot start {start.isoformat()} is not on the 15-minute grid")
        if not isinstance(milliwh, int) or milliwh < 0:
            raise ValueError(
                f"slot {start.isoformat()} has {milliwh!r}; energy is whole milliwatt-hours >= 0"
            )
        if period.start <= start < period.end:
            used[start] = milliwh
    currency = tariff.currency
    lines = _energy_lines(tariff, used)
    days = _standing_days(period, tariff.zone, as_of)
    lines.append(
        _line("Standing charge", Decimal(days), "day", tariff.standing_charge_per_day, currency)
    )
    subtotal = sum((line.amount for line in lines), round_money(Decimal(0), currency))
    tax = round_money(tariff.tax_rate * subtotal, currency)
    percent = _tidy(tariff.tax_rate * 100)
    lines.append(LineItem(f"Tax {percent}%", subtotal, "", tariff.tax_rate, tax))
    return Bill(
        tariff_id=tariff.id,
        currency=currency,
        period=period,
        as_of=as_of,
        energy_kwh=kwh(sum(used.values())),
        lines=lines,
        subtotal=subtotal,
        tax=tax,
        total=subtotal + tax,
    )


def _energy_lines(tariff: Tariff, used: dict[datetime, int]) -> list[LineItem]:
    energy, currency = tariff.energy, tariff.currency
    if isinstance(energy, FlatEnergy):
        return [_line("Energy", kwh(sum(used.values())), "kWh", energy.price_per_kwh, currency)]
    if isinstance(energy, TimeOfUseEnergy):
        # A slot is wholly inside one band (bands and zone offsets are on the 15-minute
        # grid), so the band of its local start is the band of all its energy.
        by_band = {band.name: 0 for band in energy.bands}  # tariff order, a line per name
        prices = {band.name: band.price_per_kwh for band in energy.bands}
        for start, milliwh in used.items():
            by_band[energy.band_at(start.astimezone(tariff.zone)).name] += milliwh
        return [
            _line(f"Energy ({name})", kwh(milliwh), "kWh", prices[name], currency)
            for name, milliwh in by_band.items()
        ]
    assert isinstance(energy, TieredEnergy)
    return _tier_lines(energy, kwh(sum(used.values())), currency)


def _tier_lines(energy: TieredEnergy, total: Decimal, currency: str) -> list[LineItem]:
    """Split the period's total energy across the tiers: the first tier fills first."""
    lines: list[LineItem] = []
    lower = Decimal(0)
    for tier in energy.tiers:
        upper = tier.up_to_kwh
        part = _tidy(max(Decimal(0), (total if upper is None else min(total, upper)) - lower))
        bounds = f"above {_tidy(lower)}" if upper is None else f"{_tidy(lower)}-{_tidy(upper)}"
        lines.append(_line(f"Energy {bounds} kWh", part, "kWh", tier.price_per_kwh, currency))
        lower = upper if upper is not None else lower
    return lines


def _standing_days(period: Period, zone: ZoneInfo, as_of: datetime) -> int:
    """Local calendar days of the period up to and including the local day of ``as_of``."""
    if as_of < period.start:
        return 0
    first = period.start.astimezone(zone).date()
    if as_of >= period.end:
        after_last: date = period.end.astimezone(zone).date()
    else:
        after_last = as_of.astimezone(zone).date() + timedelta(days=1)
    return (after_last - first).days


def combine_bills(account_id: str, bills: Mapping[str, Bill]) -> AccountBill:
    """Add up an account's device bills; they must share currency and period.

    ``as_of`` is the latest of the bills' (they are usually computed together).
    """
    if not bills:
        raise ValueError(f"account {account_id!r} has no device bills to combine")
    first_id, first = next(iter(bills.items()))
    for device_id, bill in bills.items():
        if bill.currency != first.currency:
            raise ValueError(
                f"account {account_id!r}: device {device_id!r} is billed in {bill.currency}, "
                f"device {first_id!r} in {first.currency}; one bill cannot mix currencies"
            )
        if bill.period != first.period:
            raise ValueError(
                f"account {account_id!r}: device {device_id!r} is billed for "
                f"{_show(bill.period)}, device {first_id!r} for {_show(first.period)}; "
                "give the account's tariffs one time zone"
            )
    total = sum((bill.total for bill in bills.values()), round_money(Decimal(0), first.currency))
    return AccountBill(
        account_id=account_id,
        currency=first.currency,
        period=first.period,
        as_of=max(bill.as_of for bill in bills.values()),
        bills=dict(bills),
        total=total,
    )


def _line(
    description: str, quantity: Decimal, unit: Unit, price: Decimal, currency: str
) -> LineItem:
    return LineItem(description, quantity, unit, price, round_money(quantity * price, currency))


def _aware(instant: datetime, what: str) -> datetime:
    if instant.tzinfo is None or instant.utcoffset() is None:
        raise ValueError(f"{what} {instant.isoformat()} has no time zone; give it in UTC")
    return instant


def _tidy(number: Decimal) -> Decimal:
    """The same value without trailing zeros or exponent: 601.500000 -> 601.5, 6E+2 -> 600."""
    normal = number.normalize()
    return normal.quantize(1) if int(normal.as_tuple().exponent) > 0 else normal


def _show(period: Period) -> str:
    return f"{period.label} ({period.start.isoformat()} to {period.end.isoformat()})"
