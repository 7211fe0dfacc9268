"""Backpressure on a slow broker: refused at once with a reason and a delay, then billed once.

Ingestion's broker connection goes through the slowed proxy (``slow_broker_stack``), so
RabbitMQ confirms several times slower than on this machine. More readings than
INGESTION_MAX_IN_FLIGHT_READINGS (2,000) arrive at once: the calls beyond get
RESOURCE_EXHAUSTED with reason INGESTION_BUSY and a RetryInfo, never DEADLINE_EXCEEDED;
loggers that resend after the delay get every reading through, each billed exactly once.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from common.energy.v1 import gateway_pb2, gateway_pb2_grpc, reading_pb2
from common.errors import Reason, reason_of, retry_delay_s
from common.gateway_client import gateway_channel
from common.models import Reading, validate_reading
from common.rabbit import Topology
from ingestion_service.adapters.rabbit import RabbitPublisher
from scripts.client_options import RESEND_CODES, resend_delay_s, should_resend
from scripts.reconcile import reconcile, render
from scripts.simulate import FleetConfig, FleetSummary, run_fleet
from tests.conftest import ADMIN_TOKEN, RABBITMQ_URL, delete_topology, wait_until
from tests.e2e.conftest import (
    RESEND_FOR_S,
    SLOW_BROKER_CHUNK_BYTES,
    SLOW_BROKER_WRITE_DELAY_S,
    Stack,
)
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.timeout(900)  # the waits end when billing holds everything

# Far beyond the gateway's 5 s forward deadline: a DEADLINE_EXCEEDED could only be that one.
CALL_DEADLINE_S = 300
STREAMS, STREAM_READINGS = 16, 500  # four times the bound, at once
# Three of the streams' batches in flight (1,500 readings) and a crowd of 900 single
# readings: 400 of them are beyond the bound. The crowd and the streams stay within the
# gateway's GATEWAY_MAX_CONCURRENT_RPCS (1,000), which would refuse without a reason.
MOSTLY_TAKEN, SINGLES, ROUNDS = 1500, 900, 10
# How long billing may take to hold every acknowledged reading (it drains 1,000-1,500/s).
RECONCILE_WAIT_S = 300
# The resending loggers' run: at 8,000 readings/s, one batch of 500 per logger (20 loggers,
# 10,000 readings issued within 1.25 s, up to 16 at a time: 8,000 readings against a bound
# of 2,000). A longer run only adds readings for billing to drain, no refusal of a new kind.
FLEET_S = 1.25


async def confirmed_per_s(url: str, prefix: str, readings: int = 4000) -> float:
    """Readings/s ingestion's publisher gets confirmed at ``url``, 2,000 in flight (the
    default bound) in batches of 500 (the gateway's)."""
    publisher = RabbitPublisher(url, Topology(prefix), 60, max_in_flight_readings=2000)
    await publisher.start()
    await publisher._connecting
    now = datetime.now(UTC)
    batches = [
        [
            validate_reading(f"rate-{b}", now - timedelta(minutes=i), 0.5, now=now)
            for i in range(500)
        ]
        for b in range(readings // 500)
    ]
    window = asyncio.Semaphore(4)

    async def publish(batch: list[Reading]) -> None:
        async with window:
            await publisher.publish(batch)

    started = time.perf_counter()
    try:
        await asyncio.gather(*(publish(b) for b in batches))
        return readings / (time.perf_counter() - started)
    finally:
        await publisher.close()


async def test_the_slowed_proxy_confirms_several_times_slower(prefix: str) -> None:
    proxy = TcpProxy.to_url(RABBITMQ_URL, SLOW_BROKER_WRITE_DELAY_S, SLOW_BROKER_CHUNK_BYTES)
    await proxy.start()
    try:
        direct = await confirmed_per_s(RABBITMQ_URL, prefix)
        slowed = await confirmed_per_s(proxy.url(RABBITMQ_URL), prefix)
    finally:
        await proxy.cut()
        await delete_topology(prefix)
    print(
        f"\nconfirmed readings/s, 2,000 in flight: broker {direct:.0f}, through the slowed "
        f"proxy {slowed:.0f}: {direct / slowed:.1f} times slower"
    )
    assert slowed < direct


def reading(device: str, minutes_ago: int, now: datetime) -> reading_pb2.Reading:
    message = reading_pb2.Reading(device_id=device, usage_kwh=0.125)
    message.timestamp.FromDatetime(now - timedelta(minutes=minutes_ago))
    return message


async def until_accepted(
    send: Callable[[], Awaitable[object]], refusals: list[grpc.aio.AioRpcError]
) -> None:
    """Send until accepted, as a logger: wait the refusal's delay and resend. Every answer
    the server gave is kept (the ones grpc's Python client lost are resent, nothing more:
    see scripts.client_options.should_resend); what a logger would not resend ends the test."""
    while True:
        try:
            await send()
            return
        except grpc.aio.AioRpcError as error:
            if not should_resend(error):
                raise
            if error.code() in RESEND_CODES:
                refusals.append(error)
            await asyncio.sleep(resend_delay_s(error, backoff_s=1.0))


async def test_calls_beyond_the_bound_are_refused_at_once_with_a_reason_and_a_delay(
    slow_broker_stack: Stack,
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    run = uuid.uuid4().hex[:6]
    stream_refusals: list[grpc.aio.AioRpcError] = []
    unary_refusals: list[grpc.aio.AioRpcError] = []
    async with gateway_channel(slow_broker_stack.gateway, ADMIN_TOKEN) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)

        async def stream(number: int) -> None:
            requests = [
                gateway_pb2.SendReadingRequest(reading=reading(f"burst-{run}-{number}", i, now))
                for i in range(STREAM_READINGS)
            ]

            async def send() -> None:
                reply = await stub.SendReadings(iter(requests), timeout=CALL_DEADLINE_S)
                assert reply.accepted == STREAM_READINGS

            await until_accepted(send, stream_refusals)

        async def singles(round_number: int) -> None:
            """SINGLES loggers send one reading each, at once; each resent until accepted."""
            requests = [
                gateway_pb2.SendReadingRequest(
                    reading=reading(f"single-{run}-{n}", round_number, now)
                )
                for n in range(SINGLES)
            ]
            await asyncio.gather(
                *(
                    until_accepted(
                        lambda r=r: stub.SendReading(r, timeout=CALL_DEADLINE_S), unary_refusals
                    )
                    for r in requests
                )
            )

        pressure = asyncio.gather(*(stream(n) for n in range(STREAMS)))

        async def bound_mostly_taken() -> bool:
            in_flight = await slow_broker_stack.metric("INGESTION", "ingestion_in_flight_readings")
            return pressure.done() or in_flight >= MOSTLY_TAKEN

        # Single readings in flight keep the streams' batches from taking the whole bound, so
        # the singles come as a crowd, once the streams hold most of it: some are beyond it.
        for round_number in range(ROUNDS):
            await wait_until(bound_mostly_taken, what="the streams to take the bound")
            if pressure.done() or unary_refusals:
                break
            await singles(round_number)
        await pressure

    refusals = stream_refusals + unary_refusals
    print(
        f"\n{STREAMS} streams of {STREAM_READINGS}, crowds of {SINGLES} single readings: "
        f"{len(stream_refusals)} stream and {len(unary_refusals)} single refusals, delays "
        f"{min(retry_delay_s(r) or 0 for r in refusals):.2f}-"
        f"{max(retry_delay_s(r) or 0 for r in refusals):.2f} s"
    )
    assert stream_refusals, "more than the bound at once, yet no stream was refused"
    assert unary_refusals, "no SendReading was refused while the bound was taken"
    for refusal in refusals:
        assert refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refusal.details()
        assert reason_of(refusal) == Reason.INGESTION_BUSY, refusal.details()
        assert (retry_delay_s(refusal) or 0) > 0, refusal.details()
    # A stream of 500 is one forward: refused, nothing of it was accepted.
    assert all(
        "0 readings of this stream were accepted" in (r.details() or "") for r in stream_refusals
    )
    for method in ("SendReading", "SendReadings"):
        assert (
            await slow_broker_stack.metric(
                "GATEWAY",
                "grpc_server_handled_total",
                {"grpc_method": method, "grpc_code": "DEADLINE_EXCEEDED"},
            )
            == 0
        ), method
    assert await slow_broker_stack.metric(
        "GATEWAY", "gateway_readings_not_forwarded_total", {"reason": "INGESTION_BUSY"}
    ) >= STREAM_READINGS * len(stream_refusals) + len(unary_refusals)
    # Ingestion counts refused calls: a stream's chunk is one, and so is a batch of single
    # readings the gateway gathered (all of its calls refused together).
    assert (
        await slow_broker_stack.metric(
            "INGESTION", "ingestion_publish_failures_total", {"reason": "busy"}
        )
        >= len(stream_refusals) + 1
    )


async def test_resending_loggers_get_everything_through_and_billed_once(
    slow_broker_stack: Stack, tmp_path: Path
) -> None:
    """Loggers with buffers, by SendReadings and by SendReading at once, more than the slow
    broker confirms: they resend what was refused, and the ledger of what was acknowledged
    is billed exactly once."""
    stack = slow_broker_stack
    refused_before = await stack.metric(
        "GATEWAY", "gateway_readings_not_forwarded_total", {"reason": "INGESTION_BUSY"}
    )

    def fleet(batch: int, rate: float, concurrency: int) -> FleetConfig:
        return FleetConfig(
            devices=20,
            rate=rate,
            duration_s=FLEET_S,
            target=stack.gateway,
            batch=batch,
            concurrency=concurrency,
            timeout_s=CALL_DEADLINE_S,
            device_prefix=f"logger-{'b' if batch else 'u'}",
            show_progress=False,
            ledger=str(tmp_path / f"ledger-{batch}.jsonl"),
            resend_for_s=RESEND_FOR_S,
            token=ADMIN_TOKEN,
        )

    batched, single = await asyncio.gather(
        # Four times what the slowed proxy confirms now that a batch is one message (about
        # 2,000 readings/s, bytes being its limit): the batches must meet the bound.
        run_fleet(fleet(batch=500, rate=8000, concurrency=16)),
        run_fleet(fleet(batch=0, rate=200, concurrency=64)),
    )
    summaries: tuple[FleetSummary, ...] = (batched, single)
    print("\n" + "\n".join(s.render() for s in summaries))
    assert all(s.ok for s in summaries), [s.render() for s in summaries]
    assert batched.resent > 0, "the batches never met the bound: no backpressure was tested"
    assert (
        await stack.metric(
            "GATEWAY", "gateway_readings_not_forwarded_total", {"reason": "INGESTION_BUSY"}
        )
        > refused_before
    )
    for method in ("SendReading", "SendReadings"):
        assert (
            await stack.metric(
                "GATEWAY",
                "grpc_server_handled_total",
                {"grpc_method": method, "grpc_code": "DEADLINE_EXCEEDED"},
            )
            == 0
        ), method

    ledger = tmp_path / "ledger.jsonl"
    ledger.write_text("".join((tmp_path / f"ledger-{b}.jsonl").read_text() for b in (500, 0)))
    results = await reconcile(ledger, stack.gateway, wait_s=RECONCILE_WAIT_S, token=ADMIN_TOKEN)
    report = render(results)
    print(report.splitlines()[-1])
    assert sum(len(d.expected) for d in results) == batched.planned + single.planned
    assert all(d.exact for d in results), report + "\n" + stack.logs()
