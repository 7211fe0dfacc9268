"""Usage windows: boundaries, validation messages, and which window a reading lands in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from billing_service.domain.usage import (
    InvalidQuery,
    from_readings,
    from_slots,
    time_zone,
    window_starts,
)

UTC_ZONE = ZoneInfo("UTC")
T = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)


def test_fixed_windows_cover_the_range() -> None:
    starts = window_starts(T, T + timedelta(hours=1), "15m", UTC_ZONE, 100)
    assert starts == [T + timedelta(minutes=15 * i) for i in range(4)]


def test_days_follow_local_midnight_across_a_dst_change() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    start = datetime(2026, 10, 24, tzinfo=berlin).astimezone(UTC)
    end = datetime(2026, 10, 27, tzinfo=berlin).astimezone(UTC)
    starts = window_starts(start, end, "1d", berlin, 100)
    assert [s.astimezone(berlin).day for s in starts] == [24, 25, 26]
    assert starts[2] - starts[1] == timedelta(hours=25)  # 25 October has 25 hours


def test_hours_follow_a_half_hour_zone() -> None:
    kolkata = ZoneInfo("Asia/Kolkata")
    start = datetime(2026, 11, 22, 10, 30, tzinfo=UTC)  # 16:00 in Kolkata
    starts = window_starts(start, start + timedelta(hours=3), "1h", kolkata, 100)
    assert [s.astimezone(kolkata).hour for s in starts] == [16, 17, 18]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((T, T + timedelta(hours=1), "2h"), "use one of 1m, 5m, 15m, 1h, 1d"),
        ((T, T, "1h"), "must be after start"),
        ((T + timedelta(minutes=7), T + timedelta(hours=1), "15m"), "use for example"),
        ((T, T + timedelta(minutes=50), "1h"), "end 2026-11-22T10:50:00+00:00 is not on a 1h"),
        ((T, T + timedelta(days=30), "1m"), "43200 windows of 1m, more than the limit of 10000"),
    ],
)
def test_invalid_queries_say_what_to_change(args, message: str) -> None:
    with pytest.raises(InvalidQuery) as caught:
        window_starts(*args, UTC_ZONE, 10_000)
    assert message in str(caught.value)


def test_a_too_large_query_suggests_larger_windows() -> None:
    with pytest.raises(InvalidQuery) as caught:
        window_starts(T, T + timedelta(days=30), "1m", UTC_ZONE, 10_000)
    assert "1h gives 720" in str(caught.value) and "1d gives 30" in str(caught.value)


def test_unknown_time_zone() -> None:
    with pytest.raises(InvalidQuery, match="not an IANA time zone"):
        time_zone("Mars/Base")


def test_a_reading_counts_in_the_window_where_its_interval_ends() -> None:
    starts = window_starts(T, T + timedelta(minutes=3), "1m", UTC_ZONE, 100)
    readings = [
        (T, 1),  # interval ended at 10:00: before the range
        (T + timedelta(seconds=30), 10),
        (T + timedelta(minutes=1), 20),  # ends the first window
        (T + timedelta(minutes=1, microseconds=1), 40),
        (T + timedelta(minutes=3), 80),  # ends the last window
    ]
    buckets = from_readings(starts, readings)
    assert [(b.count, b.sum_milliwh, b.min_milliwh, b.max_milliwh) for b in buckets] == [
        (2, 30, 10, 20),
        (1, 40, 40, 40),
        (1, 80, 80, 80),
    ]


def test_slots_sum_into_hours_with_min_and_max() -> None:
    starts = window_starts(T, T + timedelta(hours=2), "1h", UTC_ZONE, 100)
    rows = [
        (T, 2, 300, 100, 200),
        (T + timedelta(minutes=45), 1, 50, 50, 50),
        (T + timedelta(hours=1, minutes=15), 3, 900, 200, 400),
    ]
    buckets = from_slots(starts, rows)
    assert [(b.count, b.sum_milliwh, b.min_milliwh, b.max_milliwh) for b in buckets] == [
        (3, 350, 50, 200),
        (3, 900, 200, 400),
    ]
