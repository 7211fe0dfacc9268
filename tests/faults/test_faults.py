"""The promise under faults: every reading the gateway answered OK is billed exactly once.

Each test runs the four services as processes under a steady simulated load that keeps a
ledger of acknowledged readings and resends what was refused (as a buffering logger
does), injects one fault, and ends with the reconciliation of that ledger against billing
exact. Each prints, for the note: readings in flight at the fault, recovery time, result.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aio_pika
import grpc
import pytest

from common.energy.v1 import billing_pb2, gateway_pb2, gateway_pb2_grpc, reading_pb2
from common.gateway_client import gateway_channel
from common.messages import encode_reading
from common.models import Reading, validate_reading
from common.rabbit import REASON_HEADER, ROUTING_KEY, Topology, declare_topology
from scripts import dlq
from scripts.client_options import should_resend
from tests.component.test_queries import start_redis
from tests.conftest import ADMIN_TOKEN, RABBITMQ_URL, free_port, wait_until
from tests.e2e.conftest import Stack
from tests.faults.conftest import stack_prefix
from tests.faults.load import (
    STREAM_CHUNK,
    accepted_before_failure,
    billing_redelivered,
    ledger_line,
    long_stream,
    reconciled,
    resend_stream,
    send_stream,
    steady_load,
    steady_load_until,
    until_in_flight,
)
from tests.mongo_server import LocalMongo
from tests.rabbit_node import RabbitNode

# Each test waits up to load.RECONCILE_WAIT_S for billing after its fault.
pytestmark = pytest.mark.timeout(600)


async def test_billing_killed_with_deliveries_in_flight_then_restarted(
    stacks, catalog: Path, tmp_path: Path
) -> None:
    stack = await stacks()
    ledger = tmp_path / "ledger.jsonl"
    back = asyncio.Event()
    load = asyncio.gather(
        steady_load_until(stack, ledger, back), steady_load_until(stack, ledger, back, batch=25)
    )
    flying = await until_in_flight(stack)
    await stack.stop_service("billing_service", signal.SIGKILL)
    await asyncio.sleep(1)
    await stack.start_service("billing_service")
    back.set()
    restarted = time.monotonic()
    await load

    async def handed_back() -> bool:
        return await billing_redelivered(stack) > 0

    # What the killed billing held unsettled comes back to the new one, marked redelivered.
    await wait_until(handed_back, what="the killed billing's deliveries redelivered")
    handed = await billing_redelivered(stack)
    await reconciled(
        stack,
        ledger,
        catalog,
        "billing SIGKILL",
        f"{flying:.0f} deliveries unsettled in billing, {handed:.0f} redelivered after",
        restarted,
    )


async def test_ingestion_killed_in_the_middle_of_a_stream(
    stacks, catalog: Path, tmp_path: Path
) -> None:
    stack = await stacks(GATEWAY_DEVICE_RATE_PER_S="0")
    ledger = tmp_path / "ledger.jsonl"
    stream = long_stream("stream-i")
    restarted = asyncio.Event()
    load = asyncio.create_task(steady_load_until(stack, ledger, restarted))
    published, error = await killed_mid_stream(
        stack, stream, "ingestion_service", ("INGESTION", "ingestion_published_total")
    )
    accepted = accepted_before_failure(error)
    assert accepted is None or accepted < len(stream), error.details()
    await stack.start_service("ingestion_service")
    restarted.set()
    recovered = time.monotonic()
    sends = await resend_stream(stack, stream, ledger)
    steady = await load
    assert steady.resent > 0, "the load met no outage: was the kill under load?"
    await reconciled(
        stack,
        ledger,
        catalog,
        "ingestion SIGKILL mid-SendReadings",
        f"a stream of {len(stream)} cut after {published:.0f} readings (with the load's) were "
        f"published, {accepted} of it answered as accepted; resent ({sends} sends); the "
        f"load resent {steady.resent}",
        recovered,
    )


async def test_gateway_killed_mid_stream(stacks, catalog: Path, tmp_path: Path) -> None:
    stack = await stacks(GATEWAY_DEVICE_RATE_PER_S="0")
    ledger = tmp_path / "ledger.jsonl"
    stream = long_stream("stream-g")
    restarted = asyncio.Event()
    load = asyncio.create_task(steady_load_until(stack, ledger, restarted))
    forwarded, _ = await killed_mid_stream(
        stack, stream, "api_gateway", ("GATEWAY", "gateway_readings_accepted_total")
    )
    await stack.start_service("api_gateway")
    restarted.set()
    recovered = time.monotonic()
    sends = await resend_stream(stack, stream, ledger)
    steady = await load
    assert steady.resent > 0, "the load met no outage: was the kill under load?"
    await reconciled(
        stack,
        ledger,
        catalog,
        "gateway SIGKILL mid-stream",
        f"a stream of {len(stream)} cut after {forwarded:.0f} readings "
        f"(with the load's) had been forwarded, unanswered; resent ({sends} sends); the "
        f"load resent {steady.resent}",
        recovered,
    )


async def test_rabbitmq_node_killed_and_restarted_under_load(
    rabbit_node: RabbitNode, stacks, catalog: Path, tmp_path: Path
) -> None:
    # RabbitMQ 3.10 registers a quorum queue's Raft server in a store it writes out lazily: a
    # SIGKILL seconds after the stack declared its queues can leave one without a leader
    # for good (seen here). The fault is of a broker whose queues have long existed, so
    # the stack's queues are declared first and the node restarted cleanly, and only then
    # the stack started (its services connect once, with no reconnection to wait for).
    prefix = stack_prefix()
    connection = await aio_pika.connect(rabbit_node.url)
    async with connection:
        await declare_topology(await connection.channel(), Topology(prefix))
    await rabbit_node.restart()
    stack = await stacks(rabbitmq_url=rabbit_node.url, prefix=prefix)
    topology = Topology(stack.prefix)

    async def consuming() -> bool:
        queues = (topology.billing_queue, topology.analytics_queue)
        return all([await rabbit_node.consumers(queue) > 0 for queue in queues])

    await wait_until(consuming, timeout_s=120, what="billing and analytics consuming")
    ledger = tmp_path / "ledger.jsonl"
    back = asyncio.Event()
    load = asyncio.gather(
        steady_load_until(stack, ledger, back), steady_load_until(stack, ledger, back, batch=25)
    )
    flying = await until_in_flight(stack)
    await rabbit_node.kill()
    async with gateway_channel(stack.gateway, ADMIN_TOKEN) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.SendReading(_request("probe-down"), timeout=10)
        assert should_resend(caught.value), caught.value
    await rabbit_node.start()
    back.set()
    restarted = time.monotonic()
    unary, batched = await load
    assert unary.resent + batched.resent > 0, "the outage refused nothing: was it real?"

    async def handed_back() -> bool:
        return await billing_redelivered(stack) > 0

    await wait_until(handed_back, timeout_s=120, what="billing's unsettled deliveries redelivered")
    await reconciled(
        stack,
        ledger,
        catalog,
        "RabbitMQ node SIGKILL and restart",
        f"{flying:.0f} deliveries unsettled in billing; the loggers resent "
        f"{unary.resent + batched.resent}",
        restarted,
    )


async def test_mongodb_server_stopped_under_load_then_started(
    mongo_server: LocalMongo, stacks, catalog: Path, tmp_path: Path
) -> None:
    stack = await stacks(mongodb_url=mongo_server.url, BILLING_RETRY_MAX_DELAY_S="1")
    ledger = tmp_path / "ledger.jsonl"
    back = asyncio.Event()
    load = asyncio.create_task(steady_load_until(stack, ledger, back))
    flying = await until_in_flight(stack)
    await mongo_server.stop()
    retries_before = await stack.metric("BILLING", "billing_store_retries_total")

    async def retrying() -> bool:
        return await stack.metric("BILLING", "billing_store_retries_total") > retries_before

    await wait_until(retrying, what="billing retrying its writes")
    acked_during = await stack.metric("BILLING", "consumer_messages_total", {"outcome": "acked"})
    await asyncio.sleep(3)
    assert (
        await stack.metric("BILLING", "consumer_messages_total", {"outcome": "acked"})
        == acked_during
    ), "billing acked while its database was down"
    await mongo_server.start()
    back.set()
    restarted = time.monotonic()
    await load
    await reconciled(
        stack,
        ledger,
        catalog,
        "MongoDB server stopped under load",
        f"{flying:.0f} deliveries unsettled in billing",
        restarted,
    )


async def test_redis_unavailable_for_a_while(stacks, catalog: Path, tmp_path: Path) -> None:
    port = free_port()
    redis = await start_redis(port)
    stack = await stacks(
        REDIS_URL=f"redis://127.0.0.1:{port}/0",
        BILLING_REDIS_TIMEOUT_S="0.5",
        BILLING_CACHE_RETRY_S="0.5",
    )
    ledger = tmp_path / "ledger.jsonl"
    try:
        back = asyncio.Event()
        load = asyncio.create_task(steady_load_until(stack, ledger, back))
        flying = await until_in_flight(stack)
        redis.kill()
        await redis.wait()
        await asyncio.sleep(2)
        async with gateway_channel(stack.gateway, ADMIN_TOKEN) as channel:  # reads go on
            stub = gateway_pb2_grpc.GatewayStub(channel)
            latest = await stub.GetLatestReading(
                billing_pb2.GetLatestReadingRequest(device_id="fault-u-00001"), timeout=10
            )
            assert latest.reading.device_id == "fault-u-00001"
        deferred = await stack.metric("BILLING", "billing_cache_deferred_total")
        assert deferred > 0, "billing did not notice Redis was down"
        redis = await start_redis(port)
        back.set()
        restarted = time.monotonic()
        await load
        await reconciled(
            stack,
            ledger,
            catalog,
            "Redis down",
            f"{flying:.0f} deliveries unsettled in billing",
            restarted,
        )

        async def cache_refilled() -> bool:
            return await stack.metric("BILLING", "billing_cache_stale_buckets") == 0

        await wait_until(cache_refilled, what="deferred cache entries rewritten from MongoDB")
    finally:
        if redis.returncode is None:
            redis.terminate()
            await redis.wait()


async def test_mongodb_write_failures_injected_in_the_adapter(
    stacks, catalog: Path, tmp_path: Path
) -> None:
    """Timeouts, then connection errors, injected in billing's MongoDB adapter under load.

    Injected in the adapter, a failed write never reaches the server, so the test decides
    exactly when the store is down. (A reset connection's orphaned write may also run
    late on the server; billing's writes are idempotent upserts, so it changes nothing.)
    """
    control = tmp_path / "mongodb-faults"
    stack = await stacks(BILLING_FAULTS_FILE=str(control), BILLING_RETRY_MAX_DELAY_S="1")
    ledger = tmp_path / "ledger.jsonl"
    back = asyncio.Event()
    load = asyncio.create_task(steady_load_until(stack, ledger, back))
    flying = await until_in_flight(stack)
    control.write_text("timeout")
    await asyncio.sleep(3)
    control.write_text("refused")
    await asyncio.sleep(3)
    retries = await stack.metric("BILLING", "billing_store_retries_total")
    acked_during = await stack.metric("BILLING", "consumer_messages_total", {"outcome": "acked"})
    await asyncio.sleep(1)
    assert retries > 0, "billing did not retry"
    assert (
        await stack.metric("BILLING", "consumer_messages_total", {"outcome": "acked"})
        == acked_during
    ), "billing acked while every write failed"
    control.unlink()
    back.set()
    restarted = time.monotonic()
    await load
    await reconciled(
        stack,
        ledger,
        catalog,
        "MongoDB writes failing (adapter)",
        f"{flying:.0f} deliveries unsettled in billing",
        restarted,
    )


async def test_a_duplicate_storm_is_billed_once(stacks, catalog: Path, tmp_path: Path) -> None:
    stack = await stacks()
    ledger = tmp_path / "ledger.jsonl"
    await steady_load(stack, ledger, seconds=3)
    entries = [json.loads(line) for line in ledger.read_text().splitlines()]
    readings = [
        validate_reading(
            e["device_id"],
            datetime.fromisoformat(e["timestamp"]),
            e["usage_kwh"],
            now=datetime.now(UTC),
        )
        for e in entries[:100]
    ]
    requests = [_request_of(r) for r in readings]
    async with gateway_channel(stack.gateway, ADMIN_TOKEN) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        for _ in range(10):
            for request in requests[:30]:
                await stub.SendReading(request, timeout=10)
            answer = await stub.SendReadings(iter(requests), timeout=30)
            assert answer.accepted == len(requests)
    connection = await aio_pika.connect(RABBITMQ_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(Topology(stack.prefix).exchange)
        for _ in range(10):
            for reading in readings:
                await exchange.publish(aio_pika.Message(encode_reading(reading)), ROUTING_KEY)
    delivered = len(entries) + 10 * (30 + len(requests)) + 10 * len(readings)

    async def all_processed() -> bool:
        acked = await stack.metric("BILLING", "consumer_readings_total", {"outcome": "acked"})
        return acked >= delivered

    await wait_until(all_processed, timeout_s=90, what=f"billing to process {delivered}")
    await reconciled(
        stack,
        ledger,
        catalog,
        "duplicate storm (x10, three ways)",
        "none (not a crash)",
        time.monotonic(),
    )
    duplicates = await stack.metric("BILLING", "billing_readings_total", {"result": "duplicate"})
    assert duplicates == delivered - len(entries)


async def test_poison_messages_are_dead_lettered_and_good_ones_billed(
    stacks, catalog: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = await stacks()
    ledger = tmp_path / "ledger.jsonl"
    load = asyncio.create_task(steady_load(stack, ledger, seconds=6))
    await asyncio.sleep(2)
    good = validate_reading(
        "replayed-1", datetime.now(UTC) - timedelta(minutes=3), 2.5, now=datetime.now(UTC)
    )
    poison = {
        "not-json": b"{not json",
        "wrong-schema": json.dumps({"schema_version": 9}).encode(),
        "nan-kwh": encode_reading(good).replace(b'"usage_kwh":2.5', b'"usage_kwh":NaN'),
    }
    connection = await aio_pika.connect(RABBITMQ_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(Topology(stack.prefix).exchange)
        for message_id, body in poison.items():
            await exchange.publish(aio_pika.Message(body, message_id=message_id), ROUTING_KEY)
    await load
    await reconciled(
        stack,
        ledger,
        catalog,
        "poison messages amid load",
        "none (not a crash)",
        time.monotonic(),
    )

    monkeypatch.setenv("TOPOLOGY_PREFIX", stack.prefix)
    settings = dlq.load_settings(dlq.BrokerSettings)
    seen: dict[str, str] = {}

    async def collect(_declared, messages) -> None:  # type: ignore[no-untyped-def]
        seen.update({m.message_id: (m.headers or {}).get(REASON_HEADER, "") for m in messages})

    async def all_dead() -> bool:
        await dlq._dead_letters(settings, collect, 100)
        return set(poison) <= set(seen)

    await wait_until(all_dead, what="three dead letters")
    # billing dead-letters the poison messages (analytics too: each may appear twice)
    assert seen["not-json"].startswith("body is not JSON")
    assert seen["wrong-schema"].startswith("unsupported schema_version 9")
    assert "finite" in seen["nan-kwh"]


async def test_a_fixed_dead_letter_is_replayed_and_billed(
    stacks, catalog: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = await stacks()
    reading = validate_reading(
        "replayed-1", datetime.now(UTC) - timedelta(minutes=3), 2.5, now=datetime.now(UTC)
    )
    connection = await aio_pika.connect(RABBITMQ_URL)
    async with connection:  # as if dead-lettered by a bug that is now fixed
        channel = await connection.channel(publisher_confirms=True)
        dead = await channel.get_exchange(Topology(stack.prefix).dead_letter_exchange)
        await dead.publish(
            aio_pika.Message(
                encode_reading(reading),
                message_id="m-1",
                headers={REASON_HEADER: "a bug, now fixed"},
            ),
            ROUTING_KEY,
        )
    monkeypatch.setenv("TOPOLOGY_PREFIX", stack.prefix)
    await asyncio.to_thread(dlq.replay, ["m-1"], False)

    async def billed() -> bool:
        return await stack.metric("BILLING", "billing_readings_total", {"result": "billed"}) == 1

    await wait_until(billed, what="the replayed reading billed")
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_text(ledger_line(reading))
    await reconciled(
        stack, ledger, catalog, "a dead letter replayed", "one dead letter", time.monotonic()
    )


async def test_rolling_sigterm_of_every_service_under_load(
    stacks, catalog: Path, tmp_path: Path
) -> None:
    stack = await stacks()
    ledger = tmp_path / "ledger.jsonl"
    rolled = asyncio.Event()
    load = asyncio.gather(
        steady_load_until(stack, ledger, rolled),
        steady_load_until(stack, ledger, rolled, batch=25),
    )
    flying = await until_in_flight(stack)
    for service in ("ingestion_service", "billing_service", "analytics_service", "api_gateway"):
        await stack.restart(service)
        # The next one goes only once this one, new, has handled some of the load.
        await wait_until(
            lambda service=service: handled_some(stack, service),
            what=f"the restarted {service} handling the load",
        )
    rolled.set()
    restarted = time.monotonic()
    await load
    await reconciled(
        stack,
        ledger,
        catalog,
        "rolling SIGTERM of all four services",
        f"{flying:.0f} deliveries unsettled in billing at the first SIGTERM",
        restarted,
    )


# A counter of each service's own that grows only as it handles readings.
HANDLED = {
    "ingestion_service": ("INGESTION", "ingestion_published_total", None),
    "billing_service": ("BILLING", "consumer_readings_total", {"outcome": "acked"}),
    "analytics_service": ("ANALYTICS", "consumer_readings_total", {"outcome": "acked"}),
    "api_gateway": ("GATEWAY", "gateway_readings_accepted_total", None),
}


async def handled_some(stack: Stack, service: str) -> bool:
    """The service's process has handled readings (its counters start at 0 with it)."""
    prefix, counter, labels = HANDLED[service]
    return await stack.metric(prefix, counter, labels) > 0


async def killed_mid_stream(
    stack: Stack, stream: list[Reading], service: str, progress: tuple[str, str]
) -> tuple[float, grpc.aio.AioRpcError]:
    """Send ``stream`` as one SendReadings call and SIGKILL ``service`` once ``progress`` (a
    counter: settings prefix and metric name) has grown by two chunks; the stream's last
    chunk waits for the kill, so the call still runs then, however fast the machine.
    Returns that growth and the call's error, a cut a logger resends."""
    prefix, counter = progress
    before = await stack.metric(prefix, counter)
    killed = asyncio.Event()
    call = asyncio.create_task(send_stream(stack, stream, last_chunk_after=killed))

    async def half_way() -> bool:  # the load alone adds ~150/s; the stream thousands
        if call.done():  # before its last chunk, only by an error: raise it
            call.result()
            raise AssertionError("the stream ended before the fault")
        return await stack.metric(prefix, counter) - before >= 2 * STREAM_CHUNK

    await wait_until(half_way, timeout_s=120, what="the stream half-way through")
    grown = await stack.metric(prefix, counter) - before
    await stack.stop_service(service, signal.SIGKILL)
    killed.set()
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call
    assert_stream_cut(failed.value)
    return grown, failed.value


def assert_stream_cut(error: grpc.aio.AioRpcError) -> None:
    """A stream cut by a fault fails with a code a logger resends on (should_resend: the
    codes of backpressure and outages, and the INTERNAL grpcio reports for a write the
    client still had in flight when the call ended)."""
    assert should_resend(error), error


def _request(device: str) -> gateway_pb2.SendReadingRequest:
    return _request_of(
        validate_reading(
            device, datetime.now(UTC) - timedelta(minutes=1), 1.0, now=datetime.now(UTC)
        )
    )


def _request_of(reading) -> gateway_pb2.SendReadingRequest:  # type: ignore[no-untyped-def]
    message = reading_pb2.Reading(device_id=reading.device_id, usage_kwh=reading.usage_kwh)
    message.timestamp.FromDatetime(reading.timestamp)
    return gateway_pb2.SendReadingRequest(reading=message)
