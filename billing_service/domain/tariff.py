"""Tariffs, accounts and devices: the billing catalog and its validation.

Pure domain code: the YAML file is read by ``billing_service.adapters.catalog_file``, which
hands the parsed mapping to ``Catalog.model_validate``. Money and prices are ``Decimal``,
from the numbers' text, so 0.30 is exactly 0.30. Every error says the key path and what to
change (``describe_problem``); the adapter adds the file and line, e.g.
``tariffs.yaml:14: tariffs[1].energy.bands[0].start: '07:10' is not a multiple of 15 minutes``.
"""

from __future__ import annotations

import re
from datetime import datetime
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


class Tariff(_Model):
    """What a kWh, a day of supply and tax cost, in one currency and local time zone."""

    id: Id
    name: str = ""
    currency: Annotated[str, AfterValidator(_check_currency)]
    time_zone: Annotated[str, AfterValidator(_check_zone)]
    standing_charge_per_day: Price = Decimal(0)
    tax_rate: Annotated[Decimal, AfterValidator(_check_tax_rate)] = Decimal(0)
    energy: Energy

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.time_zone)  # ZoneInfo caches instances by name


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
