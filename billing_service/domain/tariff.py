"""Tariffs, accounts and devices: the billing catalog and its validation.

A tariff has a currency and a time zone and a list of versions, each one its prices
(standing charge, tax rate, energy, an optional demand charge) from a local date on. A
closed (issued) period never changes: ``closed_period_problems`` lists the catalog edits
that would change one. The old single-version form (prices at the tariff's top level) still
loads, as one version from the beginning.

Pure domain code: the YAML file is read by ``billing_service.adapters.catalog_file``, which
hands the parsed mapping to ``Catalog.model_validate``. Money and prices are ``Decimal``,
from the numbers' text, so 0.30 is exactly 0.30. Every error says the key path and what to
change (``describe_problem``); the adapter adds the file and line, e.g.
``tariffs.yaml:14: tariffs[1].energy.bands[0].start: '07:10' is not a multiple of 15 minutes``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

from common.models import ID_PATTERN, ID_RULE

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
STEP_MINUTES = 15  # the ledger's slot: bands must align with it so a slot is in one band
SLOTS_PER_DAY = 24 * 60 // STEP_MINUTES
# ISO 4217 currencies whose minor unit is not a hundredth (the list's 0, 3 and 4 places).
_MINOR_UNITS = {
    **dict.fromkeys(
        "BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF".split(), 0
    ),
    **dict.fromkeys("BHD IQD JOD KWD LYD OMR TND".split(), 3),
    **dict.fromkeys("CLF UYW".split(), 4),
}
_ENERGY_KINDS = "'flat', 'time_of_use' or 'tiered'"


def minor_units(currency: str) -> int:
    """Decimal places of the currency's smallest unit (ISO 4217), 2 unless listed."""
    return _MINOR_UNITS.get(currency, 2)


class CatalogError(ValueError):
    """The catalog file is unreadable or invalid; each line of the message is one problem."""


class _At(ValueError):
    """A validator's error about a part of its value: ``loc`` extends pydantic's location."""

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(f"{_path(loc)}: {message}")
        self.loc = loc
        self.message = message


def _check_id(value: str) -> str:
    if not ID_PATTERN.fullmatch(value):
        raise ValueError(f"{value!r} is not a valid id; use {ID_RULE}")
    return value


def _check_currency(value: str) -> str:
    if not re.fullmatch(r"[A-Z]{3}", value):
        raise ValueError(f"{value!r} is not an ISO 4217 code; write three capitals, like 'EUR'")
    return value


def _check_zone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"{value!r} is not a known IANA time zone; use a name like 'Europe/Berlin'"
        ) from None
    return value


def _check_tax_rate(value: Decimal) -> Decimal:
    if not 0 <= value < 1:
        raise ValueError(f"{value} is not a fraction in [0, 1); write 19% as 0.19")
    return value


def _minutes(text: str) -> int:
    """Minutes after local midnight of 'HH:MM' (24:00 allowed, as the end of the day)."""
    match = re.fullmatch(r"(\d{1,2}):(\d{2})", text)
    if not match:
        raise ValueError(f"{text!r} is not a time; write HH:MM in quotes, like '07:30'")
    hours, minutes = int(match[1]), int(match[2])
    if minutes > 59 or hours * 60 + minutes > 24 * 60:
        raise ValueError(f"{text!r} is not a time of day; use 00:00 to 24:00")
    if minutes % STEP_MINUTES:
        raise ValueError(
            f"{text!r} is not a multiple of 15 minutes; billing slots are 15 minutes, "
            "so bands start and end at :00, :15, :30 or :45"
        )
    return hours * 60 + minutes


def _check_time(text: str) -> str:
    _minutes(text)
    return text


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


Id = Annotated[str, AfterValidator(_check_id)]
Price = Annotated[Decimal, Field(ge=0, allow_inf_nan=False)]
LocalTime = Annotated[str, AfterValidator(_check_time)]


class _Model(BaseModel):
    # extra="forbid" so a misspelt key (price_per_kWh) is an error, not a silent default.
    model_config = ConfigDict(frozen=True, extra="forbid")


class FlatEnergy(_Model):
    """One price for every kWh."""

    kind: Literal["flat"]
    price_per_kwh: Price


class Band(_Model):
    """A price for the local times [start, end) on the listed weekdays."""

    name: str = Field(min_length=1)
    price_per_kwh: Price
    days: list[Weekday] = Field(default_factory=lambda: list(WEEKDAYS), min_length=1)
    start: LocalTime
    end: LocalTime

    @property
    def start_minute(self) -> int:
        return _minutes(self.start)

    @property
    def end_minute(self) -> int:
        return _minutes(self.end)

    @field_validator("days")
    @classmethod
    def _days_once(cls, days: list[str]) -> list[str]:
        for index, day in enumerate(days):
            if day in days[:index]:
                raise _At((index,), f"{day!r} is listed twice; list each weekday once")
        return days

    @model_validator(mode="after")
    def _start_before_end(self) -> Band:
        if self.start_minute >= self.end_minute:
            raise _At(
                ("end",),
                f"{self.end!r} is not after start {self.start!r}; a band must end later the "
                "same day (write a band across midnight as two: ... to '24:00' and '00:00' to ...)",
            )
        return self


class TimeOfUseEnergy(_Model):
    """Prices by local time of day and weekday; every 15 minutes of the week in one band.

    Bands sharing a name must share a price: they are one band written in several pieces
    (a peak band around an off-peak night) and are billed on one line.
    """

    kind: Literal["time_of_use"]
    bands: list[Band] = Field(min_length=1)
    _grid: list[int] = PrivateAttr(default_factory=list)  # band index per weekday slot

    @model_validator(mode="after")
    def _cover_the_week(self) -> TimeOfUseEnergy:
        for index, band in enumerate(self.bands):
            first = next(b for b in self.bands if b.name == band.name)
            if band.price_per_kwh != first.price_per_kwh:
                raise _At(
                    ("bands", index, "price_per_kwh"),
                    f"band {band.name!r} already costs {first.price_per_kwh}; bands sharing a "
                    "name must share a price (or give this one its own name)",
                )
        self._grid = _cover(self.bands)
        return self

    def band_at(self, local: datetime) -> Band:
        """The band holding a local (tariff time zone) wall-clock time."""
        minute = local.hour * 60 + local.minute
        return self.bands[self._grid[local.weekday() * SLOTS_PER_DAY + minute // STEP_MINUTES]]


def _cover(bands: list[Band]) -> list[int]:
    """Assign every weekday slot to its band, or raise naming the first overlap or gap."""
    owner: list[int | None] = [None] * (7 * SLOTS_PER_DAY)
    for index, band in enumerate(bands):
        for day_index, day in enumerate(WEEKDAYS):
            if day not in band.days:
                continue
            for slot in range(band.start_minute // STEP_MINUTES, band.end_minute // STEP_MINUTES):
                cell = day_index * SLOTS_PER_DAY + slot
                previous = owner[cell]
                if previous is not None:
                    raise _At(
                        ("bands", index),
                        f"{day} {_hhmm(slot * STEP_MINUTES)} is in both "
                        f"{bands[previous].name!r} and {band.name!r}; bands must not overlap",
                    )
                owner[cell] = index
    for cell, index in enumerate(owner):
        if index is None:
            day, slot = divmod(cell, SLOTS_PER_DAY)
            end = slot
            while end < SLOTS_PER_DAY and owner[day * SLOTS_PER_DAY + end] is None:
                end += 1
            raise _At(
                ("bands",),
                f"{WEEKDAYS[day]} {_hhmm(slot * STEP_MINUTES)}-{_hhmm(end * STEP_MINUTES)} is "
                "covered by no band; every 15 minutes of every weekday needs exactly one band",
            )
    return [index for index in owner if index is not None]


class Tier(_Model):
    """A price for the period's total energy up to ``up_to_kwh`` (None: unbounded)."""

    up_to_kwh: Annotated[Decimal, Field(gt=0, allow_inf_nan=False)] | None = None
    price_per_kwh: Price


class TieredEnergy(_Model):
    """Prices by the billing period's total energy: the first tier's kWh, then the next..."""

    kind: Literal["tiered"]
    tiers: list[Tier] = Field(min_length=1)

    @field_validator("tiers")
    @classmethod
    def _ascending(cls, tiers: list[Tier]) -> list[Tier]:
        previous = Decimal(0)
        for index, tier in enumerate(tiers[:-1]):
            if tier.up_to_kwh is None:
                raise _At(
                    (index, "up_to_kwh"),
                    "only the last tier may be unbounded; give this tier an upper bound",
                )
            if tier.up_to_kwh <= previous:
                raise _At(
                    (index, "up_to_kwh"),
                    f"{tier.up_to_kwh} is not above the previous tier's {previous}; "
                    "list tiers in ascending order",
                )
            previous = tier.up_to_kwh
        if tiers[-1].up_to_kwh is not None:
            raise _At(
                (len(tiers) - 1, "up_to_kwh"),
                f"the last tier must be unbounded (null), or energy above {tiers[-1].up_to_kwh} "
                "kWh would have no price",
            )
        return tiers


Energy = Annotated[FlatEnergy | TimeOfUseEnergy | TieredEnergy, Field(discriminator="kind")]


class DemandCharge(_Model):
    """A price per kW of the period's peak power (slot kWh x 4), see ``bill.compute_bill``.

    ``bands``: only slots in these time-of-use bands count towards the peak (None: every
    slot); allowed only with ``time_of_use`` energy, naming that version's bands.
    """

    price_per_kw: Price
    bands: list[str] | None = Field(default=None, min_length=1)


class TariffVersion(_Model):
    """A tariff's prices from ``effective_from`` (a local date; None: from the beginning)."""

    effective_from: date | None = None
    standing_charge_per_day: Price = Decimal(0)
    tax_rate: Annotated[Decimal, AfterValidator(_check_tax_rate)] = Decimal(0)
    energy: Energy
    demand: DemandCharge | None = None

    @model_validator(mode="after")
    def _demand_bands_exist(self) -> TariffVersion:
        if self.demand is None or self.demand.bands is None:
            return self
        if not isinstance(self.energy, TimeOfUseEnergy):
            raise _At(
                ("demand", "bands"),
                f"demand bands need time_of_use energy, and this energy is {self.energy.kind!r}; "
                "remove bands to charge the peak of every slot",
            )
        known = list(dict.fromkeys(band.name for band in self.energy.bands))
        for index, name in enumerate(self.demand.bands):
            if name not in known:
                raise _At(
                    ("demand", "bands", index),
                    f"{name!r} is not a band of this energy; known: {', '.join(map(repr, known))}",
                )
        return self


# The keys of a version that the old form writes at the tariff's top level.
_VERSION_KEYS = ("standing_charge_per_day", "tax_rate", "energy", "demand")


@dataclass(frozen=True)
class VersionSpan:
    """The version in force on the local days [first_day, last_day] (both included)."""

    index: int  # in ``Tariff.versions``
    version: TariffVersion
    first_day: date
    last_day: date


class Tariff(_Model):
    """What a kWh, a day of supply and tax cost, in one currency and local time zone.

    ``versions`` are in strictly ascending ``effective_from``; the first may omit it (from
    the beginning) and also prices any day before its date, so every day has a price.
    """

    id: Id
    name: str = ""
    currency: Annotated[str, AfterValidator(_check_currency)]
    time_zone: Annotated[str, AfterValidator(_check_zone)]
    versions: list[TariffVersion] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _one_version_form(cls, data: Any) -> Any:
        """The old form (prices at the top level, no ``versions``) is one version."""
        if not isinstance(data, dict):
            return data
        if "versions" in data:
            mixed = [key for key in _VERSION_KEYS if key in data]
            if mixed:
                raise _At(
                    (mixed[0],),
                    "is given beside versions; with versions, every price goes inside a "
                    "version (move it into the first one, or remove versions)",
                )
            return data
        moved = {key: data[key] for key in _VERSION_KEYS if key in data}
        rest = {key: value for key, value in data.items() if key not in _VERSION_KEYS}
        return {**rest, "versions": [moved]}

    @model_validator(mode="after")
    def _versions_ascending(self) -> Tariff:
        previous = self.versions[0].effective_from
        for index, version in enumerate(self.versions[1:], start=1):
            day = version.effective_from
            if day is None:
                raise _At(
                    ("versions", index, "effective_from"),
                    "is missing; only the first version may omit it (it applies from the "
                    "beginning): give the local date this one takes effect, like 2026-11-01",
                )
            if previous is not None and day <= previous:
                raise _At(
                    ("versions", index, "effective_from"),
                    f"{day} is not after the previous version's {previous}; list versions "
                    "in ascending order of effective_from, one version per date",
                )
            previous = day
        return self

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.time_zone)  # ZoneInfo caches instances by name

    def version_on(self, day: date) -> TariffVersion:
        """The version in force on a local date (the first one before its own date)."""
        return self.versions[self._index_on(day)]

    def _index_on(self, day: date) -> int:
        found = 0
        for index, version in enumerate(self.versions):
            if version.effective_from is None or version.effective_from <= day:
                found = index
        return found

    def versions_between(self, first_day: date, end_day: date) -> list[VersionSpan]:
        """The versions in force over the local days [first_day, end_day), in order.

        Contiguous spans covering the range; one span when no version starts inside it.
        """
        if end_day <= first_day:
            return []
        spans: list[VersionSpan] = []
        index = self._index_on(first_day)
        start = first_day
        while True:
            following = self.versions[index + 1] if index + 1 < len(self.versions) else None
            after = following.effective_from if following is not None else None
            if after is None or after >= end_day:
                spans.append(VersionSpan(index, self.versions[index], start, _day_before(end_day)))
                return spans
            spans.append(VersionSpan(index, self.versions[index], start, _day_before(after)))
            index, start = index + 1, after

    # The latest version's prices, for code written before versions. A bill prices each
    # day by the version in force then: use ``version_on`` or ``versions_between``.
    @property
    def latest(self) -> TariffVersion:
        return self.versions[-1]

    @property
    def standing_charge_per_day(self) -> Decimal:
        return self.latest.standing_charge_per_day

    @property
    def tax_rate(self) -> Decimal:
        return self.latest.tax_rate

    @property
    def energy(self) -> FlatEnergy | TimeOfUseEnergy | TieredEnergy:
        return self.latest.energy

    @property
    def demand(self) -> DemandCharge | None:
        return self.latest.demand


def _day_before(day: date) -> date:
    return date.fromordinal(day.toordinal() - 1)


class Account(_Model):
    """Who is billed; one bill per account, in one currency."""

    id: Id
    name: str = ""


class Device(_Model):
    """A metering logger, the account it bills to, where it is, and its tariff."""

    id: Id
    account: Id
    site: str = Field(min_length=1)
    tariff: Id


class Catalog(_Model):
    """All tariffs, accounts and devices; ``default_tariff`` bills devices not listed."""

    default_tariff: Id
    tariffs: list[Tariff] = Field(min_length=1)
    accounts: list[Account] = []
    devices: list[Device] = []
    _tariffs: dict[str, Tariff] = PrivateAttr(default_factory=dict)
    _devices: dict[str, Device] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _check_references(self) -> Catalog:
        tariffs = _by_id(self.tariffs, "tariffs")
        accounts = _by_id(self.accounts, "accounts")
        devices = _by_id(self.devices, "devices")
        if self.default_tariff not in tariffs:
            raise _At(("default_tariff",), _unknown("tariff", self.default_tariff, tariffs))
        billed_in: dict[str, int] = {}  # account -> index of the device that set its currency
        for index, device in enumerate(self.devices):
            if device.account not in accounts:
                raise _At(
                    (("devices", index, "account")), _unknown("account", device.account, accounts)
                )
            if device.tariff not in tariffs:
                raise _At(("devices", index, "tariff"), _unknown("tariff", device.tariff, tariffs))
            first = self.devices[billed_in.setdefault(device.account, index)]
            have, want = tariffs[first.tariff].currency, tariffs[device.tariff].currency
            if have != want:
                raise _At(
                    ("devices", index, "tariff"),
                    f"tariff {device.tariff!r} is in {want}, but account {device.account!r} is "
                    f"billed in {have} (device {first.id!r}, tariff {first.tariff!r}); one "
                    "account's bill has one currency",
                )
            have, want = tariffs[first.tariff].time_zone, tariffs[device.tariff].time_zone
            if have != want:
                raise _At(
                    ("devices", index, "tariff"),
                    f"tariff {device.tariff!r} bills months in {want}, but account "
                    f"{device.account!r} is billed in {have} (device {first.id!r}); one "
                    "account's bill covers one month, so its tariffs share a time zone",
                )
        self._tariffs, self._devices = tariffs, devices
        return self

    def tariff(self, tariff_id: str) -> Tariff:
        """The tariff with this id; KeyError if there is none."""
        try:
            return self._tariffs[tariff_id]
        except KeyError:
            raise KeyError(f"unknown tariff {tariff_id!r}") from None

    def device(self, device_id: str) -> Device | None:
        return self._devices.get(device_id)

    def devices_of(self, account_id: str) -> list[Device]:
        return [device for device in self.devices if device.account == account_id]

    def tariff_for(self, device_id: str) -> Tariff:
        """The device's tariff, or the default tariff for a device the catalog does not list."""
        device = self._devices.get(device_id)
        return self._tariffs[device.tariff if device else self.default_tariff]


def _by_id(items: list[Any], where: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for index, item in enumerate(items):
        if item.id in found:
            raise _At((where, index, "id"), f"{item.id!r} is already used; ids must be unique")
        found[item.id] = item
    return found


def _unknown(what: str, value: str, known: dict[str, Any]) -> str:
    return f"unknown {what} {value!r}; known: {', '.join(map(repr, known)) or 'none'}"


Loc = tuple[str | int, ...]


def version_fingerprint(version: TariffVersion) -> str:
    """A stable digest of a version's prices (not its date): equal prices, equal digest.

    Canonical JSON of the model with numbers normalised (0.30 and 0.3 are one price) and
    defaults filled in, so rewriting the YAML without changing a price keeps the digest.
    """
    data = version.model_dump(mode="python", exclude={"effective_from"})
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=_canonical)
    return hashlib.sha256(text.encode()).hexdigest()


def _canonical(value: Any) -> str:
    if isinstance(value, Decimal):
        return format(value.normalize(), "f")
    if isinstance(value, date):
        return value.isoformat()
    raise TypeError(f"cannot fingerprint {value!r}")


@dataclass(frozen=True)
class IssuedVersionUse:
    """A tariff version that priced (part of) a closed, issued period.

    ``effective_from`` identifies the version in its tariff; ``fingerprint`` is
    ``version_fingerprint`` of it when the bill was issued; ``period_end_local_date`` is the
    period's last local day (included).
    """

    tariff_id: str
    effective_from: date | None
    fingerprint: str
    period_label: str
    period_end_local_date: date
    bill_id: str


def closed_period_problems(
    catalog: Catalog, issued: Iterable[IssuedVersionUse]
) -> list[tuple[Loc, str]]:
    """What in ``catalog`` would change the price of a closed period, as (key path, fix).

    A problem when a version that priced a closed period is gone, or has other prices, or
    when a version that priced none of them would now be in force on a day of one (a new
    version dated on or before that period's last day). One problem per place, naming the
    earliest closed period concerned. Periods are local months (labels YYYY-MM); a label in
    another form is taken to start at the beginning.
    """
    uses = sorted(issued, key=lambda use: (use.period_end_local_date, use.bill_id))
    problems: dict[Loc, str] = {}
    by_tariff: dict[str, list[IssuedVersionUse]] = {}
    index_of = {tariff.id: index for index, tariff in enumerate(catalog.tariffs)}
    never = "a closed period never changes"
    for use in uses:
        by_tariff.setdefault(use.tariff_id, []).append(use)
        when = _from(use.effective_from)
        closed = f"closed period {use.period_label} (bill {use.bill_id})"
        if use.tariff_id not in index_of:
            problems.setdefault(
                ("tariffs",),
                f"tariff {use.tariff_id!r} priced {closed} and is no longer in the catalog; "
                f"{never}: put it back (add new versions to change its prices)",
            )
            continue
        position = index_of[use.tariff_id]
        tariff = catalog.tariffs[position]
        found = [
            index
            for index, version in enumerate(tariff.versions)
            if version.effective_from == use.effective_from
        ]
        if not found:
            problems.setdefault(
                ("tariffs", position, "versions"),
                f"the version {when} priced {closed} and is no longer in tariff "
                f"{tariff.id!r}; {never}: put it back, and add a new version with a later "
                "effective_from instead",
            )
        elif version_fingerprint(tariff.versions[found[0]]) != use.fingerprint:
            problems.setdefault(
                ("tariffs", position, "versions", found[0]),
                f"the version {when} priced {closed}; {never}: add a new version with a "
                "later effective_from instead",
            )
    for tariff_id, used in by_tariff.items():
        if tariff_id not in index_of:
            continue
        position = index_of[tariff_id]
        tariff = catalog.tariffs[position]
        known = {use.effective_from for use in used}
        for index, version in enumerate(tariff.versions):
            if version.effective_from in known:
                continue
            first = version.effective_from or date.min
            following = tariff.versions[index + 1] if index + 1 < len(tariff.versions) else None
            end = following.effective_from if following and following.effective_from else None
            for use in used:  # earliest period first
                overlaps = first <= use.period_end_local_date and (
                    end is None or end > _first_day(use.period_label)
                )
                if overlaps:
                    problems.setdefault(
                        ("tariffs", position, "versions", index, "effective_from"),
                        f"the new version {_from(version.effective_from)} would price days of "
                        f"closed period {use.period_label} (bill {use.bill_id}), which ends "
                        f"{use.period_end_local_date}; {never}: give it an effective_from "
                        f"after {use.period_end_local_date}",
                    )
                    break
    return list(problems.items())


def _from(day: date | None) -> str:
    return f"from {day}" if day is not None else "from the beginning"


def _first_day(label: str) -> date:
    match = re.fullmatch(r"(\d{4})-(\d{2})", label)
    return date(int(match[1]), int(match[2]), 1) if match else date.min


def describe_problem(problem: Any) -> tuple[tuple[str | int, ...], str]:
    """One pydantic error of ``Catalog.model_validate``: where (a key path) and what to change."""
    loc, kind, cause = tuple(problem["loc"]), problem["type"], problem.get("ctx", {}).get("error")
    if isinstance(cause, _At):
        loc, message = loc + cause.loc, cause.message
    elif isinstance(cause, ValueError):
        message = str(cause)
    elif kind == "missing":
        message = "is missing; add this key"
    elif kind == "extra_forbidden":
        message = "is not a known key here; check its spelling"
    elif kind.startswith("union_tag_"):
        loc, message = loc + ("kind",), f"must be {_ENERGY_KINDS}"
        if "tag" in problem.get("ctx", {}):
            message = f"{problem['ctx']['tag']!r} is not a kind of pricing; use {_ENERGY_KINDS}"
    else:
        value = problem["input"]
        shown = " (got nothing)" if value is None else f" (got {str(value)[:40]!r})"
        shown = "" if isinstance(value, dict | list) else shown
        message = f"{problem['msg']}{shown}"
    return loc, message


def key_path(loc: tuple[str | int, ...]) -> str:
    """('tariffs', 1, 'energy') -> 'tariffs[1].energy'."""
    return _path(loc)


def _path(loc: tuple[str | int, ...]) -> str:
    """('tariffs', 1, 'energy') -> 'tariffs[1].energy'."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text
