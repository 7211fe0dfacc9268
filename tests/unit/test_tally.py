"""Analytics tally: a reading counts once; active devices age out of the window."""

from __future__ import annotations

from datetime import UTC, datetime

from analytics_service.domain.tally import Tally
from common.models import validate_reading

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def reading(device: str, minute: int):
    return validate_reading(device, NOW.replace(hour=11, minute=minute), 1.0, now=NOW)


def test_a_repeat_counts_once_inside_the_window() -> None:
    clock = Clock()
    tally = Tally(dedupe_window_s=60, max_remembered=100, active_window_s=900, clock=clock)
    assert tally.record(reading("a", 1)) is True
    assert tally.record(reading("a", 1)) is False
    assert tally.record(reading("a", 2)) is True
    clock.now += 61
    assert tally.record(reading("a", 1)) is True  # outside the window: remembered no more


def test_active_devices_age_out() -> None:
    clock = Clock()
    tally = Tally(dedupe_window_s=60, max_remembered=100, active_window_s=900, clock=clock)
    tally.record(reading("a", 1))
    clock.now += 600
    tally.record(reading("b", 1))
    assert tally.active_devices() == 2
    clock.now += 301
    assert tally.active_devices() == 1
    clock.now += 600
    assert tally.active_devices() == 0


def test_memory_is_bounded() -> None:
    tally = Tally(dedupe_window_s=3600, max_remembered=10, active_window_s=900, clock=Clock())
    for minute in range(50):
        tally.record(reading("a", minute))
    assert len(tally._seen) == 10
