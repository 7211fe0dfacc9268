"""The tariff catalog: the sample file loads, and every mistake is reported at its line and key."""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from pathlib import Path

import pytest

from billing_service.adapters.catalog_file import load_catalog, parse_catalog
from billing_service.domain.tariff import (
    CatalogError,
    FlatEnergy,
    TieredEnergy,
    TimeOfUseEnergy,
    minor_units,
)

SAMPLE = Path(__file__).resolve().parents[2] / "deployments" / "tariffs.yaml"

# A small valid catalog; each error case edits one piece of it. The line the error must
# name carries the comment "# <-" in the edited text.
BASE = """\
default_tariff: flat
tariffs:
  - id: flat
    currency: EUR
    time_zone: Europe/Berlin
    standing_charge_per_day: 0.45
    tax_rate: 0.19
    energy:
      kind: flat
      price_per_kwh: 0.32
  - id: tou
    currency: EUR
    time_zone: Europe/Berlin
    energy:
      kind: time_of_use
      bands:
        - name: night
          price_per_kwh: 0.15
          days: [mon, tue, wed, thu, fri]
          start: "00:00"
          end: "07:00"
        - name: day
          price_per_kwh: 0.30
          days: [mon, tue, wed, thu, fri]
          start: "07:00"
          end: "24:00"
        - name: weekend
          price_per_kwh: 0.20
          days: [sat, sun]
          start: "00:00"
          end: "24:00"
  - id: tiers
    currency: USD
    time_zone: America/New_York
    energy:
      kind: tiered
      tiers:
        - up_to_kwh: 500
          price_per_kwh: 0.14
        - up_to_kwh: 1000
          price_per_kwh: 0.18
        - up_to_kwh: null
          price_per_kwh: 0.24
accounts:
  - id: acct-1
  - id: acct-2
devices:
  - id: meter-001
    account: acct-1
    site: shop
    tariff: flat
  - id: meter-002
    account: acct-1
    site: store room
    tariff: tou
  - id: meter-003
    account: acct-2
    site: deli
    tariff: tiers
"""


def edited(old: str, new: str) -> str:
    assert BASE.count(old) == 1, f"{old!r} must occur once in BASE"
    return BASE.replace(old, new)


def marked_line(text: str) -> int:
    (line,) = [n for n, row in enumerate(text.splitlines(), 1) if "# <-" in row]
    return line


def test_the_sample_catalog_loads() -> None:
    catalog = load_catalog(SAMPLE)
    assert catalog.default_tariff == "standard"
    standard = catalog.tariff("standard")
    assert (standard.currency, standard.time_zone) == ("EUR", "Europe/Berlin")
    first, changed = standard.versions  # the price change of 16 November 2026
    assert first.effective_from is None and changed.effective_from == date(2026, 11, 16)
    assert first.energy == FlatEnergy(kind="flat", price_per_kwh=Decimal("0.32"))
    assert changed.energy == FlatEnergy(kind="flat", price_per_kwh=Decimal("0.29"))
    assert (first.standing_charge_per_day, first.tax_rate) == (Decimal("0.45"), Decimal("0.19"))
    demand = catalog.tariff("business-demand").demand
    assert demand is not None and demand.price_per_kw == Decimal("8.50")
    economy7 = catalog.tariff("peak-offpeak").energy
    assert isinstance(economy7, TimeOfUseEnergy)
    assert {band.name for band in economy7.bands} == {"peak", "off-peak"}
    assert str(economy7.bands[0].price_per_kwh) == "0.30"  # as written, not float 0.3
    tiered = catalog.tariff("tiered-residential").energy
    assert isinstance(tiered, TieredEnergy)
    assert [tier.up_to_kwh for tier in tiered.tiers] == [Decimal(500), Decimal(1000), None]
    assert len(catalog.accounts) == 3 and len(catalog.devices) == 6
    assert catalog.tariff_for("meter-002").id == "business-demand"
    meter = catalog.device("meter-001")
    assert meter is not None and meter.tariff == "standard"
    assert [d.id for d in catalog.devices_of(meter.account)] == ["meter-001", "meter-002"]
    assert catalog.tariff_for("meter-003").id == "peak-offpeak"
    assert catalog.tariff_for("meter-999").id == "standard"  # not listed: the default
    assert catalog.device("meter-999") is None


def test_lookup_of_an_unknown_tariff_names_it() -> None:
    with pytest.raises(KeyError, match="nope"):
        parse_catalog(BASE, "t.yaml").tariff("nope")


def test_minor_units() -> None:
    assert [minor_units(c) for c in ("EUR", "USD", "JPY", "KRW", "KWD", "TND")] == [
        2,
        2,
        0,
        0,
        3,
        3,
    ]


def test_an_unquoted_time_is_a_time_not_a_base_60_number() -> None:
    # YAML 1.1 reads 17:00 as the integer 1020; the catalog reads it as the time.
    text = edited('start: "07:00"', "start: 07:00").replace('end: "07:00"', "end: 07:00")
    bands = parse_catalog(text, "t.yaml").tariff("tou").energy.bands
    assert (bands[0].end, bands[1].start) == ("07:00", "07:00")


CASES = {
    "gap": (
        ('start: "07:00"', 'start: "07:15"'),
        ("      bands:", "      bands:  # <-"),
        "tariffs[1].energy.bands: mon 07:00-07:15 is covered by no band",
    ),
    "gap on one weekday": (
        (
            'days: [mon, tue, wed, thu, fri]\n          start: "00:00"',
            'days: [mon, wed, thu, fri]\n          start: "00:00"',
        ),
        ("      bands:", "      bands:  # <-"),
        "tariffs[1].energy.bands: tue 00:00-07:00 is covered by no band",
    ),
    "overlap": (
        ('start: "07:00"', 'start: "06:45"'),
        ("        - name: day", "        - name: day  # <-"),
        "tariffs[1].energy.bands[1]: mon 06:45 is in both 'night' and 'day'",
    ),
    "not a multiple of 15 minutes": (
        ('start: "07:00"', 'start: "07:10"  # <-'),
        None,
        "tariffs[1].energy.bands[1].start: '07:10' is not a multiple of 15 minutes",
    ),
    "band ends before it starts": (
        ('end: "07:00"', 'end: "00:00"  # <-'),
        None,
        "tariffs[1].energy.bands[0].end: '00:00' is not after start '00:00'",
    ),
    "unknown key": (
        ("price_per_kwh: 0.20", "price_per_kwh: 0.20\n          x: 1  # <-"),
        None,
        "tariffs[1].energy.bands[2].x: is not a known key here",
    ),
    "bad weekday": (
        ("days: [sat, sun]", "days: [sat, Sunday]  # <-"),
        None,
        "tariffs[1].energy.bands[2].days[1]: Input should be 'mon', 'tue'",
    ),
    "bad currency": (
        ("currency: USD", "currency: usd  # <-"),
        None,
        "tariffs[2].currency: 'usd' is not an ISO 4217 code",
    ),
    "unknown time zone": (
        ("America/New_York", "America/Nowhere  # <-"),
        None,
        "tariffs[2].time_zone: 'America/Nowhere' is not a known IANA time zone",
    ),
    "tax rate as a percentage": (
        ("tax_rate: 0.19", "tax_rate: 19  # <-"),
        None,
        "tariffs[0].tax_rate: 19 is not a fraction in [0, 1); write 19% as 0.19",
    ),
    "negative price": (
        ("price_per_kwh: 0.32", "price_per_kwh: -0.32  # <-"),
        None,
        "tariffs[0].energy.price_per_kwh: Input should be greater than or equal to 0",
    ),
    "unknown kind": (
        ("kind: flat", "kind: flatrate  # <-"),
        None,
        "tariffs[0].energy.kind: 'flatrate' is not a kind of pricing",
    ),
    "tiers not ascending": (
        ("up_to_kwh: 1000", "up_to_kwh: 400  # <-"),
        None,
        "tariffs[2].energy.tiers[1].up_to_kwh: 400 is not above the previous tier's 500",
    ),
    "last tier bounded": (
        ("up_to_kwh: null", "up_to_kwh: 2000  # <-"),
        None,
        "tariffs[2].energy.tiers[2].up_to_kwh: the last tier must be unbounded",
    ),
    "unknown tariff": (
        ("tariff: tiers", "tariff: tiered  # <-"),
        None,
        "devices[2].tariff: unknown tariff 'tiered'; known: 'flat', 'tou', 'tiers'",
    ),
    "unknown account": (
        ("account: acct-2", "account: acct-3  # <-"),
        None,
        "devices[2].account: unknown account 'acct-3'; known: 'acct-1', 'acct-2'",
    ),
    "unknown default tariff": (
        ("default_tariff: flat", "default_tariff: standard  # <-"),
        None,
        "default_tariff: unknown tariff 'standard'",
    ),
    "duplicate id": (
        ("  - id: acct-2", "  - id: acct-1  # <-"),
        None,
        "accounts[1].id: 'acct-1' is already used",
    ),
    "mixed currencies on one account": (
        ("account: acct-2", "account: acct-1"),
        ("tariff: tiers", "tariff: tiers  # <-"),
        "devices[2].tariff: tariff 'tiers' is in USD, but account 'acct-1' is billed in EUR",
    ),
    "missing key": (
        ("      kind: flat\n      price_per_kwh: 0.32\n", "      kind: flat\n"),
        (
            "    energy:\n      kind: flat\n",
            "    energy:  # <- the mapping's key\n      kind: flat\n",
        ),
        "tariffs[0].energy.price_per_kwh: is missing",
    ),
    "missing top-level key": (
        ("default_tariff: flat\n", ""),
        ("tariffs:\n", "tariffs:  # <-\n"),
        "default_tariff: is missing",
    ),
    "YAML syntax error": (
        ("site: store room", "site: store: room  # <-"),
        None,
        "invalid YAML at column 16: mapping values are not allowed here",
    ),
    "duplicate YAML key": (
        ("    site: deli", "    site: deli\n    site: kitchen  # <-"),
        None,
        "'site' is given twice in this mapping (also line",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_each_error_names_its_line_and_key_path(case: str) -> None:
    (old, new), marker, message = CASES[case]
    text = edited(old, new)
    if marker:
        text = text.replace(*marker, 1)
    with pytest.raises(CatalogError) as caught:
        parse_catalog(text, "tariffs.yaml")
    first = str(caught.value).splitlines()[0]
    assert first.startswith(f"tariffs.yaml:{marked_line(text)}: "), first
    assert message in first, first


def test_same_band_name_needs_same_price() -> None:
    text = edited(
        "- name: weekend\n          price_per_kwh: 0.20",
        "- name: day\n          price_per_kwh: 0.25  # <-",
    )
    with pytest.raises(CatalogError) as caught:
        parse_catalog(text, "t.yaml")
    assert str(caught.value) == (
        f"t.yaml:{marked_line(text)}: tariffs[1].energy.bands[2].price_per_kwh: band 'day' "
        "already costs 0.30; bands sharing a name must share a price "
        "(or give this one its own name)"
    )


def test_every_problem_is_listed() -> None:
    text = edited("currency: USD", "currency: usd").replace("America/New_York", "Nowhere")
    with pytest.raises(CatalogError) as caught:
        parse_catalog(text, "t.yaml")
    assert [row.split(": ")[1] for row in str(caught.value).splitlines()] == [
        "tariffs[2].currency",
        "tariffs[2].time_zone",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "t.yaml:1: the file is empty"),
        ("- a\n- b\n", "t.yaml:1: (top level): Input should be a valid dictionary"),
        (
            "# nothing\ndefault_tariff: x\ntariffs: []\n",
            "t.yaml:3: tariffs: List should have at least 1",
        ),
        ("a: 1\n\x07", "t.yaml:2: invalid YAML: unacceptable character #x0007"),
    ],
)
def test_whole_file_problems(text: str, message: str) -> None:
    with pytest.raises(CatalogError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        parse_catalog(text, "t.yaml")


def test_a_missing_file_is_a_catalog_error(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="cannot read the tariff catalog"):
        load_catalog(tmp_path / "absent.yaml")


def test_load_reports_the_path(tmp_path: Path) -> None:
    path = tmp_path / "tariffs.yaml"
    path.write_text(edited("currency: USD", "currency: US"), encoding="utf-8")
    with pytest.raises(CatalogError, match=f"^{path}:33: tariffs\\[2\\].currency: 'US'"):
        load_catalog(path)


def test_an_account_whose_tariffs_differ_in_time_zone_is_refused() -> None:
    text = """
default_tariff: a
tariffs:
  - {id: a, currency: EUR, time_zone: Europe/Berlin, energy: {kind: flat, price_per_kwh: "0.3"}}
  - {id: b, currency: EUR, time_zone: Europe/Lisbon, energy: {kind: flat, price_per_kwh: "0.3"}}
accounts:
  - {id: acme}
devices:
  - {id: m1, account: acme, site: s, tariff: a}
  - {id: m2, account: acme, site: s, tariff: b}
"""
    with pytest.raises(CatalogError) as caught:
        parse_catalog(text, "zones.yaml")
    assert "zones.yaml:10: devices[1].tariff" in str(caught.value)
    assert "share a time zone" in str(caught.value)
