"""Capacity model: replicas, broker and database sizes for a fleet, from rates measured here.

    python -m scripts.capacity [--bench bench-results.json] [--store-readings-per-s N]

Reads the figures `make bench` wrote (bench-results.json: CPU per reading of each service
and of RabbitMQ, the broker's own publish rate, the unary run) and the figures of `make
bench-billing` that bench-results.json does not hold (billing's drain into the local
MongoDB-wire server, given by --store-readings-per-s), then prints deployments/helm/
CAPACITY.md's table in Markdown: for 10k, 100k, 1M and 10M devices at one reading a minute,
the replicas of each service, the RabbitMQ nodes and queue shards, the MongoDB shards, the
data written a day, and which tier saturates first. Refresh the figures with `make bench`
(and `make bench-billing`), then run this again and paste its output.

The arithmetic (each function below, unit-tested in tests/unit/test_capacity.py):
  readings/s      devices x readings a minute / 60, times the peak factor (catch-up after an
                  outage, loggers in step)
  replicas        readings/s x CPU us per reading / (1e6 x target utilisation): one Python
                  process uses one core; at least the chart's minimum
  RabbitMQ        its CPU per reading x the quorum replication (every node writes every
                  message), over cores per node; at least 3 nodes; one quorum queue is led by
                  one node, so above one queue's measured rate of messages the readings queues
                  must be sharded (queues per consumer group). A message carries many readings
                  (schema 2): a stream's chunk (GATEWAY_BATCH_SIZE, 500) is one message; single
                  calls are counted as one message each, the worst case (gathered calls share
                  messages under load, fewer on a quiet gateway)
  MongoDB         readings/s over what one server took here; above it, shards (hashed
                  device_id)
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import bson
import yaml

REPO = Path(__file__).resolve().parents[1]
BENCH_FILE = REPO / "bench-results.json"
CHART_VALUES = REPO / "deployments" / "helm" / "smart-energy-platform" / "values.yaml"
FLEETS = (10_000, 100_000, 1_000_000, 10_000_000)
SERVICES = ("gateway", "ingestion", "billing", "analytics")
# The bench's process names for the services and the servers.
PROCESS = {
    "gateway": "api_gateway",
    "ingestion": "ingestion_service",
    "billing": "billing_service",
    "analytics": "analytics_service",
}
# make bench-billing, README "Billing on the local MongoDB (SecantusDB)": five runs drained
# 1,686-2,134 readings/s from 1,000 devices; the lowest is the planning figure.
STORE_READINGS_PER_S = 1686.0
# RabbitMQ's CPU for a message of one reading (publish, confirm, two queue deliveries):
# `make bench` of 2026-12-01T18:16:19, when every reading was its own message. Streams now
# share messages (their figure comes from each bench run); a single call may be alone in
# its message, so single calls are priced at this.
RABBITMQ_US_PER_SINGLE_MESSAGE = 196.0
# README "How billing stores a reading": a slot document of 900 readings is 37.9 kB of BSON.
SLOT_BYTES_PER_READING = 37_900 / 900
TABLE_HEADER = (
    "| devices | readings/s (mean / design) | gateway | ingestion | billing | analytics "
    "| RabbitMQ nodes | queues per consumer | MongoDB shards (store measured here) "
    "| store writes/s | GB/day | saturates first |"
)
TABLE_RULE = "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"


@dataclass(frozen=True)
class Measured:
    """The rates one machine measured; each is quoted with its source in the output."""

    source: str
    machine: str
    cpu_us: dict[str, float]  # CPU per reading, batched streams: the services and rabbitmq
    unary_us: float  # the whole stack's CPU per reading sent by unary calls
    queue_publish_per_s: float  # one quorum queue, persistent, confirms: the broker's own
    store_readings_per_s: float  # billing's drain into the local MongoDB-wire server
    rabbitmq_us_per_single_message: float = RABBITMQ_US_PER_SINGLE_MESSAGE


@dataclass(frozen=True)
class Assumptions:
    """What the model assumes, not measured; each is printed with the table."""

    readings_per_minute: float = 1.0
    peak_factor: float = 2.0  # readings/s the platform must take: twice the mean
    target_utilisation: float = 0.7  # of a replica's core, before the autoscaler adds one
    cores_per_replica: float = 1.0  # an asyncio Python process
    rabbitmq_cores_per_node: int = 8
    # Readings per broker message: a stream's forwarded chunk (GATEWAY_BATCH_SIZE and
    # INGESTION_MAX_MESSAGE_READINGS, both 500); a single call alone in its message.
    readings_per_message_streams: float = 500.0
    readings_per_message_unary: float = 1.0
    quorum_replicas: int = 3  # each message written on every node of a 3-node cluster
    min_replicas: dict[str, int] = field(
        default_factory=lambda: {"gateway": 2, "ingestion": 2, "billing": 1, "analytics": 1}
    )
    max_replicas: dict[str, int] = field(
        default_factory=lambda: {"gateway": 10, "ingestion": 10, "billing": 10, "analytics": 5}
    )


@dataclass(frozen=True)
class Row:
    devices: int
    readings_per_s: float  # mean
    design_per_s: float  # with the peak factor
    replicas: dict[str, int]
    rabbitmq_nodes: int
    queue_shards: int
    store_shards: int
    store_writes_per_s: float
    gb_per_day: float
    saturates_first: str


def from_bench(
    bench: dict[str, Any], store_readings_per_s: float = STORE_READINGS_PER_S
) -> Measured:
    """The figures of one `make bench` run (bench-results.json)."""
    streaming = bench["streaming"]["batch_1000"]
    cpu = streaming["cpu_us_per_reading"]
    cpu_us = {service: float(cpu[PROCESS[service]]) for service in SERVICES}
    cpu_us["rabbitmq"] = float(cpu["rabbitmq"])
    machine = bench["machine"]
    # The unary run at the highest concurrency keeps the machine busy: its CPU (every core
    # less the load tool's share) over the calls answered is the stack's cost of a reading.
    unary = max(bench["unary"]["runs"], key=lambda run: run["ok_per_s"])
    cores = machine["logical_cpus"] - unary["loadgen_cpu_s"] / unary["elapsed_s"]
    return Measured(
        source=f"bench-results.json of {bench['started_at']}",
        machine=f"{machine['cpu_model']}, {machine['logical_cpus']} logical CPUs",
        cpu_us=cpu_us,
        unary_us=cores * 1e6 / unary["ok_per_s"],
        queue_publish_per_s=float(bench["broker"]["aio_pika"]["publish_per_s"]),
        store_readings_per_s=store_readings_per_s,
    )


def unary_cpu_us(measured: Measured) -> dict[str, float]:
    """CPU per reading when each reading is its own call (a logger reporting once a
    minute). The consumers' side is the same as for batches, the broker's that of a message
    of one reading; the rest of the unary cost is the call path, split between gateway and
    ingestion as their batched costs are."""
    costs = dict(measured.cpu_us)
    costs["rabbitmq"] = max(costs["rabbitmq"], measured.rabbitmq_us_per_single_message)
    consumers = sum(costs[s] for s in ("billing", "analytics", "rabbitmq"))
    call_path = max(measured.unary_us - consumers, 0.0)
    front = measured.cpu_us["gateway"] + measured.cpu_us["ingestion"]
    for service in ("gateway", "ingestion"):
        costs[service] = call_path * measured.cpu_us[service] / front
    return costs


def design_rate(devices: int, assumptions: Assumptions) -> tuple[float, float]:
    """(mean, design) readings/s of a fleet."""
    mean = devices * assumptions.readings_per_minute / 60
    return mean, mean * assumptions.peak_factor


def replicas_for(rate: float, cpu_us: float, minimum: int, assumptions: Assumptions) -> int:
    """Replicas that take ``rate`` readings/s at the target utilisation of their cores."""
    per_replica = assumptions.cores_per_replica * assumptions.target_utilisation * 1e6 / cpu_us
    return max(minimum, math.ceil(rate / per_replica))


def rabbitmq_nodes(rate: float, cpu_us: float, assumptions: Assumptions) -> int:
    """Nodes of `rabbitmq_cores_per_node` for the broker's CPU, quorum-replicated; at least 3."""
    cores = rate * cpu_us * assumptions.quorum_replicas / (1e6 * assumptions.target_utilisation)
    return max(3, math.ceil(cores / assumptions.rabbitmq_cores_per_node))


def shards(rate: float, per_shard: float, assumptions: Assumptions) -> int:
    """Shards (queues per consumer group, or database shards) each under its measured rate."""
    return max(1, math.ceil(rate / (per_shard * assumptions.target_utilisation)))


def reading_bytes() -> float:
    """BSON bytes billing writes per reading: its `readings` document (as
    billing_service.adapters.mongo_batch.store_readings builds it, a derived id) and its
    entry in the slot document. Indexes and compression are not counted."""
    document = {
        "_id": "794043d3-02d8-595b-96bf-03f624ea3fd2",
        "device_id": "meter-0001234",
        "timestamp": datetime(2026, 10, 1, 10, 15, tzinfo=UTC),
        "usage_kwh": 1.25,
        "usage_milliwh": 1_250_000,
    }
    return len(bson.encode(document)) + SLOT_BYTES_PER_READING


def row(devices: int, measured: Measured, assumptions: Assumptions, unary: bool = True) -> Row:
    """One fleet's sizes; ``unary``: each reading its own call, else batched streams."""
    mean, design = design_rate(devices, assumptions)
    costs = unary_cpu_us(measured) if unary else measured.cpu_us
    replicas = {
        service: replicas_for(
            design, costs[service], assumptions.min_replicas[service], assumptions
        )
        for service in SERVICES
    }
    per_message = (
        assumptions.readings_per_message_unary
        if unary
        else assumptions.readings_per_message_streams
    )
    queue_shards = shards(design / per_message, measured.queue_publish_per_s, assumptions)
    store_shards = shards(design, measured.store_readings_per_s, assumptions)
    # How far past its single unit each tier is: the chart scales services up to their
    # maximum replicas; one queue and one database are single units it cannot scale.
    pressure = {
        f"{service} (max {assumptions.max_replicas[service]} replicas)": replicas[service]
        / assumptions.max_replicas[service]
        for service in SERVICES
    }
    pressure["RabbitMQ: one quorum queue per consumer"] = queue_shards
    pressure["MongoDB: one server / replica set"] = store_shards
    tier, level = max(pressure.items(), key=lambda item: item[1])
    return Row(
        devices=devices,
        readings_per_s=mean,
        design_per_s=design,
        replicas=replicas,
        rabbitmq_nodes=rabbitmq_nodes(design, costs["rabbitmq"], assumptions),
        queue_shards=queue_shards,
        store_shards=store_shards,
        # One insert into `readings` and one `$set` in a slot document per reading.
        store_writes_per_s=2 * design,
        gb_per_day=mean * 86_400 * reading_bytes() / 1e9,
        saturates_first=tier if level > 1 else f"nothing ({tier} nearest)",
    )


def chart_assumptions(values_file: Path = CHART_VALUES) -> Assumptions:
    """Minimum and maximum replicas from the chart's values.yaml (the autoscalers' bounds)."""
    values = yaml.safe_load(values_file.read_text())
    return Assumptions(
        min_replicas={s: int(values[s]["autoscaling"]["minReplicas"]) for s in SERVICES},
        max_replicas={s: int(values[s]["autoscaling"]["maxReplicas"]) for s in SERVICES},
    )


def render(measured: Measured, assumptions: Assumptions, fleets: tuple[int, ...] = FLEETS) -> str:
    """The inputs, the assumptions and the table, in Markdown."""
    costs = unary_cpu_us(measured)
    lines = [
        f"Inputs ({measured.source}; {measured.machine}):",
        "",
        "| input | value | source |",
        "| --- | ---: | --- |",
    ]
    for service in SERVICES:
        lines.append(
            f"| {service} CPU per reading, batched / unary | {measured.cpu_us[service]:,.0f} / "
            f"{costs[service]:,.0f} us | `make bench` streaming.batch_1000; unary: see below |"
        )
    lines += [
        f"| RabbitMQ CPU per reading (1 publish, 2 queue deliveries), batched / unary | "
        f"{measured.cpu_us['rabbitmq']:,.0f} / {costs['rabbitmq']:,.0f} us | `make bench` "
        "streaming.batch_1000; unary: a message of one reading, `make bench` of "
        "2026-12-01T18:16:19 |",
        f"| whole stack CPU per unary reading | {measured.unary_us:,.0f} us | `make bench` unary, "
        "busiest run: cores less the load tool's, over calls answered |",
        f"| one quorum queue, persistent publishes with confirms | "
        f"{measured.queue_publish_per_s:,.0f} msg/s | `make bench` broker.aio_pika |",
        f"| billing into the local MongoDB-wire server (SecantusDB) | "
        f"{measured.store_readings_per_s:,.0f} readings/s | `make bench-billing` (README) |",
        f"| BSON written per reading (document + slot entry) | {reading_bytes():,.0f} B | "
        "`readings` document encoded; slot entry from the 37.9 kB / 900 readings measured |",
        "",
        "Assumptions: "
        f"{assumptions.readings_per_minute:g} reading a minute per device; peak factor "
        f"{assumptions.peak_factor:g}; {assumptions.target_utilisation:.0%} target "
        f"utilisation; one core per service replica; RabbitMQ nodes of "
        f"{assumptions.rabbitmq_cores_per_node} cores, quorum queues on "
        f"{assumptions.quorum_replicas} nodes; broker messages of "
        f"{assumptions.readings_per_message_unary:g} reading (single calls) and "
        f"{assumptions.readings_per_message_streams:g} readings (streams); replicas "
        "between the chart's minimum and maximum (the maximum only decides what saturates "
        "first).",
    ]
    for unary, title in (
        (True, "Each reading its own `SendReading` call (a logger reporting once a minute)"),
        (
            False,
            "Readings in `SendReadings` streams of 1,000 (a concentrator, or buffered loggers)",
        ),
    ):
        lines += ["", f"{title}:", "", TABLE_HEADER, TABLE_RULE]
        for devices in fleets:
            r = row(devices, measured, assumptions, unary)
            lines.append(
                f"| {devices:,} | {r.readings_per_s:,.0f} / {r.design_per_s:,.0f} | "
                + " | ".join(str(r.replicas[s]) for s in SERVICES)
                + f" | {r.rabbitmq_nodes} | {r.queue_shards} | {r.store_shards} | "
                f"{r.store_writes_per_s:,.0f} | {r.gb_per_day:,.1f} | {r.saturates_first} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--bench", type=Path, default=BENCH_FILE, help="make bench's JSON")
    parser.add_argument(
        "--store-readings-per-s",
        type=float,
        default=STORE_READINGS_PER_S,
        help="readings/s one database server takes (make bench-billing; MongoDB 7 once measured)",
    )
    parser.add_argument("--peak-factor", type=float, default=Assumptions.peak_factor)
    args = parser.parse_args(argv)
    if not args.bench.exists():
        parser.error(f"{args.bench} is missing: run `make bench` first (it writes it)")
    measured = from_bench(json.loads(args.bench.read_text()), args.store_readings_per_s)
    assumptions = replace(chart_assumptions(), peak_factor=args.peak_factor)
    print(render(measured, assumptions))


if __name__ == "__main__":
    main()
