"""The broker's own limit, as two baselines for the platform's figures.

1. aio-pika, the client the services use: confirmed persistent publishes of a real reading
   message into a quorum queue declared with billing.readings' arguments, ``window``
   confirms in flight; then one consumer acking ``multiple=True`` every ``ack_every``.
2. RabbitMQ's PerfTest (Java, one producer and one consumer at once) on a quorum queue
   with the same arguments, persistent messages of the same size and a confirm window.

Both queues are throwaway ones under a bench prefix and are deleted afterwards.
``python -m scripts.bench broker`` runs both and prints their figures as JSON (``make bench``
runs them as its first section).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import aio_pika
import typer

from common.messages import CONTENT_TYPE, encode_reading
from common.models import validate_reading
from common.rabbit import Topology, reading_queue_arguments
from scripts.bench.measure import run_measured
from scripts.bench.stack import server_url

PERF_TEST_VERSION = "2.22.1"
PERF_TEST_LIB = (
    Path(os.environ.get("ENERGY_STATE_DIR", Path.home() / ".local/state/energy-platform"))
    / f"tools/perf-test-{PERF_TEST_VERSION}/lib"
)
_RATE = re.compile(r"(sending|receiving) rate avg: (\d+) msg/s")
_LATENCY = re.compile(r"(consumer|confirm) latency min/median/75th/95th/99th ([\d/]+) µs")


def sample_body() -> bytes:
    """A reading message body exactly as ingestion publishes it."""
    now = datetime.now(UTC)
    reading = validate_reading("bench-00001", now - timedelta(minutes=1), 0.1234, now=now)
    return encode_reading(reading)


async def aio_pika_baseline(
    url: str, prefix: str, messages: int, window: int, ack_every: int
) -> dict[str, Any]:
    """Publish ``messages`` with ``window`` confirms in flight, then consume them all."""
    body = sample_body()
    topology = Topology(prefix)
    queue_name = f"{prefix}broker-baseline"
    connection = await aio_pika.connect(url, timeout=10)
    async with connection:
        server = connection.transport.connection.server_properties  # type: ignore[union-attr]
        version = server.get("version", b"")
        version = version.decode() if isinstance(version, bytes) else str(version)
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(
            queue_name, durable=True, arguments=reading_queue_arguments(topology)
        )
        try:
            publish = await _publish(channel, queue_name, body, messages, window)
            consume = await _consume(connection, queue_name, messages, ack_every)
        finally:
            await channel.queue_delete(queue.name)
    return {
        "tool": "aio-pika",
        "rabbitmq_version": version,
        "message_bytes": len(body),
        "messages": messages,
        "confirm_window": window,
        "ack_every": ack_every,
        **publish,
        **consume,
    }


async def _publish(
    channel: aio_pika.abc.AbstractChannel, queue: str, body: bytes, messages: int, window: int
) -> dict[str, float]:
    in_flight = asyncio.Semaphore(window)
    exchange = channel.default_exchange

    async def one(index: int) -> None:
        try:
            await exchange.publish(
                aio_pika.Message(
                    body,
                    content_type=CONTENT_TYPE,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=f"bench-{index}",
                ),
                routing_key=queue,
                timeout=30,
            )
        finally:
            in_flight.release()

    cpu, began = time.process_time(), time.perf_counter()
    tasks = []
    for index in range(messages):
        await in_flight.acquire()
        tasks.append(asyncio.create_task(one(index)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - began
    return {
        "publish_per_s": round(messages / elapsed),
        "publish_s": round(elapsed, 3),
        "publish_loadgen_cpu_s": round(time.process_time() - cpu, 2),
    }


async def _consume(
    connection: aio_pika.abc.AbstractConnection, queue_name: str, messages: int, ack_every: int
) -> dict[str, float]:
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=ack_every * 2)
    queue = await channel.declare_queue(queue_name, passive=True)
    done = asyncio.Event()
    received = 0

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        nonlocal received
        received += 1
        if received % ack_every == 0 or received == messages:
            await message.ack(multiple=True)
        if received == messages:
            done.set()

    cpu, began = time.process_time(), time.perf_counter()
    tag = await queue.consume(on_message)
    await asyncio.wait_for(done.wait(), timeout=120)
    elapsed = time.perf_counter() - began
    await queue.cancel(tag)
    await channel.close()
    return {
        "consume_per_s": round(messages / elapsed),
        "consume_s": round(elapsed, 3),
        "consume_loadgen_cpu_s": round(time.process_time() - cpu, 2),
    }


def perf_test(
    url: str, prefix: str, seconds: int, window: int, ack_every: int, rate: int = 0
) -> dict[str, Any]:
    """Run PerfTest for ``seconds`` (one producer, one consumer) and parse its summary;
    ``rate``: publish that many messages a second (``--rate``) instead of flat out."""
    if not (PERF_TEST_LIB / f"perf-test-{PERF_TEST_VERSION}.jar").exists():
        raise RuntimeError(f"PerfTest is not in {PERF_TEST_LIB}: run bash scripts/bench_tools.sh")
    queue = f"{prefix}perf-test"
    # --quorum-queue sets x-queue-type; the other arguments as billing.readings has them.
    arguments = {
        k: v for k, v in reading_queue_arguments(Topology(prefix)).items() if k != "x-queue-type"
    }
    command = [
        "java",
        "-cp",
        f"{PERF_TEST_LIB}/*",
        "com.rabbitmq.perf.PerfTest",
        "--uri",
        java_uri(url),
        "--queue",
        queue,
        "--quorum-queue",
        "--queue-args",
        ",".join(f"{key}={value}" for key, value in arguments.items()),
        "--flag",
        "persistent",
        "--size",
        str(len(sample_body())),
        "--confirm",
        str(window),
        "--multi-ack-every",
        str(ack_every),
        "--qos",
        str(ack_every * 2),
        "--producers",
        "1",
        "--consumers",
        "1",
        "--time",
        str(seconds),
        *(["--rate", str(rate)] if rate else []),
    ]
    try:
        output, cpu_s = run_measured(command, timeout_s=seconds + 60)
    finally:
        asyncio.run(_delete_queue(url, queue))
    rates = {kind: int(rate) for kind, rate in _RATE.findall(output)}
    if "sending" not in rates:
        raise RuntimeError(f"PerfTest printed no summary:\n{output[-2000:]}")
    latency = {
        kind: dict(
            zip(("min", "p50", "p75", "p95", "p99"), map(int, values.split("/")), strict=True)
        )
        for kind, values in _LATENCY.findall(output)
    }
    return {
        "tool": f"PerfTest {PERF_TEST_VERSION}",
        "seconds": seconds,
        "message_bytes": len(sample_body()),
        "confirm_window": window,
        "ack_every": ack_every,
        "rate_limit": rate or None,
        "publish_per_s": rates["sending"],
        "consume_per_s": rates.get("receiving", 0),
        "confirm_latency_us": latency.get("confirm", {}),
        "consumer_latency_us": latency.get("consumer", {}),
        "loadgen_cpu_s": round(cpu_s, 2),
    }


def java_uri(url: str) -> str:
    """The URL for the Java client, which reads a bare ``/`` path as the vhost "" (Python's
    clients read it as the default vhost ``/``)."""
    parts = urlsplit(url)
    return parts._replace(path="").geturl() if parts.path in ("", "/") else url


async def _delete_queue(url: str, queue: str) -> None:
    connection = await aio_pika.connect(url, timeout=10)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(queue)


def main(
    messages: Annotated[int, typer.Option(min=1, help="Messages aio-pika publishes.")] = 20_000,
    perf_test_s: Annotated[int, typer.Option(min=1, help="Seconds PerfTest runs.")] = 10,
    window: Annotated[int, typer.Option(min=1, help="Confirms in flight.")] = 100,
    ack_every: Annotated[int, typer.Option(min=1, help="Consumer acks every N.")] = 100,
) -> None:
    """The broker's own limit (aio-pika, then PerfTest) on throwaway queues, as JSON."""
    url, prefix = server_url("RABBITMQ_URL"), f"bench{uuid.uuid4().hex[:6]}-"
    results = {
        "aio_pika": asyncio.run(aio_pika_baseline(url, prefix, messages, window, ack_every)),
        "perf_test": perf_test(url, prefix, perf_test_s, window, ack_every),
    }
    typer.echo(json.dumps(results, indent=2))
