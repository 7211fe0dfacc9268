"""Bills: a tariff applied to a device's 15-minute energy slots over a local calendar month.

Pure domain code. Quantities are exact ``Decimal`` (milliwatt-hours scaled to kWh), so the
same slots give the same bill in any order. Each line's amount is rounded once, half up,
to the currency's minor unit; the subtotal adds the rounded lines and tax is rounded once
more on the subtotal, the way an invoice is read and checked by hand.

A tariff whose prices change inside the period splits it by local date into spans, one per
version in force (``versions_in``): each slot is priced by the version of its local day,
the standing charge and tax by span. A bill may carry ``Adjustment``s: corrections of
closed periods whose energy arrived after they were issued (``adjustment_for``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Literal
from zoneinfo import ZoneInfo

from billing_service.domain.tariff import (
    FlatEnergy,
    Tariff,
    Tier,
    TieredEnergy,
    TimeOfUseEnergy,
    VersionSpan,
    minor_units,
)
from common.slots import SLOT, slot_start

Unit = Literal["kWh", "day", "kW", ""]
SLOTS_PER_HOUR = 4  # a slot's kWh x 4 is its average power in kW


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
class Adjustment:
    """A correction, carried on a later bill, of a closed period's issued bill.

    ``energy_kwh`` and ``amount`` are deltas (either sign) of that period's energy and of its
    charges (subtotal + tax); ``amount`` is already exact in minor units, not rounded again.
    """

    period_label: str
    issued_bill_id: str
    energy_kwh: Decimal
    amount: Decimal


@dataclass(frozen=True)
class Bill:
    """One device's bill. ``lines`` ends with the tax line(s); ``subtotal`` is before tax.

    ``total`` = subtotal + tax + the adjustments of closed periods it carries.
    """

    tariff_id: str
    currency: str
    period: Period
    as_of: datetime
    energy_kwh: Decimal
    lines: list[LineItem]
    subtotal: Decimal
    tax: Decimal
    total: Decimal
    adjustments: tuple[Adjustment, ...] = ()

    @property
    def charges(self) -> Decimal:
        """This period's own charges: subtotal + tax, without the adjustments carried."""
        return self.subtotal + self.tax


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


def versions_in(tariff: Tariff, period: Period) -> list[VersionSpan]:
    """The tariff's versions in force over the period's local days, in order."""
    first = period.start.astimezone(tariff.zone).date()
    end = period.end.astimezone(tariff.zone).date()
    return tariff.versions_between(first, end)


def compute_bill(
    tariff: Tariff, period: Period, slots: Mapping[datetime, int], as_of: datetime
) -> Bill:
    """Bill the slots (UTC slot start -> milliwatt-hours) that lie in ``period``.

    Standing charge runs up to and including the local day of ``as_of``. Each version in
    force in the period (a span of local days) prices the slots whose local start is on its
    days and its days' standing charge; tax is worked out per span on that span's subtotal
    at its rate. With more than one span, each line names its span ("... to 2026-11-14",
    "... from 2026-11-15"). Tiers apply to the period's cumulative energy in slot time
    order, each slot priced by its own version's tier reached.

    Demand charge: one line per bill, for the period's highest slot (kWh x 4 = kW) among
    the slots whose version has a demand charge and, when that charge lists bands, whose
    band is listed; priced at that slot's version's ``price_per_kw``; of equal peaks the
    earliest. No line when no version in the period has a demand charge; a 0 kW line when
    one has but no slot qualifies. It counts in the subtotal and tax of the peak's span.
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
    currency, zone = tariff.currency, tariff.zone
    spans = versions_in(tariff, period)
    by_span: list[dict[datetime, int]] = [{} for _ in spans]
    for start, milliwh in used.items():
        by_span[_span_of(spans, start.astimezone(zone).date())][start] = milliwh
    per_span: list[list[LineItem]] = [[] for _ in spans]  # the untaxed lines of each span
    for index in range(len(spans)):
        per_span[index] += _energy_lines(tariff, spans, index, by_span[index])
    _tier_lines(tariff, spans, used, per_span)
    demand = _demand_line(tariff, spans, by_span)
    if demand is not None:
        per_span[demand[0]].append(demand[1])
    days = _standing_day_range(period, zone, as_of)
    standing = []
    for index, span in enumerate(spans):
        version = span.version
        quantity = Decimal(_days_within(span, days))
        description = f"Standing charge{_suffix(spans, index)}"
        line = _line(description, quantity, "day", version.standing_charge_per_day, currency)
        standing.append(line)
        per_span[index].append(line)
    zero = round_money(Decimal(0), currency)
    taxes = []
    for index, span in enumerate(spans):
        base = sum((line.amount for line in per_span[index]), zero)
        rate = span.version.tax_rate
        description = f"Tax {_tidy(rate * 100)}%{_suffix(spans, index)}"
        taxes.append(LineItem(description, base, "", rate, round_money(rate * base, currency)))
    energy_lines = [line for lines in per_span for line in lines if line.unit == "kWh"]
    lines = energy_lines + ([demand[1]] if demand else []) + standing
    subtotal = sum((line.amount for line in lines), zero)
    tax = sum((line.amount for line in taxes), zero)
    return Bill(
        tariff_id=tariff.id,
        currency=currency,
        period=period,
        as_of=as_of,
        energy_kwh=kwh(sum(used.values())),
        lines=lines + taxes,
        subtotal=subtotal,
        tax=tax,
        total=subtotal + tax,
    )


def _span_of(spans: list[VersionSpan], day: date) -> int:
    for index in range(len(spans) - 1, -1, -1):
        if spans[index].first_day <= day:
            return index
    return 0


def _suffix(spans: list[VersionSpan], index: int) -> str:
    """How a line names its span when the period has several: by its first and last day."""
    if len(spans) == 1:
        return ""
    span = spans[index]
    if index == 0:
        return f" to {span.last_day}"
    if index == len(spans) - 1:
        return f" from {span.first_day}"
    return f" from {span.first_day} to {span.last_day}"


def _energy_lines(
    tariff: Tariff, spans: list[VersionSpan], index: int, used: dict[datetime, int]
) -> list[LineItem]:
    """A span's flat or time-of-use energy lines (tiered ones come from ``_tier_lines``)."""
    energy, currency, suffix = spans[index].version.energy, tariff.currency, _suffix(spans, index)
    if isinstance(energy, FlatEnergy):
        quantity = kwh(sum(used.values()))
        return [_line(f"Energy{suffix}", quantity, "kWh", energy.price_per_kwh, currency)]
    if isinstance(energy, TimeOfUseEnergy):
        # A slot is wholly inside one band (bands and zone offsets are on the 15-minute
        # grid), so the band of its local start is the band of all its energy.
        by_band = {band.name: 0 for band in energy.bands}  # tariff order, a line per name
        prices = {band.name: band.price_per_kwh for band in energy.bands}
        for start, milliwh in used.items():
            by_band[energy.band_at(start.astimezone(tariff.zone)).name] += milliwh
        return [
            _line(f"Energy ({name}){suffix}", kwh(milliwh), "kWh", prices[name], currency)
            for name, milliwh in by_band.items()
        ]
    return []


def _tier_lines(
    tariff: Tariff,
    spans: list[VersionSpan],
    used: dict[datetime, int],
    per_span: list[list[LineItem]],
) -> None:
    """Add each tiered span's tier lines: the period's energy fills the tiers in slot time
    order, each slot by its own version's tiers from where the slots before it stopped."""
    tiered = [index for index, span in enumerate(spans) if span.version.energy.kind == "tiered"]
    if not tiered:
        return
    parts = {index: [Decimal(0)] * len(_tiers(spans[index])) for index in tiered}
    cumulative = Decimal(0)
    for start in sorted(used):
        energy = kwh(used[start])
        index = _span_of(spans, start.astimezone(tariff.zone).date())
        if index in parts:
            lower = Decimal(0)
            for number, tier in enumerate(_tiers(spans[index])):
                upper = tier.up_to_kwh
                top = cumulative + energy if upper is None else min(cumulative + energy, upper)
                parts[index][number] += max(Decimal(0), top - max(cumulative, lower))
                lower = upper if upper is not None else lower
        cumulative += energy
    for index in tiered:
        lower = Decimal(0)
        for number, tier in enumerate(_tiers(spans[index])):
            upper = tier.up_to_kwh
            bounds = f"above {_tidy(lower)}" if upper is None else f"{_tidy(lower)}-{_tidy(upper)}"
            description = f"Energy {bounds} kWh{_suffix(spans, index)}"
            quantity = _tidy(parts[index][number])
            per_span[index].append(
                _line(description, quantity, "kWh", tier.price_per_kwh, tariff.currency)
            )
            lower = upper if upper is not None else lower


def _tiers(span: VersionSpan) -> list[Tier]:
    energy = span.version.energy
    assert isinstance(energy, TieredEnergy)
    return energy.tiers


def _demand_line(
    tariff: Tariff, spans: list[VersionSpan], by_span: list[dict[datetime, int]]
) -> tuple[int, LineItem] | None:
    """The demand charge line and the index of the span it is taxed in, or None."""
    charged = [index for index, span in enumerate(spans) if span.version.demand is not None]
    if not charged:
        return None
    peak: tuple[int, datetime, int] | None = None  # (milliwh, slot start, span index)
    for index in charged:
        version = spans[index].version
        assert version.demand is not None
        bands = version.demand.bands
        energy = version.energy
        for start, milliwh in by_span[index].items():
            if bands is not None:
                assert isinstance(energy, TimeOfUseEnergy)
                if energy.band_at(start.astimezone(tariff.zone)).name not in bands:
                    continue
            if peak is None or milliwh > peak[0] or (milliwh == peak[0] and start < peak[1]):
                peak = (milliwh, start, index)
    if peak is None:
        first = spans[charged[0]].version.demand
        assert first is not None
        line = _line("Demand charge", Decimal(0), "kW", first.price_per_kw, tariff.currency)
        return charged[0], line
    milliwh, start, index = peak
    demand = spans[index].version.demand
    assert demand is not None
    begin, end = start.astimezone(tariff.zone), (start + SLOT).astimezone(tariff.zone)
    where = f"{begin:%Y-%m-%d %H:%M}-{end:%H:%M} {tariff.time_zone}"
    quantity = _tidy(kwh(milliwh) * SLOTS_PER_HOUR)
    line = _line(
        f"Demand charge (peak {where})", quantity, "kW", demand.price_per_kw, tariff.currency
    )
    return index, line


def _standing_day_range(period: Period, zone: ZoneInfo, as_of: datetime) -> tuple[date, date]:
    """The local days [first, after_last) of the period that the standing charge covers."""
    first = period.start.astimezone(zone).date()
    return first, first + timedelta(days=_standing_days(period, zone, as_of))


def _days_within(span: VersionSpan, days: tuple[date, date]) -> int:
    first = max(span.first_day, days[0])
    after_last = min(span.last_day + timedelta(days=1), days[1])
    return max(0, (after_last - first).days)


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


def adjustment_for(
    recomputed: Bill,
    issued_total: Decimal,
    issued_energy_kwh: Decimal,
    already_adjusted_amount: Decimal,
    already_adjusted_energy: Decimal,
    issued_bill_id: str,
) -> Adjustment | None:
    """What an open bill carries for a closed period Q, or None when nothing is due.

    The rule: recompute(Q) - issued(Q) - adjustments for Q already carried on bills issued
    after Q. ``recomputed`` is Q's bill from every slot known now, priced by the versions in
    force then, as of Q's end; ``issued_total`` and ``issued_energy_kwh`` are Q's issued
    bill's own charges (subtotal + tax, without adjustments it carried for earlier periods)
    and energy. It depends only on the set of slots (billing dedupes readings by id), not
    on the order they came in, and once carried and issued it is not carried again.
    """
    amount = recomputed.charges - issued_total - already_adjusted_amount
    energy = recomputed.energy_kwh - issued_energy_kwh - already_adjusted_energy
    if amount == 0 and energy == 0:
        return None
    return Adjustment(recomputed.period.label, issued_bill_id, _tidy(energy), amount)


def with_adjustments(bill: Bill, adjustments: Iterable[Adjustment]) -> Bill:
    """The bill carrying these adjustments (instead of any it had), its total updated."""
    carried = tuple(sorted(adjustments, key=lambda a: (a.period_label, a.issued_bill_id)))
    total = sum((a.amount for a in carried), bill.charges)
    return replace(bill, adjustments=carried, total=total)


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
