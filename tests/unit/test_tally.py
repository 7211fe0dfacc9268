"""Analytics tally: a reading counts once; devices turn active, silent, forgotten; top-N."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from analytics_service.domain.tally import Tally, Windows
from common.models import Reading, validate_reading

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def reading(device: str, minute: int, kwh: float = 1.0) -> Reading:
    return validate_reading(device, NOW.replace(hour=11, minute=minute), kwh, now=NOW)


def tally(clock: Clock, **windows: float) -> Tally:
    return Tally(Windows(**windows), max_remembered=100, clock=clock)


def test_a_repeat_counts_once_inside_the_window() -> None:
    clock = Clock()
    counter = tally(clock, dedupe_s=60)
    a1, a2, b1 = reading("a", 1), reading("a", 2), reading("b", 1)
    assert counter.record_batch([a1, b1, a1]) == [a1, b1]  # a repeat within the batch
    clock.now += 59
    assert counter.record_batch([a2, a1, b1]) == [a2]  # and in a later batch
    clock.now += 1
    assert counter.record_batch([a1, b1, a2]) == [a1, b1]  # 60 s on: remembered no more
    assert counter.record_batch([a1, b1, a2]) == []
    clock.now += 59
    assert counter.record_batch([a2]) == [a2]


def test_the_oldest_ids_make_room_for_new_ones() -> None:
    counter = Tally(Windows(dedupe_s=3600), max_remembered=3, clock=Clock())
    first, second, third, fourth = (reading("a", minute) for minute in range(4))
    assert counter.record_batch([first, second, third, fourth]) == [first, second, third, fourth]
    assert counter.record_batch([second, third, fourth]) == []
    assert counter.record_batch([first]) == [first]  # first made room for fourth, second for first
    assert counter.record_batch([third, fourth, first, second]) == [second]


def test_memory_is_bounded() -> None:
    counter = Tally(Windows(dedupe_s=3600), max_remembered=10, clock=Clock())
    for minute in range(50):
        counter.record_batch([reading("a", minute)])
    counter.record_batch([reading("b", minute) for minute in range(50)])
    assert len(counter._seen) == len(counter._oldest_first) == 10


class Reference:
    """The rule, spelled out: a reading repeats one of the last ``max_remembered`` new
    readings seen less than ``dedupe_s`` ago, or it is new."""

    def __init__(self, dedupe_s: float, max_remembered: int) -> None:
        self.dedupe_s, self.max_remembered = dedupe_s, max_remembered
        self.new: list[tuple[str, float]] = []  # (reading_id, seen at), every new one

    def record_batch(self, ids: list[str], now: float) -> list[str]:
        counted = []
        for reading_id in ids:
            remembered = self.new[-self.max_remembered :]
            if all(r != reading_id or now - at >= self.dedupe_s for r, at in remembered):
                self.new.append((reading_id, now))
                counted.append(reading_id)
        return counted


@given(
    dedupe_s=st.integers(1, 100),
    max_remembered=st.integers(1, 8),
    # (seconds since the batch before, reading ids of the batch) from a few ids, so repeats
    # are common and land inside, at the edge of and beyond the window and the size bound.
    batches=st.lists(
        st.tuples(st.integers(0, 60), st.lists(st.integers(0, 12), max_size=12)), max_size=30
    ),
)
def test_the_dedupe_follows_the_rule(
    dedupe_s: int, max_remembered: int, batches: list[tuple[int, list[int]]]
) -> None:
    clock = Clock()
    counter = Tally(Windows(dedupe_s=dedupe_s), max_remembered, clock=clock)
    reference = Reference(dedupe_s, max_remembered)
    for seconds, numbers in batches:
        clock.now += seconds
        ids = [f"r-{number}" for number in numbers]
        readings = [Reading("a", NOW, 1.0, reading_id) for reading_id in ids]
        counted = [r.reading_id for r in counter.record_batch(readings)]
        assert counted == reference.record_batch(ids, clock.now)
        assert len(counter._seen) <= max_remembered


def test_devices_turn_active_then_silent_then_forgotten() -> None:
    clock = Clock()
    counter = tally(clock, active_s=900, silent_after_s=3600, forget_after_s=86400)
    counter.record_batch([reading("a", 1)])
    clock.now += 600
    counter.record_batch([reading("b", 1)])
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
    counter.record_batch([reading("small", 1, 1.0), reading("big", 1, 5.0)])
    clock.now += 120
    counter.record_batch([reading("small", 2, 7.0), reading("small", 2, 7.0)])  # counted once
    assert counter.top_consumers(1) == [("small", 8.0)]
    assert counter.top_consumers(5) == [("small", 8.0), ("big", 5.0)]
    clock.now += 3500  # the first minute leaves the window
    assert counter.top_consumers(5) == [("small", 7.0)]
    clock.now += 3600
    assert counter.top_consumers(5) == []


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
        for batch in range(1_000):  # small batches: the lock is free between them
            counter.record_batch(
                [validate_reading(f"d-{batch}-{n}", now, 0.1, now=now) for n in range(5)]
            )
    finally:
        stop.set()
        scraper.join(timeout=10)
        sys.setswitchinterval(switch_interval)
    assert not scraper.is_alive()
    assert scrapes, "the scraper never ran alongside the recording"
    assert failures == []
