"""Tariff versions: the old one-version form, validation at file:line, closed periods."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

import pytest

from billing_service.adapters.catalog_file import locate_problems, parse_catalog
from billing_service.domain.tariff import (
    CatalogError,
    FlatEnergy,
    IssuedVersionUse,
    TimeOfUseEnergy,
    closed_period_problems,
    version_fingerprint,
)

# "oslo" has three versions: from the beginning, from 2026-10-01 and from 2026-11-15.
VERSIONED = """\
default_tariff: oslo
tariffs:
  - id: old-form
    currency: EUR
    time_zone: Europe/Berlin
    standing_charge_per_day: 0.45
    tax_rate: 0.19
    energy: {kind: flat, price_per_kwh: 0.32}
  - id: oslo
    currency: NOK
    time_zone: Europe/Oslo
    versions:
      - standing_charge_per_day: 4.50
        tax_rate: 0.25
        energy: {kind: flat, price_per_kwh: 1.10}
      - effective_from: 2026-10-01
        standing_charge_per_day: 4.50
        tax_rate: 0.25
        energy:
          kind: time_of_use
          bands:
            - {name: day, price_per_kwh: 1.40, start: "06:00", end: "22:00"}
            - {name: night, price_per_kwh: 0.90, start: "00:00", end: "06:00"}
            - {name: night, price_per_kwh: 0.90, start: "22:00", end: "24:00"}
        demand: {price_per_kw: 30, bands: [day]}
      - effective_from: 2026-11-15
        standing_charge_per_day: 5.00
        tax_rate: 0.25
        energy: {kind: flat, price_per_kwh: 1.20}
"""


def edited(old: str, new: str) -> str:
    assert VERSIONED.count(old) == 1, f"{old!r} must occur once"
    return VERSIONED.replace(old, new)


def marked_line(text: str) -> int:
    (line,) = [n for n, row in enumerate(text.splitlines(), 1) if "# <-" in row]
    return line


def test_the_old_form_loads_as_one_version_from_the_beginning() -> None:
    tariff = parse_catalog(VERSIONED, "t.yaml").tariff("old-form")
    (version,) = tariff.versions
    assert version.effective_from is None
    assert version.energy == FlatEnergy(kind="flat", price_per_kwh=Decimal("0.32"))
    assert tariff.energy is version.energy  # the latest version's, for older code
    assert str(version.standing_charge_per_day) == "0.45" and str(version.tax_rate) == "0.19"
    assert version.demand is None
    assert tariff.version_on(date(1999, 1, 1)) is version


def test_versions_in_force_by_local_date() -> None:
    oslo = parse_catalog(VERSIONED, "t.yaml").tariff("oslo")
    first, second, third = oslo.versions
    assert oslo.version_on(date(2026, 9, 30)) is first
    assert oslo.version_on(date(2026, 10, 1)) is second
    assert oslo.version_on(date(2026, 11, 14)) is second
    assert oslo.version_on(date(2026, 11, 15)) is third
    # November: 1-14 under the second version, 15-30 under the third.
    spans = oslo.versions_between(date(2026, 11, 1), date(2026, 12, 1))
    assert [(s.index, s.first_day, s.last_day) for s in spans] == [
        (1, date(2026, 11, 1), date(2026, 11, 14)),
        (2, date(2026, 11, 15), date(2026, 11, 30)),
    ]
    # October: one span, the second version from its first day.
    (october,) = oslo.versions_between(date(2026, 10, 1), date(2026, 11, 1))
    assert (october.index, october.last_day) == (1, date(2026, 10, 31))
    # The latest version's prices, for code that reads a tariff's prices directly.
    assert oslo.energy == third.energy and str(oslo.standing_charge_per_day) == "5.00"
    demand = second.demand
    assert demand is not None and demand.bands == ["day"]
    assert isinstance(second.energy, TimeOfUseEnergy)


ERRORS = {
    "a later version without a date": (
        ("      - effective_from: 2026-11-15\n", "      - standing_charge_per_day: 5.00  # <-\n"),
        (
            "        standing_charge_per_day: 5.00\n        tax_rate: 0.25\n"
            "        energy: {kind: flat",
            "        tax_rate: 0.25\n        energy: {kind: flat",
        ),
        "tariffs[1].versions[2].effective_from: is missing; only the first version may omit it",
    ),
    "versions out of order": (
        ("effective_from: 2026-11-15", "effective_from: 2026-09-15  # <-"),
        None,
        "tariffs[1].versions[2].effective_from: 2026-09-15 is not after the previous "
        "version's 2026-10-01; list versions in ascending order",
    ),
    "two versions on one date": (
        ("effective_from: 2026-11-15", "effective_from: 2026-10-01  # <-"),
        None,
        "tariffs[1].versions[2].effective_from: 2026-10-01 is not after the previous",
    ),
    "prices beside versions": (
        ("    time_zone: Europe/Oslo\n", "    time_zone: Europe/Oslo\n    tax_rate: 0.25  # <-\n"),
        None,
        "tariffs[1].tax_rate: is given beside versions; with versions, every price goes "
        "inside a version",
    ),
    "no version": (
        (
            "    versions:\n      - standing_charge_per_day: 4.50\n        tax_rate: 0.25\n"
            "        energy: {kind: flat, price_per_kwh: 1.10}\n"
            "      - effective_from: 2026-10-01\n",
            "    versions: []  # <-\n    old:\n      - effective_from: 2026-10-01\n",
        ),
        None,
        "tariffs[1].versions: List should have at least 1 item",
    ),
    "a demand band that is not a band": (
        ("bands: [day]}", "bands: [day, peak]}  # <-"),
        None,
        "tariffs[1].versions[1].demand.bands[1]: 'peak' is not a band of this energy; "
        "known: 'day', 'night'",
    ),
    "demand bands with flat energy": (
        (
            "energy: {kind: flat, price_per_kwh: 1.20}",
            "energy: {kind: flat, price_per_kwh: 1.20}\n        demand: {price_per_kw: 30, "
            "bands: [day]}  # <-",
        ),
        None,
        "tariffs[1].versions[2].demand.bands: demand bands need time_of_use energy, and this "
        "energy is 'flat'",
    ),
    # The old form keeps its key paths: no versions[0] in them, and the line of the key.
    "old form: a bad price": (
        ("price_per_kwh: 0.32}", "price_per_kwh: -0.32}  # <-"),
        None,
        "tariffs[0].energy.price_per_kwh: Input should be greater than or equal to 0",
    ),
    "old form: an unknown key": (
        ("    tax_rate: 0.19\n", "    tax_rate: 0.19\n    effective_from: 2026-01-01  # <-\n"),
        None,
        "tariffs[0].effective_from: is not a known key here",
    ),
}


@pytest.mark.parametrize("case", ERRORS)
def test_version_errors_name_their_line_and_key_path(case: str) -> None:
    (old, new), second, message = ERRORS[case]
    text = edited(old, new)
    if second:
        assert text.count(second[0]) == 1
        text = text.replace(*second)
    with pytest.raises(CatalogError) as caught:
        parse_catalog(text, "tariffs.yaml")
    first = str(caught.value).splitlines()[0]
    assert first.startswith(f"tariffs.yaml:{marked_line(text)}: {message}"), first


def test_the_fingerprint_is_of_the_prices_as_numbers() -> None:
    oslo = parse_catalog(VERSIONED, "t.yaml").tariff("oslo")
    rewritten = parse_catalog(
        VERSIONED.replace("standing_charge_per_day: 5.00", "standing_charge_per_day: 5"), "t"
    ).tariff("oslo")
    repriced = parse_catalog(
        VERSIONED.replace("price_per_kwh: 1.20", "price_per_kwh: 1.25"), "t"
    ).tariff("oslo")
    fingerprint = version_fingerprint(oslo.versions[2])
    assert len(fingerprint) == 64
    assert version_fingerprint(rewritten.versions[2]) == fingerprint  # 5.00 is 5
    assert version_fingerprint(repriced.versions[2]) != fingerprint
    assert version_fingerprint(oslo.versions[1]) != fingerprint


def issued_october() -> list[IssuedVersionUse]:
    """Bills issued for September (first version) and October (second) of tariff oslo."""
    oslo = parse_catalog(VERSIONED, "t.yaml").tariff("oslo")
    return [
        IssuedVersionUse(
            "oslo", None, version_fingerprint(oslo.versions[0]), "2026-09",
            date(2026, 9, 30), "ACC-2026-09",
        ),
        IssuedVersionUse(
            "oslo", date(2026, 10, 1), version_fingerprint(oslo.versions[1]), "2026-10",
            date(2026, 10, 31), "ACC-2026-10",
        ),
    ]  # fmt: skip


def problems_of(text: str) -> list[str]:
    catalog = parse_catalog(text, "tariffs.yaml")
    return locate_problems(text, "tariffs.yaml", closed_period_problems(catalog, issued_october()))


def test_the_unchanged_catalog_has_no_closed_period_problem() -> None:
    assert problems_of(VERSIONED) == []
    # A version after the last closed day is the way to change prices.
    assert problems_of(edited("effective_from: 2026-11-15", "effective_from: 2026-11-01")) == []


def test_a_changed_version_of_a_closed_period() -> None:
    text = edited("{name: day, price_per_kwh: 1.40,", "{name: day, price_per_kwh: 1.45,")
    text = text.replace(
        "      - effective_from: 2026-10-01", "      - effective_from: 2026-10-01  # <-"
    )
    assert problems_of(text) == [
        f"tariffs.yaml:{marked_line(text)}: tariffs[1].versions[1]: the version from 2026-10-01 "
        "priced closed period 2026-10 (bill ACC-2026-10); a closed period never changes: add "
        "a new version with a later effective_from instead"
    ]


def test_a_removed_version_of_a_closed_period() -> None:
    text = edited(
        "      - standing_charge_per_day: 4.50\n        tax_rate: 0.25\n"
        "        energy: {kind: flat, price_per_kwh: 1.10}\n",
        "",
    )
    text = text.replace("    versions:", "    versions:  # <-")
    assert problems_of(text) == [
        f"tariffs.yaml:{marked_line(text)}: tariffs[1].versions: the version from the "
        "beginning priced closed period 2026-09 (bill ACC-2026-09) and is no longer in tariff "
        "'oslo'; a closed period never changes: put it back, and add a new version with a "
        "later effective_from instead"
    ]


def test_a_new_version_inside_a_closed_period() -> None:
    # A version from 2026-10-20 would price 20-31 October, already billed.
    text = edited(
        "      - effective_from: 2026-11-15\n",
        "      - effective_from: 2026-10-20  # <-\n"
        "        energy: {kind: flat, price_per_kwh: 1.00}\n"
        "      - effective_from: 2026-11-15\n",
    )
    assert problems_of(text) == [
        f"tariffs.yaml:{marked_line(text)}: tariffs[1].versions[2].effective_from: the new "
        "version from 2026-10-20 would price days of closed period 2026-10 (bill "
        "ACC-2026-10), which ends 2026-10-31; a closed period never changes: give it an "
        "effective_from after 2026-10-31"
    ]


def test_an_unused_early_version_before_every_closed_period_is_no_problem() -> None:
    # Only October was issued; the first version ends on 30 September, before it.
    only_october = issued_october()[1:]
    catalog = parse_catalog(VERSIONED, "t.yaml")
    assert closed_period_problems(catalog, only_october) == []


def test_a_removed_tariff_of_a_closed_period() -> None:
    text = VERSIONED.replace("default_tariff: oslo", "default_tariff: old-form")
    text = text[: text.index("  - id: oslo")]
    (problem,) = problems_of(text)
    assert problem.startswith(
        "tariffs.yaml:2: tariffs: tariff 'oslo' priced closed period 2026-09 (bill "
        "ACC-2026-09) and is no longer in the catalog"
    ), problem
