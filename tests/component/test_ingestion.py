"""Gateway and ingestion against the real RabbitMQ: confirmed means in the quorum queue,
as messages of schema version 2 (a publish's readings in one message) or, by setting, 1."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import aio_pika
import grpc
import httpx
import pytest
from aio_pika.exceptions import DeliveryError
from prometheus_client import REGISTRY

from api_gateway.app import GatewayApp
from api_gateway.settings import GatewaySettings
from common.convert import reading_to_proto
from common.energy.v1 import (
    gateway_pb2,
    gateway_pb2_grpc,
    ingestion_pb2,
    ingestion_pb2_grpc,
    reading_pb2,
)
from common.errors import Reason, error_info, reason_of, retry_delay_s
from common.gateway_client import gateway_channel
from common.messages import decode
from common.models import Reading, derive_reading_id, validate_reading
from common.rabbit import Topology
from ingestion_service.app import IngestionApp
from ingestion_service.settings import IngestionSettings
from tests.conftest import (
    ADMIN_TOKEN,
    RABBITMQ_MANAGEMENT_URL,
    RABBITMQ_URL,
    delete_topology,
    free_port,
    queue_info,
    wait_until,
)
from tests.tcp_proxy import TcpProxy

T = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)


def request(device: str = "meter-1", minutes: int = 0, kwh: float = 1.5, **kw: object):
    reading = reading_pb2.Reading(device_id=device, usage_kwh=kwh, **kw)  # type: ignore[arg-type]
    reading.timestamp.FromDatetime(T + timedelta(minutes=minutes))
    return gateway_pb2.SendReadingRequest(reading=reading)


async def start_pipeline(
    prefix: str,
    rabbitmq_url: str = RABBITMQ_URL,
    ingestion_addr=None,
    max_in_flight_readings: int = 2000,
    batch_size: int = 7,
    gateway_settings: dict[str, object] | None = None,
    confirm_timeout_s: float = 3,
    **ingestion_settings: object,
):
    ingestion = IngestionApp(
        IngestionSettings(
            port=0,
            topology_prefix=prefix,
            rabbitmq_url=rabbitmq_url,
            confirm_timeout_s=confirm_timeout_s,
            max_in_flight_readings=max_in_flight_readings,
            **ingestion_settings,  # type: ignore[arg-type]
        )
    )
    await ingestion.start()
    gateway = GatewayApp(
        GatewaySettings(
            port=0,
            batch_size=batch_size,
            ingestion_addr=ingestion_addr or f"127.0.0.1:{ingestion.port}",
            ingestion_timeout_s=3,
            admin_token=ADMIN_TOKEN,
            mongodb_database=prefix.strip("-"),
            redis_key_prefix=prefix,
            **(gateway_settings or {}),  # type: ignore[arg-type]
        )
    )
    await gateway.start()
    return ingestion, gateway


@pytest.fixture
async def stub(prefix: str) -> AsyncIterator[gateway_pb2_grpc.GatewayStub]:
    ingestion, gateway = await start_pipeline(prefix)
    await ingestion.publisher._connecting  # connected before the first RPC
    channel = gateway_channel(f"127.0.0.1:{gateway.port}", ADMIN_TOKEN)
    yield gateway_pb2_grpc.GatewayStub(channel)
    await channel.close()
    await gateway.stop()
    await ingestion.stop()
    await delete_topology(prefix)


async def drain(
    queue_name: str, rabbitmq_url: str = RABBITMQ_URL
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    connection = await aio_pika.connect(rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, passive=True)
        messages = []
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            messages.append(message)
        return messages


def readings_of(message: aio_pika.abc.AbstractIncomingMessage) -> list[Reading]:
    """The readings a message holds, decoded (and re-validated) as the consumers do."""
    decoded = decode(message.body, now=datetime.now(UTC))
    assert decoded.invalid == [], decoded.invalid
    return decoded.readings


async def drain_reading_ids(queue_name: str, rabbitmq_url: str = RABBITMQ_URL) -> list[str]:
    """The reading ids of every message in the queue, in queue order; the queue is empty
    afterwards."""
    messages = await drain(queue_name, rabbitmq_url)
    return [reading.reading_id for message in messages for reading in readings_of(message)]


async def test_a_confirmed_reading_is_in_both_quorum_queues(stub, prefix: str) -> None:
    response = await stub.SendReading(request(kwh=2.25), timeout=10)
    topology = Topology(prefix)
    assert response.reading_id == derive_reading_id("meter-1", T)
    for name in (topology.billing_queue, topology.analytics_queue):
        info = await queue_info(name)
        assert info["type"] == "quorum" and info["durable"] is True
        assert info["arguments"]["x-dead-letter-exchange"] == topology.dead_letter_exchange
    [message] = await drain(topology.billing_queue)
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.content_type == "application/json"
    body = json.loads(message.body)
    assert body["schema_version"] == 2 and message.message_id == body["batch_id"]
    assert len(body["batch_id"]) == 32  # a uuid4, hex: a new id for every message
    [element] = body["readings"]
    assert element["reading_id"] == response.reading_id and element["usage_kwh"] == 2.25
    assert element["timestamp"] == T.isoformat(timespec="microseconds")


async def test_an_invalid_reading_is_refused_and_nothing_is_published(stub, prefix: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SendReading(request(kwh=float("nan")), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "usage_kwh" in caught.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SendReading(gateway_pb2.SendReadingRequest(), timeout=10)
    assert caught.value.details().startswith("reading: is missing")
    assert await drain(Topology(prefix).billing_queue) == []


async def test_a_stream_publishes_the_valid_readings_and_lists_the_rest(stub, prefix) -> None:
    requests = [request(minutes=i) for i in range(20)]
    requests[3] = request(device="bad id", minutes=3)
    requests[11] = request(minutes=11, kwh=-1)

    async def stream():
        for r in requests:
            yield r

    response = await stub.SendReadings(stream(), timeout=10)
    assert response.accepted == 18 and response.rejected_count == 2
    assert [(r.index, r.device_id) for r in response.rejected] == [(3, "bad id"), (11, "meter-1")]
    assert "negative" in response.rejected[1].reason
    messages = await drain(Topology(prefix).billing_queue)
    # Forwarded in chunks of GATEWAY_BATCH_SIZE (7 here), each chunk one message.
    assert [len(readings_of(m)) for m in messages] == [7, 7, 4]
    assert len({m.message_id for m in messages}) == 3


async def test_stream_messages_carrying_many_readings_count_each_reading_in_order(
    stub, prefix
) -> None:
    def packed(*minutes: int, device: str = "meter-1") -> gateway_pb2.SendReadingRequest:
        return gateway_pb2.SendReadingRequest(
            readings=[request(device=device, minutes=m).reading for m in minutes]
        )

    both = packed(20, 21)
    both.reading.CopyFrom(request(minutes=22).reading)
    bad = packed(5, 6, 7)
    bad.readings[1].usage_kwh = -1
    requests = [
        packed(0, 1, 2, 3, 4),  # indexes 0-4
        bad,  # 5-7, the negative one at 6
        request(minutes=8),  # 8
        both,  # 9-11: neither of its parts is taken
        packed(12, device="bad id"),  # 12
        packed(*range(13, 20)),  # 13-19
    ]

    async def stream():
        for r in requests:
            yield r

    response = await stub.SendReadings(stream(), timeout=10)
    assert response.accepted == 15 and response.rejected_count == 5
    assert [(r.index, r.device_id) for r in response.rejected] == [
        (6, "meter-1"),
        (9, "meter-1"),
        (12, "bad id"),
    ]
    assert "negative" in response.rejected[0].reason
    assert "along with `readings` (2)" in response.rejected[1].reason
    reading_ids = await drain_reading_ids(Topology(prefix).billing_queue)
    expected = [m for m in range(20) if m not in (6, 9, 10, 11, 12)]
    assert reading_ids == [derive_reading_id("meter-1", T + timedelta(minutes=m)) for m in expected]

    # SendReading takes one reading: a request with `readings` is refused and nothing sent.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SendReading(packed(30, 31), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("readings: SendReading takes one reading")
    assert await drain(Topology(prefix).billing_queue) == []


async def test_the_stream_limit_counts_packed_readings(prefix: str) -> None:
    ingestion, gateway = await start_pipeline(prefix, gateway_settings={"max_stream_readings": 10})
    await ingestion.publisher._connecting  # connected before the first RPC
    channel = gateway_channel(f"127.0.0.1:{gateway.port}", ADMIN_TOKEN)
    try:
        stub = gateway_pb2_grpc.GatewayStub(channel)

        async def stream():
            yield gateway_pb2.SendReadingRequest(
                readings=[request(minutes=m).reading for m in range(11)]
            )

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.SendReadings(stream(), timeout=10)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # The readings before the limit went out in chunks of 7: 7 accepted, 3 not.
        assert "at most 10 readings" in caught.value.details()
        assert "7 readings of this stream were accepted" in caught.value.details()
    finally:
        await channel.close()
        await gateway.stop()
        await ingestion.stop()
        await delete_topology(prefix)


async def test_a_stream_message_above_the_size_limit_fails_the_stream_and_a_resend_fits(
    prefix: str,
) -> None:
    """Packed messages make the request size limit reachable: a message above
    GATEWAY_MAX_MESSAGE_BYTES ends the stream with RESOURCE_EXHAUSTED naming both sizes,
    readings not yet forwarded are not published, and the same readings resent in smaller
    messages are all accepted."""
    ingestion, gateway = await start_pipeline(prefix, gateway_settings={"max_message_bytes": 2048})
    await ingestion.publisher._connecting
    channel = gateway_channel(f"127.0.0.1:{gateway.port}", ADMIN_TOKEN)
    # Three devices, 35 minutes each: all in the past hour, every (device, minute) new.
    readings = [request(f"meter-{m // 35}", minutes=m % 35).reading for m in range(105)]
    try:
        stub = gateway_pb2_grpc.GatewayStub(channel)

        async def stream(per_message: int):
            yield gateway_pb2.SendReadingRequest(readings=readings[:5])
            for start in range(5, len(readings), per_message):
                yield gateway_pb2.SendReadingRequest(readings=readings[start : start + per_message])

        oversized = gateway_pb2.SendReadingRequest(readings=readings[5:]).ByteSize()
        assert oversized > 2048
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.SendReadings(stream(per_message=100), timeout=10)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"({oversized} vs. 2048)" in caught.value.details()
        # The first 5 waited for a chunk of 7: none was forwarded, none is in the queue.
        assert await drain(Topology(prefix).billing_queue) == []

        response = await stub.SendReadings(stream(per_message=20), timeout=10)
        assert response.accepted == 105 and response.rejected_count == 0
        assert len(await drain_reading_ids(Topology(prefix).billing_queue)) == 105
    finally:
        await channel.close()
        await gateway.stop()
        await ingestion.stop()
        await delete_topology(prefix)


async def test_an_answer_larger_than_the_request_limit_still_reaches_the_caller(
    prefix: str,
) -> None:
    """GATEWAY_MAX_MESSAGE_BYTES bounds requests only: a stream of small messages whose
    answer lists more rejections than that many bytes gets its whole answer, and its good
    readings are published once."""
    ingestion, gateway = await start_pipeline(prefix, gateway_settings={"max_message_bytes": 2048})
    await ingestion.publisher._connecting
    channel = gateway_channel(f"127.0.0.1:{gateway.port}", ADMIN_TOKEN)
    good = [request("meter-ok", minutes=m) for m in range(5)]
    # A day ahead: each is rejected, and its rejection names it.
    future = [request(f"meter-ahead-{n:02d}", minutes=24 * 60 + n) for n in range(40)]
    try:
        stub = gateway_pb2_grpc.GatewayStub(channel)

        async def stream():
            for message in [*good, *future]:
                yield message

        response = await stub.SendReadings(stream(), timeout=10)
        assert response.ByteSize() > 2048
        assert response.accepted == 5 and response.rejected_count == 40
        assert [r.device_id for r in response.rejected] == [
            f"meter-ahead-{n:02d}" for n in range(40)
        ]
        assert len(await drain_reading_ids(Topology(prefix).billing_queue)) == 5
    finally:
        await channel.close()
        await gateway.stop()
        await ingestion.stop()
        await delete_topology(prefix)


async def test_a_large_publish_is_split_into_messages_of_at_most_the_cap(prefix: str) -> None:
    ingestion, gateway = await start_pipeline(prefix, max_message_readings=500)
    await ingestion.publisher._connecting
    messages_before = REGISTRY.get_sample_value("ingestion_published_messages_total") or 0
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ingestion.port}") as channel:
            stub = ingestion_pb2_grpc.IngestionStub(channel)
            assert (await stub.Publish(publish_request(0, 1200), timeout=30)).published == 1200
        messages = await drain(Topology(prefix).billing_queue)
        assert [len(readings_of(m)) for m in messages] == [500, 500, 200]
        assert (
            REGISTRY.get_sample_value("ingestion_published_messages_total") == messages_before + 3
        )
    finally:
        await gateway.stop()
        await ingestion.stop()
        await delete_topology(prefix)


async def test_schema_1_publishes_one_message_per_reading(prefix: str) -> None:
    """INGESTION_MESSAGE_SCHEMA=1, for consumers not upgraded yet: as before schema 2."""
    ingestion, gateway = await start_pipeline(prefix, message_schema=1)
    await ingestion.publisher._connecting
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ingestion.port}") as channel:
            stub = ingestion_pb2_grpc.IngestionStub(channel)
            sent = publish_request(0, 5)
            assert (await stub.Publish(sent, timeout=30)).published == 5
        messages = await drain(Topology(prefix).billing_queue)
        sent_ids = [r.reading_id for r in sent.readings]
        assert [m.message_id for m in messages] == sent_ids
        assert {json.loads(m.body)["schema_version"] for m in messages} == {1}
        assert [r.reading_id for m in messages for r in readings_of(m)] == sent_ids
    finally:
        await gateway.stop()
        await ingestion.stop()
        await delete_topology(prefix)


async def test_broker_unreachable_means_unavailable_and_nothing_accepted(prefix: str) -> None:
    closed = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    ingestion, gateway = await start_pipeline(prefix, rabbitmq_url=closed)
    published_before = REGISTRY.get_sample_value("ingestion_published_total")
    try:
        async with gateway_channel(f"127.0.0.1:{gateway.port}", ADMIN_TOKEN) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.SendReading(request(), timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "RabbitMQ" in caught.value.details()

            async def one():
                yield request()

            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.SendReadings(one(), timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "0 readings of this stream were accepted" in caught.value.details()
    finally:
        await gateway.stop()
        await ingestion.stop()
    assert REGISTRY.get_sample_value("ingestion_published_total") == published_before


async def test_ingestion_unreachable_means_unavailable(prefix: str) -> None:
    gateway = GatewayApp(
        GatewaySettings(
            port=0,
            ingestion_addr=f"127.0.0.1:{free_port()}",
            ingestion_timeout_s=2,
            admin_token=ADMIN_TOKEN,
            mongodb_database=prefix.strip("-"),  # never the default `energy` of make dev
            redis_key_prefix=prefix,
        )
    )
    await gateway.start()
    try:
        async with gateway_channel(f"127.0.0.1:{gateway.port}", ADMIN_TOKEN) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await gateway_pb2_grpc.GatewayStub(channel).SendReading(request(), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "ingestion service unreachable" in caught.value.details()
    finally:
        await gateway.stop()
    info = error_info(caught.value)  # a typed reason naming the service, not only text
    assert info is not None and info.reason == Reason.UPSTREAM_UNAVAILABLE
    assert dict(info.metadata) == {"service": "ingestion"}


def publish_request(first_minute: int, count: int) -> ingestion_pb2.PublishRequest:
    now = datetime.now(UTC)
    readings = [
        validate_reading("meter-1", T - timedelta(minutes=first_minute + i), 1.0, now=now)
        for i in range(count)
    ]
    return ingestion_pb2.PublishRequest(readings=[reading_to_proto(r) for r in readings])


def busy_refusals() -> float:
    return REGISTRY.get_sample_value("ingestion_publish_failures_total", {"reason": "busy"}) or 0


@asynccontextmanager
async def held(prefix: str, confirm_timeout_s: float = 3):  # type: ignore[no-untyped-def]
    """Ingestion (at most 10 readings in flight) and a gateway, with ingestion's broker
    connection through a proxy the test may hold: held, nothing is confirmed."""
    proxy = TcpProxy.to_url(RABBITMQ_URL)
    await proxy.start()
    ingestion, gateway = await start_pipeline(
        prefix,
        proxy.url(RABBITMQ_URL),
        max_in_flight_readings=10,
        confirm_timeout_s=confirm_timeout_s,
    )
    await ingestion.publisher._connecting
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{ingestion.port}")
    public = gateway_channel(f"127.0.0.1:{gateway.port}", ADMIN_TOKEN)
    try:
        yield (
            proxy,
            ingestion,
            ingestion_pb2_grpc.IngestionStub(channel),
            gateway_pb2_grpc.GatewayStub(public),
        )
    finally:
        proxy.resume()
        await public.close()
        await channel.close()
        await gateway.stop()
        await ingestion.stop()
        await proxy.cut()
        await delete_topology(prefix)


@pytest.fixture
async def held_pipeline(prefix: str):  # type: ignore[no-untyped-def]
    async with held(prefix) as pipeline:
        yield pipeline


@pytest.fixture
async def held_pipeline_confirming_in_1s(prefix: str):  # type: ignore[no-untyped-def]
    """The held pipeline with a confirm timeout of 1 s, for a test that waits one out: the
    held link confirms nothing, however long the wait."""
    async with held(prefix, confirm_timeout_s=1) as pipeline:
        yield pipeline


async def test_readings_waiting_for_confirms_are_bounded_and_refused_at_once_beyond(
    held_pipeline, prefix: str
) -> None:
    proxy, ingestion, stub, gateway = held_pipeline
    in_flight = ingestion.publisher.in_flight
    refusals_before = busy_refusals()
    proxy.hold()
    first = asyncio.ensure_future(stub.Publish(publish_request(0, 6), timeout=60))
    await wait_until(_counted(in_flight, 6), what="6 readings in flight")

    with pytest.raises(grpc.aio.AioRpcError) as caught:  # 6 + 5 > 10, and long before 60 s
        await stub.Publish(publish_request(6, 5), timeout=60)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason_of(caught.value) == Reason.INGESTION_BUSY
    assert (retry_delay_s(caught.value) or 0) > 0
    assert "nothing of these 5 was published" in (caught.value.details() or "")
    assert in_flight.count == 6, "a refusal counts nothing"

    second = asyncio.ensure_future(stub.Publish(publish_request(11, 4), timeout=60))  # fits
    await wait_until(_counted(in_flight, 10), what="10 readings in flight")
    with pytest.raises(grpc.aio.AioRpcError) as caught:  # the gateway passes it all on
        await gateway.SendReading(request(minutes=30), timeout=60)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason_of(caught.value) == Reason.INGESTION_BUSY
    assert (retry_delay_s(caught.value) or 0) > 0

    proxy.resume()
    assert [(await first).published, (await second).published] == [6, 4]
    assert in_flight.count == 0, "confirmed readings are released"
    assert busy_refusals() == refusals_before + 2
    # Larger than the bound, but alone: admitted rather than never possible.
    assert (await stub.Publish(publish_request(15, 25), timeout=60)).published == 25
    # One message per publish (all smaller than a message may hold): 6, 4 and 25 readings.
    messages = await drain(Topology(prefix).billing_queue)
    assert sorted(len(readings_of(m)) for m in messages) == [4, 6, 25]


async def test_a_timed_out_or_nacked_publish_leaves_nothing_in_flight(
    held_pipeline_confirming_in_1s, prefix: str
) -> None:
    proxy, ingestion, stub, _ = held_pipeline_confirming_in_1s
    in_flight = ingestion.publisher.in_flight
    proxy.hold()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Publish(publish_request(0, 8), timeout=60)
    assert reason_of(caught.value) == Reason.CONFIRM_TIMEOUT
    assert in_flight.count == 0, "given up on: released"
    proxy.resume()
    # The nack must come back as a nack, however slow the broker: a long wait from now on.
    ingestion.publisher._confirm_timeout_s = 30

    name = f"{prefix}max-length"
    url = f"{RABBITMQ_MANAGEMENT_URL}/api/policies/%2F/{name}"
    policy = {
        "pattern": f"^{Topology(prefix).billing_queue}$",
        "definition": {"max-length": 0},
        "apply-to": "queues",
        "priority": 10,
    }
    async with httpx.AsyncClient(auth=("guest", "guest"), timeout=10) as client:
        (await client.put(url, json=policy)).raise_for_status()
        try:
            await until_the_broker_refuses(Topology(prefix).billing_queue)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Publish(publish_request(10, 8), timeout=60)
            assert reason_of(caught.value) == Reason.QUEUE_FULL
            assert in_flight.count == 0, "nacked: released"
        finally:
            (await client.delete(url)).raise_for_status()


def _counted(in_flight, readings: int):  # type: ignore[no-untyped-def]
    async def check() -> bool:
        return in_flight.count == readings

    return check


async def until_the_broker_refuses(
    queue_name: str, purge: bool = False, timeout_s: float = 60
) -> None:
    """Publish probes to the queue until the broker nacks one: a max-length policy with
    reject-publish is in force. The broker applies a policy at once; the management API
    shows it only after its next statistics round (5 s or more).

    A quorum queue refuses once it holds its max-length, so the probes that went in stay
    (with max-length 0 they may be what fills it) unless ``purge``: then it is empty again.
    """
    connection = await aio_pika.connect(RABBITMQ_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)

        async def refused() -> bool:
            try:
                await channel.default_exchange.publish(aio_pika.Message(b"probe"), queue_name)
            except DeliveryError:
                return True
            return False

        await wait_until(refused, timeout_s, what=f"the broker to refuse publishes to {queue_name}")
        if purge:
            await (await channel.declare_queue(queue_name, passive=True)).purge()
