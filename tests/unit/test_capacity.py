"""scripts/capacity.py: the capacity model's arithmetic, on figures chosen to check by hand."""

from __future__ import annotations

from dataclasses import replace

import pytest

from scripts import capacity
from scripts.capacity import Assumptions, Measured

MEASURED = Measured(
    source="test",
    machine="test machine",
    cpu_us={"gateway": 100, "ingestion": 300, "billing": 100, "analytics": 50, "rabbitmq": 200},
    unary_us=2_350,
    queue_publish_per_s=5_000,
    store_readings_per_s=2_000,
)
BENCH = {
    "started_at": "2026-12-01T00:00:00+00:00",
    "machine": {"cpu_model": "AMD EPYC", "logical_cpus": 2},
    "broker": {"aio_pika": {"publish_per_s": 5314}},
    "streaming": {
        "batch_1000": {
            "cpu_us_per_reading": {
                "ingestion_service": 172.0,
                "billing_service": 112.0,
                "analytics_service": 108.0,
                "api_gateway": 108.0,
                "rabbitmq": 196.0,
                "mongodb": 224.0,
            }
        }
    },
    "unary": {
        "runs": [
            {"ok_per_s": 149, "loadgen_cpu_s": 0.3, "elapsed_s": 2.0},
            {"ok_per_s": 400, "loadgen_cpu_s": 0.5, "elapsed_s": 2.0},
        ]
    },
}


def test_design_rate_is_a_minute_s_readings_times_the_peak_factor() -> None:
    assert capacity.design_rate(60_000, Assumptions()) == (1_000, 2_000)
    assert capacity.design_rate(60_000, Assumptions(peak_factor=3)) == (1_000, 3_000)


def test_replicas_fill_each_core_to_the_target_utilisation() -> None:
    assumptions = Assumptions()  # 70% of one core each
    # 100 us a reading: 10,000 readings/s a core, 7,000 at 70%.
    assert capacity.replicas_for(7_000, 100, 1, assumptions) == 1
    assert capacity.replicas_for(7_001, 100, 1, assumptions) == 2
    assert capacity.replicas_for(70_000, 100, 1, assumptions) == 10
    assert capacity.replicas_for(10, 100, 2, assumptions) == 2  # the chart's minimum


def test_rabbitmq_counts_every_quorum_replica_and_keeps_three_nodes() -> None:
    assumptions = Assumptions()  # 8 cores a node, 3 replicas, 70%
    assert capacity.rabbitmq_nodes(1_000, 200, assumptions) == 3
    # 100,000/s x 200 us x 3 = 60 cores, /0.7 = 85.7 cores: 11 nodes of 8.
    assert capacity.rabbitmq_nodes(100_000, 200, assumptions) == 11


def test_shards_keep_each_under_its_measured_rate() -> None:
    assumptions = Assumptions()
    assert capacity.shards(1_400, 2_000, assumptions) == 1
    assert capacity.shards(1_401, 2_000, assumptions) == 2
    assert capacity.shards(0, 2_000, assumptions) == 1


def test_unary_cost_goes_to_the_call_path_in_the_batched_proportions() -> None:
    costs = capacity.unary_cpu_us(MEASURED)
    # 2,350 less the consumers' 350 = 2,000 on the call path, 1:3 as batched.
    assert costs["gateway"] == pytest.approx(500)
    assert costs["ingestion"] == pytest.approx(1_500)
    assert {s: costs[s] for s in ("billing", "analytics", "rabbitmq")} == {
        "billing": 100,
        "analytics": 50,
        "rabbitmq": 200,
    }


def test_from_bench_reads_make_bench_s_figures() -> None:
    measured = capacity.from_bench(BENCH, store_readings_per_s=1_500)
    assert measured.cpu_us == {
        "gateway": 108,
        "ingestion": 172,
        "billing": 112,
        "analytics": 108,
        "rabbitmq": 196,
    }
    # The busiest unary run: 2 cores less the tool's 0.25, over 400 calls/s.
    assert measured.unary_us == pytest.approx(1.75e6 / 400)
    assert measured.queue_publish_per_s == 5_314
    assert measured.store_readings_per_s == 1_500
    assert "2 logical CPUs" in measured.machine


def test_a_row_names_the_tier_furthest_past_its_single_unit() -> None:
    assumptions = Assumptions()
    small = capacity.row(6_000, MEASURED, assumptions)  # 100/s mean, 200/s design
    assert small.saturates_first.startswith("nothing")
    assert small.replicas == {"gateway": 2, "ingestion": 2, "billing": 1, "analytics": 1}
    assert (small.queue_shards, small.store_shards, small.rabbitmq_nodes) == (1, 1, 3)
    assert small.store_writes_per_s == 400
    big = capacity.row(1_200_000, MEASURED, assumptions)  # 40,000/s design
    assert big.store_shards == 29  # 40,000 / (2,000 x 0.7)
    assert big.queue_shards == 12  # 40,000 / (5,000 x 0.7)
    assert big.saturates_first == "MongoDB: one server / replica set"
    batched = capacity.row(1_200_000, MEASURED, assumptions, unary=False)
    assert batched.replicas["ingestion"] < big.replicas["ingestion"]
    # Streams put 500 readings in a message: 80 messages/s, one queue.
    assert batched.queue_shards == 1
    huge = capacity.row(600_000_000, MEASURED, assumptions, unary=False)  # 20M readings/s
    assert huge.queue_shards == 12  # 20,000,000 / 500 = 40,000 msg/s over (5,000 x 0.7)


def test_services_saturate_first_when_their_maximum_replicas_is_low() -> None:
    tight = replace(Assumptions(), max_replicas={s: 1 for s in capacity.SERVICES})
    generous = replace(MEASURED, queue_publish_per_s=1e9, store_readings_per_s=1e9)
    row = capacity.row(600_000, generous, tight)
    assert row.saturates_first == "ingestion (max 1 replicas)"


def test_data_per_day_is_the_readings_times_their_bson_size() -> None:
    size = capacity.reading_bytes()
    assert 100 < size < 300
    row = capacity.row(60_000, MEASURED, Assumptions())  # 1,000 readings/s
    assert row.gb_per_day == pytest.approx(1_000 * 86_400 * size / 1e9)


def test_render_prints_the_inputs_and_both_tables() -> None:
    text = capacity.render(MEASURED, Assumptions())
    assert text.count("| 10,000,000 |") == 2
    assert "| one quorum queue, persistent publishes with confirms | 5,000 msg/s" in text
    assert text.count(capacity.TABLE_HEADER) == 2


def test_the_chart_s_bounds_give_a_table() -> None:
    """The chart's autoscaler bounds, as `python -m scripts.capacity` uses them, with a
    bench run's figures (bench-results.json is not in the repository: `make bench` writes
    it on the machine that measures)."""
    measured = capacity.from_bench(BENCH)
    assumptions = capacity.chart_assumptions()
    assert assumptions.min_replicas["gateway"] >= 2
    assert "| 1,000,000 |" in capacity.render(measured, assumptions)
