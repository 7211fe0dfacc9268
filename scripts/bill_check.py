"""Bills in the reconciliation: every bill of the ledger's devices and accounts, checked
against a computation of its own.

For every device in the ledger and every local month its readings touch (in its tariff's
time zone), ``GetDeviceBill`` is compared line by line with a bill worked out here from
the catalog file and the ledger alone; so is ``GetAccountBill`` of every account with a
device in the ledger, for each of those months. This module does not import billing's
code: it re-derives the rules from their description (README "Tariffs, accounts and
bills"), so a mistake in billing's pricing shows up as a difference instead of being
repeated. The rules:

- a reading's energy is whole milliwatt-hours, ``round(usage_kwh * 1e6)`` of the float,
  used in the 15 minutes before its timestamp, on the UTC 15-minute grid (07:30:00 is in
  07:15-07:30, 07:30:01 in 07:30-07:45);
- the period is the calendar month in the tariff's time zone;
- a tariff has versions, each in force from its ``effective_from`` (a local date; the first
  also before its date) until the next one's; the old form, prices at the tariff's top
  level, is one version. Each local day of the period is priced by the version in force
  then, a slot by that of its local start's day; consecutive days under one version make
  a span, and with more than one span every line names its span ("... to 2026-11-14",
  "... from 2026-11-15", "... from 2026-11-10 to 2026-11-14");
- time-of-use: a slot's band is that of its local start time and weekday, one line per
  band name in tariff order, per span; tiered: the month's energy fills the tiers in slot
  time order, each slot at its own version's tier reached (one version: the month's total
  split across the tiers);
- demand charge: one line, the highest slot (kWh x 4 = kW; of equal ones the earliest)
  among slots whose version has a demand charge (and, if it lists bands, whose band is
  listed), at that version's price per kW, counted in that slot's span; named by its local
  time; 0 kW when no slot qualifies, no line when no version in the period has one;
- lines in the order: energy (span by span), demand, standing charges, taxes;
- standing charge per local day from the period's first day up to and including the day
  of the bill's ``as_of`` (taken from the answer: billing sets it to min(now, period end)),
  each span's days at its version's price;
- each line rounded once, half up, to the currency's minor unit; subtotal = the sum of the
  lines; tax per span = that span's lines' sum * its rate, rounded; an account's total is
  its device bills' totals.

A month billing has issued (status ISSUED) is not compared line by line: its bill is stored
once and never changes, and readings that arrive after the close become adjustments on
later bills, so the issued bill may legitimately lack some of the ledger's readings (and
nobody outside billing knows which ones it had). Instead the check proves, for every
device and issued month Q, in money and in kWh:

    the ledger's bill for Q (versions in force, as of Q's end, under the issued tariff)
    = Q's issued charges (subtotal + tax: without the adjustments Q's bill carried itself)
    + the adjustments for Q carried on bills issued after Q (ListBills, every page)
    + the adjustment for Q on the first open month after the account's last issued one.

An open month's bill is compared as above, its adjustments taken as billed (they come from
billing's record of what it issued) and added to its total.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import grpc
import yaml

from common.energy.v1 import billing_pb2, gateway_pb2_grpc
from scripts import client_options as client

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
SLOT_US = 15 * 60 * 1_000_000  # a slot, in microseconds
MILLIWH_PER_KWH = 1_000_000
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
# ISO 4217 currencies whose minor unit is not the cent; every other has two decimals.
MINOR_UNITS = {
    **dict.fromkeys(
        "BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF".split(), 0
    ),
    **dict.fromkeys("BHD IQD JOD KWD LYD OMR TND".split(), 3),
    **dict.fromkeys("CLF UYW".split(), 4),
}
# Billing marks Redis after its MongoDB write, and loads a new catalog within its refresh
# interval: a bill that differs is asked again for this long before it counts as different.
SETTLE_S = 10.0
# A closed period's as_of must be its end; allow the checker's clock this much skew.
CLOCK_SKEW = timedelta(minutes=1)


# --- the catalog, read as text -------------------------------------------------------------


class _NumbersAsText(yaml.SafeLoader):
    """safe_load without int and float: numbers stay their text, so 0.30 is exactly 0.30."""


_NumbersAsText.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if not tag.endswith((":int", ":float"))]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


@dataclass(frozen=True)
class Band:
    name: str
    price: Decimal
    days: frozenset[int]  # weekday numbers, Monday 0
    start_minute: int  # local minutes after midnight, [start, end)
    end_minute: int


@dataclass(frozen=True)
class Prices:
    """One version of a tariff: its prices from ``effective_from`` on."""

    effective_from: date | None  # a local date; None: from the beginning
    standing_per_day: Decimal
    tax_rate: Decimal
    kind: str  # flat, time_of_use or tiered
    flat_price: Decimal = Decimal(0)
    bands: tuple[Band, ...] = ()
    tiers: tuple[tuple[Decimal | None, Decimal], ...] = ()  # (up to kWh or None, price)
    demand_per_kw: Decimal | None = None  # None: no demand charge
    demand_bands: frozenset[str] | None = None  # None: every slot counts


@dataclass(frozen=True)
class Tariff:
    id: str
    currency: str
    zone: ZoneInfo
    versions: tuple[Prices, ...]

    def prices_on(self, day: date) -> int:
        """The index of the version in force on a local day."""
        found = 0
        for index, version in enumerate(self.versions):
            if version.effective_from is None or version.effective_from <= day:
                found = index
        return found


@dataclass(frozen=True)
class Catalog:
    default_tariff: str
    tariffs: dict[str, Tariff]
    device_tariff: dict[str, str]  # device id -> tariff id
    account_devices: dict[str, list[str]]  # account id -> its devices, in file order
    device_account: dict[str, str]  # device id -> account id

    def tariff_of(self, device_id: str) -> Tariff:
        return self.tariffs[self.device_tariff.get(device_id, self.default_tariff)]

    def account_of(self, device_id: str) -> str | None:
        return self.device_account.get(device_id)


def read_catalog(path: Path) -> Catalog:
    """The tariff catalog file (the one ``make seed`` loaded); ValueError if it is not one."""
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_NumbersAsText)
        tariffs = {t["id"]: _tariff(t) for t in data["tariffs"]}
        devices = data.get("devices") or []
        accounts: dict[str, list[str]] = defaultdict(list)
        for device in devices:
            accounts[str(device["account"])].append(str(device["id"]))
        return Catalog(
            default_tariff=str(data["default_tariff"]),
            tariffs=tariffs,
            device_tariff={str(d["id"]): str(d["tariff"]) for d in devices},
            account_devices=dict(accounts),
            device_account={str(d["id"]): str(d["account"]) for d in devices},
        )
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError, ArithmeticError) as error:
        raise ValueError(f"{path}: not a tariff catalog the check can read: {error!r}") from None


_PRICE_KEYS = ("standing_charge_per_day", "tax_rate", "energy", "demand")


def _tariff(data: Mapping[str, Any]) -> Tariff:
    if "versions" in data:
        versions = tuple(_prices(version, data["id"]) for version in data["versions"])
    else:  # the one-version form: prices at the tariff's top level
        versions = (_prices({key: data[key] for key in _PRICE_KEYS if key in data}, data["id"]),)
    return Tariff(
        id=str(data["id"]),
        currency=data["currency"],
        zone=ZoneInfo(data["time_zone"]),
        versions=versions,
    )


def _prices(data: Mapping[str, Any], tariff_id: Any) -> Prices:
    energy = data["energy"]
    kind = energy["kind"]
    demand = data.get("demand")
    when = data.get("effective_from")
    prices = Prices(
        effective_from=None if when is None else date.fromisoformat(str(when)),
        standing_per_day=Decimal(str(data.get("standing_charge_per_day", "0"))),
        tax_rate=Decimal(str(data.get("tax_rate", "0"))),
        kind=kind,
        demand_per_kw=None if demand is None else Decimal(str(demand["price_per_kw"])),
        demand_bands=(
            None
            if demand is None or demand.get("bands") is None
            else frozenset(str(name) for name in demand["bands"])
        ),
    )
    if kind == "flat":
        return replace(prices, flat_price=Decimal(str(energy["price_per_kwh"])))
    if kind == "time_of_use":
        bands = tuple(
            Band(
                name=str(band["name"]),
                price=Decimal(str(band["price_per_kwh"])),
                days=frozenset(WEEKDAYS.index(day) for day in band.get("days", WEEKDAYS)),
                start_minute=_minutes(band["start"]),
                end_minute=_minutes(band["end"]),
            )
            for band in energy["bands"]
        )
        return replace(prices, bands=bands)
    if kind == "tiered":
        tiers = tuple(
            (
                None if tier.get("up_to_kwh") is None else Decimal(str(tier["up_to_kwh"])),
                Decimal(str(tier["price_per_kwh"])),
            )
            for tier in energy["tiers"]
        )
        return replace(prices, tiers=tiers)
    raise ValueError(f"tariff {tariff_id!r}: unknown energy kind {kind!r}")


def _minutes(hhmm: str) -> int:
    hours, minutes = str(hhmm).split(":")
    return int(hours) * 60 + int(minutes)


# --- the ledger ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LedgerReading:
    timestamp: datetime  # UTC
    usage_kwh: float  # as the gateway got it: a double


def read_ledger_readings(path: Path) -> dict[str, dict[str, LedgerReading]]:
    """device id -> reading id -> reading; a reading resent (same id) counts once."""
    devices: dict[str, dict[str, LedgerReading]] = defaultdict(dict)
    with path.open() as ledger:
        for number, line in enumerate(ledger, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                stamp = datetime.fromisoformat(entry["timestamp"]).astimezone(UTC)
                usage = float(entry["usage_kwh"])
                devices[entry["device_id"]][entry["reading_id"]] = LedgerReading(stamp, usage)
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{path}:{number}: not a ledger line ({error})") from None
    return dict(devices)


def milliwh(usage_kwh: float) -> int:
    """A reading's energy as billing stores it: the float product, rounded half-even."""
    return round(usage_kwh * MILLIWH_PER_KWH)


def slot_start(timestamp: datetime) -> datetime:
    """Start of the UTC 15-minute slot (start, start + 15 min] that holds ``timestamp``."""
    microseconds = (timestamp - EPOCH) // timedelta(microseconds=1)
    return EPOCH + timedelta(microseconds=(microseconds - 1) // SLOT_US * SLOT_US)


# --- periods and the expected bill ---------------------------------------------------------


@dataclass(frozen=True)
class Period:
    """A local calendar month as UTC instants [start, end)."""

    label: str  # YYYY-MM
    start: datetime
    end: datetime
    first_day: date
    days: int


def period_of(zone: ZoneInfo, year: int, month: int) -> Period:
    first = date(year, month, 1)
    following = date(year + month // 12, month % 12 + 1, 1)
    return Period(
        label=f"{year:04d}-{month:02d}",
        start=_local_midnight(first, zone),
        end=_local_midnight(following, zone),
        first_day=first,
        days=(following - first).days,
    )


def period_containing(zone: ZoneInfo, instant: datetime) -> Period:
    local = instant.astimezone(zone)
    return period_of(zone, local.year, local.month)


def _local_midnight(day: date, zone: ZoneInfo) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=zone).astimezone(UTC)


@dataclass(frozen=True)
class Line:
    description: str
    quantity: str
    unit: str
    unit_price: str
    amount: str

    def __str__(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        return f"{self.description}: {self.quantity}{unit} x {self.unit_price} = {self.amount}"


@dataclass(frozen=True)
class ExpectedBill:
    """A device's bill as this check works it out, every number as the API writes it."""

    tariff_id: str
    currency: str
    period: Period
    energy_kwh: str
    lines: tuple[Line, ...]
    subtotal: str
    tax: str
    total: str


def plain(number: Decimal) -> str:
    """A quantity written plainly: no exponent, no trailing zeros (4.5, 600, 0)."""
    return format(number.normalize(), "f")


def money(amount: Decimal, currency: str) -> Decimal:
    """Rounded once, half up, to the currency's minor unit."""
    places = MINOR_UNITS.get(currency, 2)
    return amount.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP)


def standing_days(period: Period, zone: ZoneInfo, as_of: datetime) -> int:
    """Local days from the period's first up to and including the day of ``as_of``."""
    if as_of < period.start:
        return 0
    if as_of >= period.end:
        return period.days
    return (as_of.astimezone(zone).date() - period.first_day).days + 1


@dataclass(frozen=True)
class _Span:
    """Consecutive local days of the period under one version: [first, last]."""

    prices: Prices
    first: date
    last: date


def _spans(tariff: Tariff, period: Period) -> list[_Span]:
    """Walk the period's local days; a new span wherever the version in force changes."""
    spans: list[_Span] = []
    current = -1
    for offset in range(period.days):
        day = period.first_day + timedelta(days=offset)
        index = tariff.prices_on(day)
        if index != current:
            spans.append(_Span(tariff.versions[index], day, day))
            current = index
        else:
            spans[-1] = replace(spans[-1], last=day)
    return spans


def _named(spans: Sequence[_Span], number: int) -> str:
    """The suffix naming a span in its lines, when there is more than one."""
    if len(spans) == 1:
        return ""
    span = spans[number]
    if number == 0:
        return f" to {span.last.isoformat()}"
    if number == len(spans) - 1:
        return f" from {span.first.isoformat()}"
    return f" from {span.first.isoformat()} to {span.last.isoformat()}"


def expected_bill(
    tariff: Tariff, period: Period, readings: Iterable[LedgerReading], as_of: datetime
) -> ExpectedBill:
    """The bill of ``readings`` (one device's) for ``period``, up to ``as_of``."""
    slots: dict[datetime, int] = defaultdict(int)  # milliwatt-hours by UTC slot start
    for reading in readings:
        start = slot_start(reading.timestamp)
        if period.start <= start < period.end:
            slots[start] += milliwh(reading.usage_kwh)
    spans = _spans(tariff, period)
    span_of = {  # local day -> span number
        span.first + timedelta(days=offset): number
        for number, span in enumerate(spans)
        for offset in range((span.last - span.first).days + 1)
    }
    slot_span = {start: span_of[start.astimezone(tariff.zone).date()] for start in slots}
    energy = _energy(tariff, spans, slots, slot_span)
    demand = _demand(tariff, spans, slots, slot_span)
    standing_until = period.first_day + timedelta(days=standing_days(period, tariff.zone, as_of))
    standing: list[tuple[int, Priced]] = []
    for number, span in enumerate(spans):
        days = (min(span.last + timedelta(days=1), standing_until) - span.first).days
        description = f"Standing charge{_named(spans, number)}"
        standing.append(
            (number, (description, Decimal(max(0, days)), "day", span.prices.standing_per_day))
        )
    lines, subtotal = [], money(Decimal(0), tariff.currency)
    span_sums = [money(Decimal(0), tariff.currency) for _ in spans]
    for number, (description, quantity, unit, price) in [*energy, *demand, *standing]:
        amount = money(quantity * price, tariff.currency)
        lines.append(Line(description, plain(quantity), unit, str(price), str(amount)))
        subtotal += amount
        span_sums[number] += amount
    tax = money(Decimal(0), tariff.currency)
    for number, span in enumerate(spans):
        rate = span.prices.tax_rate
        span_tax = money(span_sums[number] * rate, tariff.currency)
        description = f"Tax {plain(rate * 100)}%{_named(spans, number)}"
        lines.append(Line(description, str(span_sums[number]), "", str(rate), str(span_tax)))
        tax += span_tax
    return ExpectedBill(
        tariff_id=tariff.id,
        currency=tariff.currency,
        period=period,
        energy_kwh=plain(_kwh(sum(slots.values()))),
        lines=tuple(lines),
        subtotal=str(subtotal),
        tax=str(tax),
        total=str(subtotal + tax),
    )


def _kwh(milliwatt_hours: int) -> Decimal:
    return Decimal(milliwatt_hours).scaleb(-6)


Priced = tuple[str, Decimal, str, Decimal]  # description, quantity, unit, unit price


def _energy(
    tariff: Tariff,
    spans: Sequence[_Span],
    slots: Mapping[datetime, int],
    slot_span: Mapping[datetime, int],
) -> list[tuple[int, Priced]]:
    """The energy lines before rounding, span by span, each with its span's number."""
    # Tiers: walk every slot of the period in time order, filling the tiers of its version
    # from the period's energy so far.
    filled: dict[tuple[int, int], Decimal] = defaultdict(Decimal)  # (span, tier) -> kWh
    so_far = Decimal(0)
    for start in sorted(slots):
        energy, number = _kwh(slots[start]), slot_span[start]
        prices = spans[number].prices
        if prices.kind == "tiered":
            lower = Decimal(0)
            for tier, (up_to, _) in enumerate(prices.tiers):
                top = so_far + energy if up_to is None else min(so_far + energy, up_to)
                filled[number, tier] += max(Decimal(0), top - max(so_far, lower))
                lower = up_to if up_to is not None else lower
        so_far += energy
    priced: list[tuple[int, Priced]] = []
    for number, span in enumerate(spans):
        prices, named = span.prices, _named(spans, number)
        own = {start: used for start, used in slots.items() if slot_span[start] == number}
        if prices.kind == "flat":
            total = _kwh(sum(own.values()))
            priced.append((number, (f"Energy{named}", total, "kWh", prices.flat_price)))
        elif prices.kind == "time_of_use":
            by_name: dict[str, int] = {}
            band_prices: dict[str, Decimal] = {}
            for band in prices.bands:  # tariff order; a band written in pieces is one line
                by_name.setdefault(band.name, 0)
                band_prices.setdefault(band.name, band.price)
            for start, used in own.items():
                by_name[_band_at(tariff, prices, start).name] += used
            priced += [
                (number, (f"Energy ({n}){named}", _kwh(e), "kWh", band_prices[n]))
                for n, e in by_name.items()
            ]
        else:
            lower = Decimal(0)
            for tier, (up_to, price) in enumerate(prices.tiers):
                if up_to is None:
                    description = f"Energy above {plain(lower)} kWh{named}"
                else:
                    description = f"Energy {plain(lower)}-{plain(up_to)} kWh{named}"
                priced.append((number, (description, filled[number, tier], "kWh", price)))
                lower = up_to if up_to is not None else lower
    return priced


def _demand(
    tariff: Tariff,
    spans: Sequence[_Span],
    slots: Mapping[datetime, int],
    slot_span: Mapping[datetime, int],
) -> list[tuple[int, Priced]]:
    """The demand line before rounding (none when no version in the period has one)."""
    charged = [n for n, span in enumerate(spans) if span.prices.demand_per_kw is not None]
    if not charged:
        return []
    candidates = []
    for start, energy in slots.items():
        prices = spans[slot_span[start]].prices
        if prices.demand_per_kw is None:
            continue
        if prices.demand_bands is not None:
            if _band_at(tariff, prices, start).name not in prices.demand_bands:
                continue
        candidates.append((-energy, start))  # the highest, then the earliest
    if not candidates:
        price = spans[charged[0]].prices.demand_per_kw
        assert price is not None
        return [(charged[0], ("Demand charge", Decimal(0), "kW", price))]
    energy, start = min(candidates)
    number = slot_span[start]
    price = spans[number].prices.demand_per_kw
    assert price is not None
    local_start = start.astimezone(tariff.zone)
    local_end = (start + timedelta(microseconds=SLOT_US)).astimezone(tariff.zone)
    name = (
        f"Demand charge (peak {local_start.strftime('%Y-%m-%d %H:%M')}-"
        f"{local_end.strftime('%H:%M')} {tariff.zone.key})"
    )
    return [(number, (name, _kwh(-energy) * 4, "kW", price))]


def _band_at(tariff: Tariff, prices: Prices, slot: datetime) -> Band:
    local = slot.astimezone(tariff.zone)
    minute = local.hour * 60 + local.minute
    for band in prices.bands:
        if local.weekday() in band.days and band.start_minute <= minute < band.end_minute:
            return band
    raise ValueError(f"tariff {tariff.id!r}: no band holds {local.isoformat()}")


def months_touched(zone: ZoneInfo, readings: Iterable[LedgerReading]) -> list[Period]:
    """The local months (in ``zone``) that hold a slot of these readings."""
    found = {period_containing(zone, slot_start(r.timestamp)) for r in readings}
    return sorted(found, key=lambda period: period.start)


# --- comparing with billing's answers ------------------------------------------------------


def _frame(
    expected: ExpectedBill, billed: billing_pb2.Bill, unregistered: bool
) -> list[tuple[str, object, object]]:
    """What a bill is of, whatever readings it holds: tariff, currency, period, flag."""
    return [
        ("tariff", expected.tariff_id, billed.tariff_id),
        ("currency", expected.currency, billed.currency),
        ("period", expected.period.label, billed.period),
        ("period_start", expected.period.start, billed.period_start.ToDatetime(tzinfo=UTC)),
        ("period_end", expected.period.end, billed.period_end.ToDatetime(tzinfo=UTC)),
        ("unregistered", unregistered, billed.unregistered),
    ]


def _as_of(expected: ExpectedBill, billed: billing_pb2.Bill, asked_at: datetime) -> list[str]:
    as_of = billed.as_of.ToDatetime(tzinfo=UTC)
    period = expected.period
    if not period.start <= as_of <= period.end:
        return [f"as_of {as_of.isoformat()} is outside the period"]
    if period.end <= asked_at - CLOCK_SKEW and as_of != period.end:
        return [f"as_of {as_of.isoformat()}: the period is closed, expected its end"]
    return []


def compare_bill(
    expected: ExpectedBill, billed: billing_pb2.Bill, unregistered: bool, asked_at: datetime
) -> list[str]:
    """What differs between the expected bill and billing's (an open month's), one phrase
    each."""
    pairs = _frame(expected, billed, unregistered)
    pairs.append(("energy_kwh", expected.energy_kwh, billed.energy_kwh))
    for index in range(max(len(expected.lines), len(billed.lines))):
        want = expected.lines[index] if index < len(expected.lines) else None
        got = _line(billed.lines[index]) if index < len(billed.lines) else None
        pairs.append((f"line {index + 1}", want, got))
    pairs += [
        ("subtotal", expected.subtotal, billed.subtotal),
        ("tax", expected.tax, billed.tax),
        ("total", expected.total, billed.total),
    ]
    if billed.adjustments:
        # Adjustments for earlier, issued months come from billing's record of what it
        # issued, which this check does not keep: taken as billed, they must add up.
        adjusted = Decimal(expected.total) + sum(Decimal(a.amount) for a in billed.adjustments)
        pairs[-1] = ("total", adjusted, Decimal(billed.total))
    differences = [
        f"{what}: expected {want}, billed {got}" for what, want, got in pairs if want != got
    ]
    return differences + _as_of(expected, billed, asked_at)


def next_month(label: str) -> str:
    """The month after ``label`` (YYYY-MM)."""
    year, month = (int(part) for part in label.split("-"))
    return f"{year + month // 12:04d}-{month % 12 + 1:02d}"


@dataclass(frozen=True)
class IssuedParts:
    """What billing charges, in all, for an issued month Q of one device: Q's issued bill's
    own charges (subtotal + tax), the adjustments for Q on the bills issued after Q, and
    the adjustment for Q on the first open month after the account's last issued one."""

    bill_id: str
    currency: str
    issued: Decimal
    issued_kwh: Decimal
    later: Decimal
    later_kwh: Decimal
    open_period: str
    open: Decimal
    open_kwh: Decimal

    @property
    def amount(self) -> Decimal:
        return self.issued + self.later + self.open

    @property
    def energy_kwh(self) -> Decimal:
        return self.issued_kwh + self.later_kwh + self.open_kwh

    def __add__(self, other: IssuedParts) -> IssuedParts:
        """Two devices' parts for the same month: an account's."""
        return replace(
            self,
            issued=self.issued + other.issued,
            issued_kwh=self.issued_kwh + other.issued_kwh,
            later=self.later + other.later,
            later_kwh=self.later_kwh + other.later_kwh,
            open=self.open + other.open,
            open_kwh=self.open_kwh + other.open_kwh,
        )

    def brief(self) -> str:
        """The money parts, for the bill's row."""
        issued, later, open_ = (
            money(n, self.currency) for n in (self.issued, self.later, self.open)
        )
        return (
            f"issued {self.bill_id} {issued} + later bills {later} "
            f"+ open {self.open_period} {open_}"
        )

    def describe(self, kwh: bool) -> str:
        """The three parts and their sum, e.g. ``18.21 issued + 0.35 on later issued bills +
        0.36 on open 2026-12 = 18.92``."""

        def show(number: Decimal) -> str:
            return plain(number) if kwh else str(money(number, self.currency))

        if kwh:
            parts = (self.issued_kwh, self.later_kwh, self.open_kwh, self.energy_kwh)
        else:
            parts = (self.issued, self.later, self.open, self.amount)
        issued, later, open_, total = (show(number) for number in parts)
        return (
            f"{issued} issued + {later} on later issued bills + {open_} on open "
            f"{self.open_period} = {total}"
        )


def issued_parts(
    issued: billing_pb2.Bill,
    account_bills: Iterable[billing_pb2.GetAccountBillResponse],
    open_period: str,
    open_bill: billing_pb2.Bill | None,
) -> tuple[IssuedParts, list[str]]:
    """Add up what billing charges for the issued month of ``issued`` (one device's bill):
    ``account_bills`` are the account's issued bills (ListBills, every page), ``open_bill``
    the device's bill for ``open_period``, the first month after the last of them. Also
    the inconsistencies found on the way, one phrase each."""
    month, device_id, problems = issued.period, issued.device_id, []
    later = [Decimal(0), Decimal(0)]
    listed = False
    for account_bill in account_bills:
        for bill in account_bill.bills:
            if bill.device_id != device_id:
                continue
            if account_bill.period == month:
                listed = True
                if bill != issued:
                    problems.append(f"ListBills' {month} bill is not GetDeviceBill's")
            if account_bill.period <= month:
                continue
            for adjustment in bill.adjustments:
                if adjustment.period == month:
                    later[0] += Decimal(adjustment.amount)
                    later[1] += Decimal(adjustment.energy_kwh)
                    problems += _names_the_bill(adjustment, issued.bill_id, account_bill.period)
    if not listed:
        problems.append(f"ListBills does not list {month} for this device")
    opened = [Decimal(0), Decimal(0)]
    if open_bill is None:
        problems.append(f"no bill for the open month {open_period}")
    elif open_bill.status == billing_pb2.BILL_STATUS_ISSUED:
        problems.append(f"{open_period} was issued while checking; ask again")
    else:
        for adjustment in open_bill.adjustments:
            if adjustment.period == month:
                opened[0] += Decimal(adjustment.amount)
                opened[1] += Decimal(adjustment.energy_kwh)
                problems += _names_the_bill(adjustment, issued.bill_id, open_period)
    own = sum((Decimal(a.amount) for a in issued.adjustments), Decimal(0))
    charges = Decimal(issued.subtotal) + Decimal(issued.tax)
    if charges + own != Decimal(issued.total):
        problems.append(
            f"total: issued {issued.total}, but subtotal + tax + its adjustments = {charges + own}"
        )
    parts = IssuedParts(
        bill_id=issued.bill_id,
        currency=issued.currency,
        issued=charges,
        issued_kwh=Decimal(issued.energy_kwh),
        later=later[0],
        later_kwh=later[1],
        open_period=open_period,
        open=opened[0],
        open_kwh=opened[1],
    )
    return parts, problems


def _names_the_bill(adjustment: billing_pb2.Adjustment, bill_id: str, on: str) -> list[str]:
    if adjustment.issued_bill_id == bill_id:
        return []
    return [
        f"the adjustment for {adjustment.period} on {on} names bill "
        f"{adjustment.issued_bill_id}, not {bill_id}"
    ]


def compare_issued(
    expected: ExpectedBill,
    issued: billing_pb2.Bill,
    account_bills: Iterable[billing_pb2.GetAccountBillResponse],
    open_period: str,
    open_bill: billing_pb2.Bill | None,
    asked_at: datetime,
) -> tuple[IssuedParts, list[str]]:
    """An issued month Q of one device: the ledger's bill for Q (``expected``, as of Q's
    end) must equal, in money and in kWh, Q's issued charges + the adjustments for Q on
    bills issued after Q + the adjustment for Q on the open month (``issued_parts``)."""
    differences = [
        f"{what}: expected {want}, billed {got}"
        for what, want, got in _frame(expected, issued, False)
        if want != got
    ]
    if not issued.bill_id:
        differences.append("issued, but without a bill_id")
    parts, problems = issued_parts(issued, account_bills, open_period, open_bill)
    differences += problems
    named = f"{issued.period} issued as {issued.bill_id}"
    if Decimal(expected.total) != parts.amount:
        differences.append(
            f"{named}: ledger charges {expected.total}, billed {parts.describe(kwh=False)}"
        )
    if Decimal(expected.energy_kwh) != parts.energy_kwh:
        differences.append(
            f"{named}: ledger {expected.energy_kwh} kWh, billed {parts.describe(kwh=True)}"
        )
    return parts, differences + _as_of(expected, issued, asked_at)


def _line(line: billing_pb2.LineItem) -> Line:
    return Line(line.description, line.quantity, line.unit, line.unit_price, line.amount)


@dataclass
class BillCheck:
    """One bill asked for and compared: a device's, or an account's (``account`` set)."""

    subject: str  # device id, or account id
    period: str
    account: bool = False
    tariff: str = ""
    currency: str = ""
    energy_kwh: str = ""
    expected_total: str = ""
    billed_total: str = ""
    differences: list[str] = field(default_factory=list)
    note: str = ""  # an issued month: how the billed column adds up

    @property
    def exact(self) -> bool:
        return not self.differences


@dataclass
class BillReport:
    """The outcome of one bill check: ``exact`` when every bill matched to the cent."""

    checks: list[BillCheck] = field(default_factory=list)
    checked_devices: int = 0  # distinct devices whose bills were checked
    checked_accounts: int = 0  # distinct accounts

    @property
    def exact(self) -> bool:
        return all(check.exact for check in self.checks)

    def render(self) -> str:
        """A row per bill, the differences under it; the last line sums it up."""
        lines = [
            f"{'bill':32} {'period':8} {'tariff':20} {'energy kWh':>14} "
            f"{'expected':>16} {'billed':>12}"
        ]
        for check in self.checks:
            name = f"account {check.subject}" if check.account else check.subject
            mark = "" if check.exact else "   <-- differs"
            expected = f"{check.currency} {check.expected_total}"
            lines.append(
                f"{name:32} {check.period:8} {check.tariff:20} {check.energy_kwh:>14} "
                f"{expected:>16} {check.billed_total:>12}"
                + (f"   {check.note}" if check.note else "")
                + mark
            )
            lines += [f"    {difference}" for difference in check.differences[:12]]
        devices = sum(1 for check in self.checks if not check.account)
        differing = sum(1 for check in self.checks if not check.exact)
        outcome = "every one exact" if not differing else f"{differing} differ"
        lines.append(
            f"{devices} device bills ({self.checked_devices} devices), "
            f"{len(self.checks) - devices} account bills ({self.checked_accounts} accounts): "
            + outcome
        )
        return "\n".join(lines)


@dataclass(frozen=True)
class _DeviceJob:
    device_id: str
    period: Period


@dataclass(frozen=True)
class _AccountJob:
    account_id: str
    period: Period


class _Checker:
    def __init__(
        self,
        stub: gateway_pb2_grpc.GatewayStub,
        catalog: Catalog,
        readings: Mapping[str, Mapping[str, LedgerReading]],
    ) -> None:
        self._stub = stub
        self._catalog = catalog
        self._readings = readings

    def _expected(self, device_id: str, period: Period, as_of: datetime) -> ExpectedBill:
        tariff = self._catalog.tariff_of(device_id)
        own = self._readings.get(device_id, {}).values()
        return expected_bill(tariff, period, own, as_of)

    async def run(self, job: _DeviceJob | _AccountJob) -> BillCheck:
        try:
            if isinstance(job, _DeviceJob):
                return await self._device(job)
            return await self._account(job)
        except grpc.aio.AioRpcError as error:
            subject = job.device_id if isinstance(job, _DeviceJob) else job.account_id
            check = BillCheck(subject, job.period.label, isinstance(job, _AccountJob))
            check.differences.append(f"billing answered {error.code().name}: {error.details()}")
            return check

    async def _device(self, job: _DeviceJob) -> BillCheck:
        asked_at = datetime.now(UTC)
        billed = await self._device_bill(job.device_id, job.period.label)
        if billed.status == billing_pb2.BILL_STATUS_ISSUED:
            return await self._issued_device(job, billed, asked_at)
        expected = self._expected(job.device_id, job.period, billed.as_of.ToDatetime(tzinfo=UTC))
        unregistered = job.device_id not in self._catalog.device_tariff
        return BillCheck(
            job.device_id,
            job.period.label,
            tariff=expected.tariff_id,
            currency=expected.currency,
            energy_kwh=expected.energy_kwh,
            expected_total=expected.total,
            billed_total=billed.total,
            differences=compare_bill(expected, billed, unregistered, asked_at),
        )

    async def _device_bill(self, device_id: str, period: str) -> billing_pb2.Bill:
        request = billing_pb2.GetDeviceBillRequest(device_id=device_id, period=period)
        return (await self._stub.GetDeviceBill(request, timeout=30)).bill

    async def _account_bill(
        self, account_id: str, period: str
    ) -> billing_pb2.GetAccountBillResponse:
        request = billing_pb2.GetAccountBillRequest(account_id=account_id, period=period)
        return await self._stub.GetAccountBill(request, timeout=30)

    async def _issued_bills(self, account_id: str) -> list[billing_pb2.GetAccountBillResponse]:
        """The account's issued bills, every page of ListBills."""
        bills: list[billing_pb2.GetAccountBillResponse] = []
        token = ""
        while True:
            request = billing_pb2.ListBillsRequest(
                account_id=account_id, page_size=100, page_token=token
            )
            page = await self._stub.ListBills(request, timeout=30)
            bills += page.bills
            if not (token := page.next_page_token):
                return bills

    def _open_period(
        self, month: str, account_bills: Sequence[billing_pb2.GetAccountBillResponse]
    ) -> str:
        """The first month after the account's last issued one (after ``month`` at least)."""
        return next_month(max([month, *(bill.period for bill in account_bills)]))

    def _issued(
        self,
        issued: billing_pb2.Bill,
        account_bills: Sequence[billing_pb2.GetAccountBillResponse],
        open_period: str,
        open_bill: billing_pb2.Bill | None,
        asked_at: datetime,
    ) -> tuple[ExpectedBill | None, IssuedParts | None, list[str]]:
        """The ledger's bill of an issued month, under the tariff it was issued with (a
        device may have moved tariff since: billing adjusts under the issued one), and
        ``compare_issued``."""
        tariff = self._catalog.tariffs.get(issued.tariff_id)
        if tariff is None:
            return (
                None,
                None,
                [f"tariff {issued.tariff_id!r} of the issued bill is not in the catalog"],
            )
        year, month = (int(part) for part in issued.period.split("-"))
        period = period_of(tariff.zone, year, month)
        own = self._readings.get(issued.device_id, {}).values()
        expected = expected_bill(tariff, period, own, period.end)
        parts, differences = compare_issued(
            expected, issued, account_bills, open_period, open_bill, asked_at
        )
        return expected, parts, differences

    async def _issued_device(
        self, job: _DeviceJob, billed: billing_pb2.Bill, asked_at: datetime
    ) -> BillCheck:
        check = BillCheck(job.device_id, job.period.label, tariff=billed.tariff_id)
        account = self._catalog.account_of(job.device_id)
        if account is None:
            check.differences.append("issued, but the catalog bills the device to no account")
            return check
        account_bills = await self._issued_bills(account)
        open_period = self._open_period(job.period.label, account_bills)
        open_bill = await self._device_bill(job.device_id, open_period)
        expected, parts, check.differences = self._issued(
            billed, account_bills, open_period, open_bill, asked_at
        )
        if expected is not None and parts is not None:
            check.currency, check.energy_kwh = expected.currency, expected.energy_kwh
            check.expected_total = expected.total
            check.billed_total = str(money(parts.amount, expected.currency))
            check.note = parts.brief()
        return check

    async def _issued_account(
        self, job: _AccountJob, answer: billing_pb2.GetAccountBillResponse, asked_at: datetime
    ) -> BillCheck:
        """Every device bill of the issued account bill, by ``compare_issued``; the total is
        its device bills' totals."""
        devices = self._catalog.account_devices[job.account_id]
        currency = self._catalog.tariff_of(devices[0]).currency
        check = BillCheck(job.account_id, job.period.label, account=True, currency=currency)
        account_bills = await self._issued_bills(job.account_id)
        open_period = self._open_period(job.period.label, account_bills)
        open_bills = {
            bill.device_id: bill
            for bill in (await self._account_bill(job.account_id, open_period)).bills
        }
        expected_total, energy = money(Decimal(0), currency), Decimal(0)
        summed: IssuedParts | None = None
        for bill in answer.bills:
            expected, parts, differences = self._issued(
                bill, account_bills, open_period, open_bills.get(bill.device_id), asked_at
            )
            check.differences += [f"{bill.device_id}: {d}" for d in differences]
            if expected is not None and parts is not None:
                expected_total += Decimal(expected.total)
                energy += Decimal(expected.energy_kwh)
                summed = parts if summed is None else summed + parts
        billed = {bill.device_id for bill in answer.bills}
        for device_id in devices:
            own = self._readings.get(device_id, {}).values()
            if device_id not in billed and any(
                job.period.start <= slot_start(r.timestamp) < job.period.end for r in own
            ):
                check.differences.append(
                    f"{device_id}: has ledger readings in {job.period.label}, "
                    "but is not on the issued bill"
                )
        added = sum((Decimal(bill.total) for bill in answer.bills), Decimal(0))
        if added != Decimal(answer.total):
            check.differences.append(
                f"total: issued {answer.total}, but its device bills add up to {added}"
            )
        for what, want, got in (
            ("currency", currency, answer.currency),
            ("period", job.period.label, answer.period),
        ):
            if want != got:
                check.differences.append(f"{what}: expected {want}, billed {got}")
        check.energy_kwh, check.expected_total = plain(energy), str(expected_total)
        if summed is not None:
            check.billed_total = str(money(summed.amount, currency))
            check.note = summed.brief()
        return check

    async def _account(self, job: _AccountJob) -> BillCheck:
        asked_at = datetime.now(UTC)
        answer = await self._account_bill(job.account_id, job.period.label)
        if answer.status == billing_pb2.BILL_STATUS_ISSUED:
            return await self._issued_account(job, answer, asked_at)
        devices = self._catalog.account_devices[job.account_id]
        currency = self._catalog.tariff_of(devices[0]).currency
        check = BillCheck(job.account_id, job.period.label, account=True, currency=currency)
        billed = {bill.device_id: bill for bill in answer.bills}
        total, energy = money(Decimal(0), currency), Decimal(0)
        for device_id in devices:
            if device_id not in billed:
                check.differences.append(f"{device_id}: missing from the account's bill")
                continue
            bill = billed[device_id]
            expected = self._expected(device_id, job.period, bill.as_of.ToDatetime(tzinfo=UTC))
            # The adjustments for issued months, taken as billed (compare_bill checks that
            # each device bill's total holds them); the issued months' own checks prove them.
            total += Decimal(expected.total) + sum(
                (Decimal(a.amount) for a in bill.adjustments), Decimal(0)
            )
            energy += Decimal(expected.energy_kwh)
            check.differences += [
                f"{device_id}: {difference}"
                for difference in compare_bill(expected, bill, False, asked_at)
            ]
        for device_id in billed.keys() - set(devices):
            check.differences.append(f"{device_id}: billed, but not a device of the account")
        check.energy_kwh, check.expected_total, check.billed_total = (
            plain(energy),
            str(total),
            answer.total,
        )
        for what, want, got in (
            ("currency", currency, answer.currency),
            ("period", job.period.label, answer.period),
            ("total", str(total), answer.total),
        ):
            if want != got:
                check.differences.append(f"{what}: expected {want}, billed {got}")
        return check


def plan(
    catalog: Catalog, readings: Mapping[str, Mapping[str, LedgerReading]]
) -> list[_DeviceJob | _AccountJob]:
    """Every (device, month touched) of the ledger, then every (account, month) of them."""
    jobs: list[_DeviceJob | _AccountJob] = []
    account_months: dict[str, dict[str, Period]] = defaultdict(dict)
    for device_id in sorted(readings):
        tariff = catalog.tariff_of(device_id)
        account = catalog.account_of(device_id)
        for period in months_touched(tariff.zone, readings[device_id].values()):
            jobs.append(_DeviceJob(device_id, period))
            if account is not None:
                account_months[account][period.label] = period
    for account in sorted(account_months):
        for label in sorted(account_months[account]):
            jobs.append(_AccountJob(account, account_months[account][label]))
    return jobs


async def check_bills(
    stub: gateway_pb2_grpc.GatewayStub,
    catalog: Catalog,
    readings: Mapping[str, Mapping[str, LedgerReading]],
    settle_s: float = SETTLE_S,
) -> BillReport:
    """Ask for every bill of ``plan``; ask again for those that differ, for ``settle_s``."""
    checker = _Checker(stub, catalog, readings)
    jobs = plan(catalog, readings)
    results: dict[_DeviceJob | _AccountJob, BillCheck] = {}
    pending: Sequence[_DeviceJob | _AccountJob] = jobs
    deadline = time.monotonic() + settle_s
    while True:
        for job in pending:
            results[job] = await checker.run(job)
        pending = [job for job in pending if not results[job].exact]
        if not pending or time.monotonic() > deadline:
            break
        await asyncio.sleep(1)
    return BillReport(
        checks=[results[job] for job in jobs],
        checked_devices=len({job.device_id for job in jobs if isinstance(job, _DeviceJob)}),
        checked_accounts=len({job.account_id for job in jobs if isinstance(job, _AccountJob)}),
    )


async def reconcile_bills(
    ledger: Path,
    catalog: Path,
    target: str,
    token: str | None = None,
    tls: client.ClientTls | None = None,
    settle_s: float = SETTLE_S,
) -> BillReport:
    """Check GetDeviceBill and GetAccountBill of every device and month in the ledger (an
    issued month by ListBills and the open month's adjustments too).

    ``catalog`` must be the file billing has loaded (``make seed``). Run it after the
    readings check passed: it compares bills, and assumes billing holds the ledger's readings.
    ``token`` must be able to read the accounts' bills and ListBills (the admin token).
    """
    rules = read_catalog(catalog)
    readings = read_ledger_readings(ledger)
    async with client.open_channel(target, token, tls) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        return await check_bills(stub, rules, readings, settle_s)
