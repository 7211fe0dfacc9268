"""Concurrent SendReading calls through the real gateway, ingestion and RabbitMQ share broker
messages: far fewer messages than calls, every OK reading queued exactly once, a nacked
message fails exactly its calls, and a lone call goes out without waiting for company."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta

import grpc
import httpx
import pytest
from prometheus_client import REGISTRY

from api_gateway.app import GatewayApp
from common.energy.v1 import gateway_pb2_grpc
from common.errors import Reason, reason_of
from common.gateway_client import gateway_channel
from common.models import Reading, derive_reading_id
from common.rabbit import Topology
from ingestion_service.app import IngestionApp
from tests.component.test_ingestion import (
    T,
    drain,
    readings_of,
    request,
    start_pipeline,
    until_the_broker_refuses,
)
from tests.conftest import (
    ADMIN_TOKEN,
    RABBITMQ_MANAGEMENT_URL,
    RABBITMQ_URL,
    delete_topology,
    wait_until,
)
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.component

CALLS = 200


@dataclass
class Publishes:
    """What ingestion was asked to publish: each publish's reading ids and how it ended."""

    batches: list[tuple[list[str], str]] = field(default_factory=list)

    def spy_on(self, ingestion: IngestionApp) -> None:
        publish = ingestion.publisher.publish

        async def recorded(readings: list[Reading]) -> None:
            ids = [r.reading_id for r in readings]
            try:
                await publish(readings)
            except Exception as error:
                self.batches.append((ids, type(error).__name__))
                raise
            self.batches.append((ids, "confirmed"))

        ingestion.publisher.publish = recorded  # type: ignore[method-assign]


@dataclass
class Answers:
    ok: list[str] = field(default_factory=list)
    refused: dict[str, grpc.aio.AioRpcError] = field(default_factory=dict)


async def send_at_once(stub: gateway_pb2_grpc.GatewayStub, calls: int) -> Answers:
    """``calls`` SendReading calls at once, each a reading of its own; every answer kept,
    by reading id."""
    answers = Answers()

    async def one(minute: int) -> None:
        device = f"meter-{minute % 10}"
        try:
            sent = request(device=device, minutes=-minute)
            answers.ok.append((await stub.SendReading(sent, timeout=30)).reading_id)
        except grpc.aio.AioRpcError as error:
            reading_id = derive_reading_id(device, T - timedelta(minutes=minute))
            answers.refused[reading_id] = error

    await asyncio.gather(*(one(minute) for minute in range(calls)))
    return answers


@pytest.fixture
async def pipeline(prefix: str) -> AsyncIterator[tuple[IngestionApp, GatewayApp]]:
    ingestion, gateway = await start_pipeline(prefix, batch_size=500)
    await ingestion.publisher._connecting  # connected before the first RPC
    yield ingestion, gateway
    await gateway.stop()
    await ingestion.stop()
    await delete_topology(prefix)


def published_messages() -> float:
    return REGISTRY.get_sample_value("ingestion_published_messages_total") or 0


async def test_concurrent_calls_share_far_fewer_messages_and_every_ok_reading_is_queued(
    pipeline, prefix: str
) -> None:
    ingestion, gateway = pipeline
    messages_before = published_messages()
    async with gateway_channel(f"127.0.0.1:{gateway.port}", ADMIN_TOKEN) as channel:
        answers = await send_at_once(gateway_pb2_grpc.GatewayStub(channel), CALLS)
    assert not answers.refused, {k: e.details() for k, e in answers.refused.items()}
    messages = await drain(Topology(prefix).billing_queue)
    print(f"\n{CALLS} calls at once: {len(messages)} broker messages")
    assert len(messages) <= CALLS // 4, f"{len(messages)} messages for {CALLS} calls"
    assert published_messages() - messages_before == len(messages)
    queued = [r.reading_id for m in messages for r in readings_of(m)]
    assert Counter(queued) == Counter(answers.ok), "every OK reading queued, exactly once"


async def test_a_nacked_message_fails_exactly_the_calls_it_held(prefix: str) -> None:
    """A queue limited to 3 messages (overflow reject-publish, as an operator's policy would
    be): the broker nacks every message after it is full, and each nack fails the calls of
    that message, and only them."""
    ingestion, gateway = await start_pipeline(
        prefix, batch_size=25, gateway_settings={"unary_batches_in_flight": 1}
    )
    await ingestion.publisher._connecting
    publishes = Publishes()
    publishes.spy_on(ingestion)
    billing_queue = Topology(prefix).billing_queue
    url = f"{RABBITMQ_MANAGEMENT_URL}/api/policies/%2F/{prefix}max-length"
    policy = {
        "pattern": f"^{billing_queue}$",
        "definition": {"max-length": 3, "overflow": "reject-publish"},
        "apply-to": "queues",
        "priority": 10,
    }
    async with httpx.AsyncClient(auth=("guest", "guest"), timeout=10) as client:
        (await client.put(url, json=policy)).raise_for_status()
        try:
            # The probes that filled it are purged: the queue takes 3 of the test's messages.
            await until_the_broker_refuses(billing_queue, purge=True)
            async with gateway_channel(f"127.0.0.1:{gateway.port}", ADMIN_TOKEN) as channel:
                answers = await send_at_once(gateway_pb2_grpc.GatewayStub(channel), CALLS)
            messages = await drain(billing_queue)
        finally:
            (await client.delete(url)).raise_for_status()
            await gateway.stop()
            await ingestion.stop()
            await delete_topology(prefix)

    confirmed = [ids for ids, outcome in publishes.batches if outcome == "confirmed"]
    nacked = [ids for ids, outcome in publishes.batches if outcome == "BrokerRefused"]
    assert len(publishes.batches) == len(confirmed) + len(nacked), publishes.batches
    assert confirmed and nacked, "the queue filled after some messages, not before or never"
    # Every call of a nacked message failed, with the queue-full reason; no other call did.
    assert sorted(answers.refused) == sorted(i for ids in nacked for i in ids)
    for error in answers.refused.values():
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        assert reason_of(error) == Reason.QUEUE_FULL
    # Every call of a confirmed message answered OK, and each is one message in the queue.
    assert sorted(answers.ok) == sorted(i for ids in confirmed for i in ids)
    assert sorted(sorted(r.reading_id for r in readings_of(m)) for m in messages) == sorted(
        sorted(ids) for ids in confirmed
    )


async def test_a_lone_call_is_published_at_once(prefix: str) -> None:
    """On an idle gateway a call's reading reaches the broker while it is the only call:
    no timer holds it back for company. The broker's link is held, so it stays in flight
    for the test to see."""
    proxy = TcpProxy.to_url(RABBITMQ_URL)
    await proxy.start()
    ingestion, gateway = await start_pipeline(prefix, proxy.url(RABBITMQ_URL), batch_size=500)
    await ingestion.publisher._connecting
    try:
        async with gateway_channel(f"127.0.0.1:{gateway.port}", ADMIN_TOKEN) as channel:
            proxy.hold()
            call = asyncio.ensure_future(
                gateway_pb2_grpc.GatewayStub(channel).SendReading(request(), timeout=30)
            )

            async def lone_reading_in_flight() -> bool:
                return ingestion.publisher.in_flight.count == 1

            await wait_until(lone_reading_in_flight, what="the lone reading to be published")
            assert (gateway.unary.in_flight, gateway.unary.waiting) == (1, 0)
            proxy.resume()
            answer = await call
        [message] = await drain(Topology(prefix).billing_queue)
        assert [r.reading_id for r in readings_of(message)] == [answer.reading_id]
    finally:
        proxy.resume()
        await gateway.stop()
        await ingestion.stop()
        await proxy.cut()
        await delete_topology(prefix)


async def test_schema_1_publishes_one_message_per_call(prefix: str) -> None:
    """INGESTION_MESSAGE_SCHEMA=1 (consumers not upgraded yet): the gateway still batches
    its calls, ingestion publishes each reading as a message of its own."""
    ingestion, gateway = await start_pipeline(prefix, batch_size=500, message_schema=1)
    await ingestion.publisher._connecting
    try:
        async with gateway_channel(f"127.0.0.1:{gateway.port}", ADMIN_TOKEN) as channel:
            answers = await send_at_once(gateway_pb2_grpc.GatewayStub(channel), 50)
        assert not answers.refused
        messages = await drain(Topology(prefix).billing_queue)
        assert sorted(m.message_id for m in messages) == sorted(answers.ok)
        assert all(len(readings_of(m)) == 1 for m in messages)
    finally:
        await gateway.stop()
        await ingestion.stop()
        await delete_topology(prefix)
