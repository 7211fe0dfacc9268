"""The bound on readings waiting for confirms, and the retry hint a refused caller gets."""

from __future__ import annotations

import pytest

from ingestion_service.backpressure import (
    INITIAL_RETRY_AFTER_S,
    MIN_RETRY_AFTER_S,
    InFlightReadings,
)


def test_readings_are_taken_up_to_the_limit_and_refused_beyond() -> None:
    in_flight = InFlightReadings(limit=1000, max_retry_after_s=5)
    assert in_flight.take(500) and in_flight.take(500)
    assert not in_flight.take(1), "over the limit: refused"
    assert in_flight.count == 1000, "a refusal counts nothing"
    in_flight.release(500)
    assert in_flight.take(500) and in_flight.count == 1000


def test_a_publish_larger_than_the_limit_goes_alone() -> None:
    in_flight = InFlightReadings(limit=1000, max_retry_after_s=5)
    assert in_flight.take(2500), "nothing else in flight: admitted"
    assert not in_flight.take(1)
    in_flight.release(2500)
    assert in_flight.take(1) and not in_flight.take(2500), "not beside another publish"


def test_the_hint_follows_the_confirm_latency_within_bounds() -> None:
    in_flight = InFlightReadings(limit=1000, max_retry_after_s=5)
    assert in_flight.retry_after_s == INITIAL_RETRY_AFTER_S
    for _ in range(50):
        in_flight.confirmed_after(2.0)
    assert in_flight.retry_after_s == pytest.approx(2.0, rel=1e-3)
    for _ in range(50):
        in_flight.confirmed_after(60.0)
    assert in_flight.retry_after_s == 5, "never longer than a confirm may take"
    for _ in range(100):
        in_flight.confirmed_after(0.001)
    assert in_flight.retry_after_s == MIN_RETRY_AFTER_S, "refused callers never come straight back"
