"""Validation of readings: each rejected case names its field and says what to do."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.models import (
    DEFAULT_LIMITS,
    ID_PATTERN,
    READING_ID_NAMESPACE,
    InvalidReading,
    Limits,
    derive_reading_id,
    utc_isoformat,
    validate_reading,
)

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
T = datetime(2026, 11, 22, 11, 0, tzinfo=UTC)


def check(device_id="meter-1", timestamp=T, usage_kwh=1.5, reading_id="", limits=DEFAULT_LIMITS):
    return validate_reading(device_id, timestamp, usage_kwh, reading_id, now=NOW, limits=limits)


def test_valid_reading_is_normalised_to_utc_with_a_derived_id() -> None:
    local = T.astimezone(timezone(timedelta(hours=2)))
    reading = check(timestamp=local)
    assert reading.timestamp == T and reading.timestamp.tzinfo == UTC
    assert reading.reading_id == derive_reading_id("meter-1", T)
    assert reading.usage_milliwh == 1_500_000


@pytest.mark.parametrize(
    ("kwargs", "field", "hint"),
    [
        ({"device_id": ""}, "device_id", "is empty"),
        ({"device_id": "meter 1"}, "device_id", "A-Z a-z 0-9"),
        ({"device_id": "x" * 129}, "device_id", "129 characters"),
        ({"device_id": "-meter"}, "device_id", "starting with a letter or digit"),
        ({"reading_id": "a/b"}, "reading_id", "leave it empty"),
        ({"timestamp": None}, "timestamp", "is missing"),
        ({"timestamp": datetime(2026, 11, 22, 11)}, "timestamp", "no time zone"),
        ({"timestamp": datetime(1999, 12, 31, 23, 59, tzinfo=UTC)}, "timestamp", "before 2000"),
        ({"timestamp": NOW + timedelta(minutes=16)}, "timestamp", "ahead of the server clock"),
        ({"usage_kwh": math.nan}, "usage_kwh", "finite"),
        ({"usage_kwh": math.inf}, "usage_kwh", "finite"),
        ({"usage_kwh": -0.001}, "usage_kwh", "cannot be negative"),
        ({"usage_kwh": 1e7}, "usage_kwh", "kWh, not Wh"),
    ],
)
def test_rejections_name_the_field_and_the_fix(kwargs, field, hint) -> None:
    with pytest.raises(InvalidReading) as caught:
        check(**kwargs)
    assert caught.value.field == field
    assert hint in str(caught.value)
    assert str(caught.value).startswith(f"{field}: ")


def test_an_oversized_id_is_not_echoed_in_full() -> None:
    with pytest.raises(InvalidReading) as caught:
        check(device_id="x" * 100_000)
    assert len(str(caught.value)) < 300


def test_limits_are_settings() -> None:
    generous = Limits(max_usage_kwh=1e8, max_future_skew=timedelta(hours=2))
    assert check(usage_kwh=1e7, limits=generous).usage_kwh == 1e7
    assert check(timestamp=NOW + timedelta(hours=1), limits=generous)


def test_edges_are_accepted() -> None:
    assert check(usage_kwh=0.0).usage_kwh == 0.0
    assert check(timestamp=datetime(2000, 1, 1, tzinfo=UTC))
    assert check(timestamp=NOW + timedelta(minutes=15))
    assert check(device_id="A" * 128, reading_id="r:1.2_3-4")


def test_reading_id_is_deterministic_per_device_and_instant() -> None:
    same = derive_reading_id("meter-1", T)
    assert same == derive_reading_id("meter-1", T.astimezone(timezone(timedelta(hours=-5))))
    assert same != derive_reading_id("meter-2", T)
    assert same != derive_reading_id("meter-1", T + timedelta(microseconds=1))
    # Pinned: changing the derivation would make resent readings bill twice.
    assert same == "2ee00b42-377c-5f23-b3b6-7b408bb847f7"


def test_a_given_reading_id_is_kept() -> None:
    assert check(reading_id="logger-42:seq-7").reading_id == "logger-42:seq-7"


def test_energy_is_converted_to_exact_integer_milliwatt_hours() -> None:
    assert check(usage_kwh=0.1).usage_milliwh + check(usage_kwh=0.2).usage_milliwh == 300_000


# Ids of readings resent years apart must match: the derivation is uuid5, bit for bit.
@given(
    device_id=st.from_regex(ID_PATTERN, fullmatch=True),
    timestamp=st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
    ),
)
def test_a_derived_id_is_the_uuid5_of_device_and_instant(device_id: str, timestamp: datetime):
    instant = timestamp.isoformat(timespec="microseconds")
    expected = str(uuid.uuid5(READING_ID_NAMESPACE, f"{device_id}|{instant}"))
    assert derive_reading_id(device_id, timestamp) == expected


# The text of an instant is cached by the instant; equal instants in other zones are equal
# keys, so whichever comes first, the text must be UTC's.
@given(
    timestamp=st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
    ),
    offset_minutes=st.integers(min_value=-14 * 60, max_value=14 * 60),
    zoned_first=st.booleans(),
)
def test_an_instants_text_is_utc_whatever_zone_asked_first(
    timestamp: datetime, offset_minutes: int, zoned_first: bool
) -> None:
    zoned = timestamp.astimezone(timezone(timedelta(minutes=offset_minutes)))
    expected = timestamp.isoformat(timespec="microseconds")
    for instant in (zoned, timestamp) if zoned_first else (timestamp, zoned):
        assert utc_isoformat(instant) == expected
