"""``observe_times`` reaches into prometheus_client's histogram: it must expose what as many
``observe`` calls would, for values on, between and beyond the bucket bounds: the same
buckets and count, and the same sum up to rounding (a product, not repeated additions)."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from common.metrics import observe_times

BUCKETS = (0.5, 1.0, 5.0, 60.0)


def exposition(observations: list[tuple[float, int]], weighted: bool) -> list[bytes]:
    registry = CollectorRegistry()
    histogram = Histogram("lag_seconds", "Lag.", ["consumer"], buckets=BUCKETS, registry=registry)
    child = histogram.labels("billing")
    for amount, times in observations:
        if weighted:
            observe_times(child, amount, times)
        else:
            for _ in range(times):
                child.observe(amount)
    # Every line but the creation time, which two registries cannot share.
    return [line for line in generate_latest(registry).splitlines() if b"_created" not in line]


values = st.one_of(
    st.sampled_from([*BUCKETS, 0.0, -1.0, 1e9]),
    st.floats(min_value=-10, max_value=1e6, allow_nan=False),
)


def split_sum(lines: list[bytes]) -> tuple[list[bytes], float]:
    [total] = [float(line.split()[-1]) for line in lines if line.startswith(b"lag_seconds_sum")]
    return [line for line in lines if not line.startswith(b"lag_seconds_sum")], total


@given(st.lists(st.tuples(values, st.integers(min_value=1, max_value=50)), max_size=20))
def test_observe_times_exposes_what_as_many_observes_would(
    observations: list[tuple[float, int]],
) -> None:
    weighted, weighted_sum = split_sum(exposition(observations, weighted=True))
    repeated, repeated_sum = split_sum(exposition(observations, weighted=False))
    assert weighted == repeated
    assert math.isclose(weighted_sum, repeated_sum, rel_tol=1e-9, abs_tol=1e-6)
