"""Analytics tally: a reading counts once; devices turn active, silent, forgotten; top-N."""

from __future__ import annotations

from datetime import UTC, datetime

from analytics_service.domain.tally import Tally, Windows
from common.models import validate_reading

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def reading(device: str, minute: int, kwh: float = 1.0):
    return validate_reading(device, NOW.replace(hour=11, minute=minute), kwh, now=NOW)


def tally(clock: Clock, **windows: float) -> Tally:
    return Tally(Windows(**windows), max_remembered=100, clock=clock)


def test_a_repeat_counts_once_inside_the_window() -> None:
    clock = Clock()
    counter = tally(clock, dedupe_s=60)
    assert counter.record(reading("a", 1)) is True
    assert counter.record(reading("a", 1)) is False
    assert counter.record(reading("a", 2)) is True
    clock.now += 61
    assert counter.record(reading("a", 1)) is True  # outside the window: remembered no more


def test_devices_turn_active_then_silent_then_forgotten() -> None:
    clock = Clock()
    counter = tally(clock, active_s=900, silent_after_s=3600, forget_after_s=86400)
    counter.record(reading("a", 1))
    clock.now += 600
    counter.record(reading("b", 1))
    assert sorted(counter.active_devices()) == ["a", "b"]
    clock.now += 301
    assert counter.active_devices() == ["b"]
    assert counter.silent_devices() == 0
    clock.now += 3000  # a: 3901 s quiet, b: 3301 s
    assert (counter.active_devices(), counter.silent_devices()) == ([], 1)
    clock.now += 86400
    assert counter.silent_devices() == 0  # both forgotten


def test_top_consumers_rank_the_last_hour() -> None:
    clock = Clock()
    counter = tally(clock, top_s=3600)
    counter.record(reading("small", 1, 1.0))
    counter.record(reading("big", 1, 5.0))
    clock.now += 120
    counter.record(reading("small", 2, 7.0))
    assert counter.top_consumers(1) == [("small", 8.0)]
    assert counter.top_consumers(5) == [("small", 8.0), ("big", 5.0)]
    clock.now += 3500  # the first minute leaves the window
    assert counter.top_consumers(5) == [("small", 7.0)]
    clock.now += 3600
    assert counter.top_consumers(5) == []


def test_memory_is_bounded() -> None:
    counter = Tally(Windows(dedupe_s=3600), max_remembered=10, clock=Clock())
    for minute in range(50):
        counter.record(reading("a", minute))
    assert len(counter._seen) == 10


def test_restored_devices_count_as_active_or_silent_by_their_last_reading() -> None:
    clock = Clock()
    counter = tally(clock, active_s=900, silent_after_s=3600, forget_after_s=86400)
    counter.restore("recent", seconds_ago=60)
    counter.restore("quiet", seconds_ago=7200)
    counter.restore("ancient", seconds_ago=90000)  # beyond a day: forgotten
    assert (counter.active_devices(), counter.silent_devices()) == (["recent"], 1)


def test_the_metrics_thread_may_read_while_the_consumer_records() -> None:
    """prometheus_client serves /metrics from its own thread; reads must not see a dict
    changing size mid-iteration (this raised RuntimeError before Tally took a lock)."""
    import sys
    import threading

    counter = Tally(Windows(), max_remembered=200_000)
    stop, failures, scrapes = threading.Event(), [], []

    def scrape() -> None:
        # A pause between scrapes, as Prometheus makes: a scraper that re-takes the lock
        # at once can starve the recording thread (Python's locks are not fair).
        while not stop.wait(0.0005):
            try:
                counter.active_devices(), counter.silent_devices(), counter.top_consumers(10)
                scrapes.append(1)
            except RuntimeError as error:  # pragma: no cover - the failure this guards
                failures.append(error)

    scraper = threading.Thread(target=scrape, daemon=True)
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, so that a read meets a write
    scraper.start()
    now = datetime.now(UTC)
    try:
        for number in range(5_000):
            counter.record(validate_reading(f"d-{number}", now, 0.1, now=now))
    finally:
        stop.set()
        scraper.join(timeout=10)
        sys.setswitchinterval(switch_interval)
    assert not scraper.is_alive()
    assert scrapes, "the scraper never ran alongside the recording"
    assert failures == []
