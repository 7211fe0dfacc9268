"""Device tokens, rate limits and limits at the gateway, against real RabbitMQ, Redis, SecantusDB.

Every refusal must publish nothing: the test's billing queue is checked after each.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY
from pymongo import AsyncMongoClient

from api_gateway.app import GatewayApp
from api_gateway.settings import GatewaySettings
from common.energy.v1 import billing_pb2, gateway_pb2, gateway_pb2_grpc
from common.gateway_client import gateway_channel
from common.rabbit import Topology
from ingestion_service.app import IngestionApp
from ingestion_service.settings import IngestionSettings
from tests.component.test_ingestion import drain_reading_ids, request
from tests.conftest import (
    ADMIN_TOKEN,
    MONGODB_URL,
    RABBITMQ_URL,
    REDIS_URL,
    delete_topology,
    free_port,
    wait_until,
)

Code = grpc.StatusCode


@dataclass
class Gateway:
    prefix: str
    port: int
    app: GatewayApp

    def stub(self, token: str | None) -> gateway_pb2_grpc.GatewayStub:
        channel = gateway_channel(f"127.0.0.1:{self.port}", token)
        self._channels.append(channel)
        return gateway_pb2_grpc.GatewayStub(channel)

    def admin(self, token: str | None = ADMIN_TOKEN) -> gateway_pb2_grpc.DeviceAdminStub:
        channel = gateway_channel(f"127.0.0.1:{self.port}", token)
        self._channels.append(channel)
        return gateway_pb2_grpc.DeviceAdminStub(channel)

    async def register(self, device_id: str) -> str:
        answer = await self.admin().RegisterDevice(
            gateway_pb2.RegisterDeviceRequest(device_id=device_id), timeout=10
        )
        return answer.token

    async def published(self) -> int:
        """Readings published to the test's billing queue so far (however many a message
        carries)."""
        self._published += await drain_reading_ids(Topology(self.prefix).billing_queue)
        return len(self._published)

    def __post_init__(self) -> None:
        self._channels: list[grpc.aio.Channel] = []
        self._published: list[str] = []


async def start_gateway(prefix: str, ingestion_port: int, **overrides: object) -> GatewayApp:
    settings = {
        "port": 0,
        "ingestion_addr": f"127.0.0.1:{ingestion_port}",
        "ingestion_timeout_s": 5,
        "admin_token": ADMIN_TOKEN,
        "mongodb_database": prefix.strip("-"),
        "redis_key_prefix": prefix,
        **overrides,
    }
    app = GatewayApp(GatewaySettings(**settings))  # type: ignore[arg-type]
    await app.start()
    return app


@pytest.fixture(autouse=True)
async def own_stores(prefix: str) -> AsyncIterator[None]:
    """Drop the test's database (devices, tokens) and Redis keys (buckets) afterwards."""
    yield
    mongo = AsyncMongoClient(MONGODB_URL, serverSelectionTimeoutMS=5000)
    await mongo.drop_database(prefix.strip("-"))
    await mongo.close()
    client = aioredis.Redis.from_url(REDIS_URL, socket_timeout=5)
    keys = [key async for key in client.scan_iter(f"{prefix}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture
async def redis_client() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(REDIS_URL, socket_timeout=5)
    yield client
    await client.aclose()


@pytest.fixture
async def ingestion(prefix: str) -> AsyncIterator[IngestionApp]:
    app = IngestionApp(IngestionSettings(port=0, topology_prefix=prefix, confirm_timeout_s=5))
    await app.start()
    await app.publisher._connecting
    yield app
    await app.stop()
    await delete_topology(prefix)


@pytest.fixture
async def gateway(prefix: str, ingestion: IngestionApp) -> AsyncIterator[Gateway]:
    app = await start_gateway(prefix, ingestion.port)
    yield Gateway(prefix, app.port, app)
    await app.stop()


async def refused(call, code: grpc.StatusCode) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return caught.value.details() or ""


async def test_no_wrong_revoked_or_foreign_token_publishes_nothing(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = await gateway.register("meter-a")
    other = await gateway.register("meter-b")
    reading = request("meter-a")

    assert "Bearer" in await refused(gateway.stub(None).SendReading(reading), Code.UNAUTHENTICATED)
    wrong = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    await refused(gateway.stub(wrong).SendReading(reading), Code.UNAUTHENTICATED)
    await refused(gateway.stub("not-a-token").SendReading(reading), Code.UNAUTHENTICATED)
    details = await refused(gateway.stub(other).SendReading(reading), Code.PERMISSION_DENIED)
    assert "'meter-b'" in details and "'meter-a'" in details
    assert await gateway.published() == 0

    ok = await gateway.stub(token).SendReading(reading, timeout=10)
    assert ok.reading_id and await gateway.published() == 1

    await gateway.admin().RevokeDevice(gateway_pb2.RevokeDeviceRequest(device_id="meter-a"))
    details = await refused(
        gateway.stub(token).SendReading(request("meter-a", 1)), Code.UNAUTHENTICATED
    )
    assert "revoked" in details
    assert await gateway.published() == 1

    # The token of a stream's caller must match every reading's device.
    stream = [request("meter-b", 2), request("meter-a", 3)]
    details = await refused(
        gateway.stub(other).SendReadings(iter(stream), timeout=10), Code.PERMISSION_DENIED
    )
    assert "0 readings of this stream were accepted" in details
    assert await gateway.published() == 1

    # Reads: only the device's own data; account bills only with the admin token.
    read = billing_pb2.GetLatestReadingRequest(device_id="meter-a")
    await refused(gateway.stub(other).GetLatestReading(read), Code.PERMISSION_DENIED)
    account = billing_pb2.GetAccountBillRequest(account_id="acme", period="2026-10")
    await refused(gateway.stub(other).GetAccountBill(account), Code.PERMISSION_DENIED)
    bills = billing_pb2.ListBillsRequest(account_id="acme")
    await refused(gateway.stub(other).ListBills(bills), Code.PERMISSION_DENIED)

    # The gateway did log these calls (else the check below would pass on nothing).
    assert any(r.name.startswith("api_gateway") for r in caplog.records)
    for secret in (token, other, wrong, ADMIN_TOKEN):
        assert not [
            r for r in caplog.records if secret in r.getMessage() or secret in str(r.__dict__)
        ]


async def test_device_administration(gateway: Gateway) -> None:
    token = await gateway.register("meter-c")
    assert token.startswith("et1.")
    await refused(
        gateway.admin().RegisterDevice(gateway_pb2.RegisterDeviceRequest(device_id="meter-c")),
        Code.ALREADY_EXISTS,
    )
    await refused(
        gateway.admin(token).RegisterDevice(gateway_pb2.RegisterDeviceRequest(device_id="x-1")),
        Code.PERMISSION_DENIED,
    )
    await refused(
        gateway.admin(None).RevokeDevice(gateway_pb2.RevokeDeviceRequest(device_id="meter-c")),
        Code.UNAUTHENTICATED,
    )
    await refused(
        gateway.admin().RotateDeviceToken(gateway_pb2.RotateDeviceTokenRequest(device_id="nope")),
        Code.NOT_FOUND,
    )
    await refused(
        gateway.admin().RegisterDevice(gateway_pb2.RegisterDeviceRequest(device_id="bad id")),
        Code.INVALID_ARGUMENT,
    )
    rotated = await gateway.admin().RotateDeviceToken(
        gateway_pb2.RotateDeviceTokenRequest(device_id="meter-c")
    )
    assert rotated.token != token
    await refused(gateway.stub(token).SendReading(request("meter-c")), Code.UNAUTHENTICATED)
    await gateway.stub(rotated.token).SendReading(request("meter-c"), timeout=10)
    assert await gateway.published() == 1


async def test_over_the_device_rate_is_resource_exhausted_with_the_wait(
    prefix: str, ingestion: IngestionApp, redis_client: aioredis.Redis
) -> None:
    interval_s = 100  # a token every 100 s: nothing refills while the test runs
    app = await start_gateway(
        prefix, ingestion.port, device_rate_per_s=1 / interval_s, device_burst=3, batch_size=3
    )
    gateway = Gateway(prefix, app.port, app)
    try:
        token = await gateway.register("meter-d")
        stub = gateway.stub(token)
        for minute in range(3):
            await stub.SendReading(request("meter-d", minute), timeout=10)
        call = stub.SendReading(request("meter-d", 3), timeout=10)
        details = await refused(call, Code.RESOURCE_EXHAUSTED)
        assert "device 'meter-d' may send 0.01 readings/s (burst 3); retry in" in details
        trailers = dict(await call.trailing_metadata())
        assert 0 < int(trailers["grpc-retry-pushback-ms"]) <= interval_s * 1000
        assert len(trailers["x-request-id"]) == 32  # the echoed id stays beside the hint
        assert await gateway.published() == 3
        # A token interval later (the bucket's clock moved back by one interval): one more.
        key = f"{prefix}ratelimit:device:meter-d"
        updated_us = float(await redis_client.hget(key, "updated_us"))
        await redis_client.hset(key, "updated_us", f"{updated_us - interval_s * 1e6:.17g}")
        await stub.SendReading(request("meter-d", 3), timeout=10)
        # A stream counts every reading: three more need three tokens; the bucket is empty.
        stream = [request("meter-d", 10 + i) for i in range(3)]
        details = await refused(
            stub.SendReadings(iter(stream), timeout=10), Code.RESOURCE_EXHAUSTED
        )
        assert "0 readings of this stream were accepted" in details
        assert await gateway.published() == 4
    finally:
        await app.stop()


async def test_stream_length_and_concurrent_calls_are_bounded(
    prefix: str, ingestion: IngestionApp
) -> None:
    app = await start_gateway(prefix, ingestion.port, max_stream_readings=5, max_concurrent_rpcs=1)
    gateway = Gateway(prefix, app.port, app)
    try:
        stub = gateway.stub(ADMIN_TOKEN)
        details = await refused(
            stub.SendReadings(iter([request("m", i) for i in range(6)]), timeout=10),
            Code.RESOURCE_EXHAUSTED,
        )
        assert "at most 5 readings" in details
        held = asyncio.Event()

        async def slow_stream():  # type: ignore[no-untyped-def]
            yield request("m", 50, kwh=-1)  # rejected: the gateway counts it when it reads it
            await held.wait()
            yield request("m", 51)

        rejected_before = _rejected_usage()
        first = stub.SendReadings(slow_stream(), timeout=10)

        async def first_in_progress() -> bool:
            return _rejected_usage() > rejected_before

        await wait_until(first_in_progress, what="the gateway to read the first stream")
        await refused(stub.SendReading(request("m", 55), timeout=10), Code.RESOURCE_EXHAUSTED)
        held.set()
        answer = await first
        assert (answer.accepted, answer.rejected_count) == (1, 1)
    finally:
        await app.stop()


def _rejected_usage() -> float:
    labels = {"field": "usage_kwh"}
    return REGISTRY.get_sample_value("gateway_readings_rejected_total", labels) or 0.0


async def test_two_gateway_processes_share_the_global_rate(
    prefix: str, ingestion: IngestionApp
) -> None:
    """Two gateway processes, one global bucket: together they accept its burst, exactly.

    The bucket refills too slowly to add a token during the test, so the count does not
    depend on how fast this machine is; separate buckets would accept twice the burst.
    """
    burst, rounds = 20, 4
    ports = [free_port(), free_port()]
    env = {
        **os.environ,
        "GATEWAY_INGESTION_ADDR": f"127.0.0.1:{ingestion.port}",
        "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
        "GATEWAY_GLOBAL_RATE_PER_S": "0.01",
        "GATEWAY_GLOBAL_BURST": str(burst),
        "GATEWAY_BATCH_SIZE": "10",
        "REDIS_URL": REDIS_URL,
        "REDIS_KEY_PREFIX": prefix,
        "MONGODB_URL": MONGODB_URL,
        "MONGODB_DATABASE": prefix.strip("-"),  # never the default `energy` of make dev
        "RABBITMQ_URL": RABBITMQ_URL,
    }
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "api_gateway",
            env={**env, "GATEWAY_PORT": str(port), "GATEWAY_METRICS_PORT": str(free_port())},
        )
        for port in ports
    ]
    try:
        channels = [gateway_channel(f"127.0.0.1:{port}", ADMIN_TOKEN) for port in ports]
        stubs = [gateway_pb2_grpc.GatewayStub(channel) for channel in channels]
        for channel in channels:
            await wait_until(_serving(channel), what="a gateway process to start")
        # The health probes took no tokens; the bucket starts full.
        accepted = refused_count = 0
        minute = 1000
        for _ in range(rounds):  # both gateways at once, 2 x 5 calls a round
            calls = []
            for stub in stubs:
                for _ in range(5):
                    minute += 1
                    reading = request(f"dev-{minute % 7}", -minute)
                    calls.append(stub.SendReading(reading, timeout=10))
            for outcome in await asyncio.gather(*calls, return_exceptions=True):
                if isinstance(outcome, grpc.aio.AioRpcError):
                    assert outcome.code() == Code.RESOURCE_EXHAUSTED, outcome.details()
                    refused_count += 1
                else:
                    accepted += 1
        assert (accepted, refused_count) == (burst, rounds * 10 - burst)
        assert len(await drain_reading_ids(Topology(prefix).billing_queue)) == accepted
    finally:
        for process in processes:
            process.terminate()
            await process.wait()


def _serving(channel: grpc.aio.Channel):  # type: ignore[no-untyped-def]
    async def check() -> bool:
        try:
            answer = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1
            )
        except grpc.aio.AioRpcError:
            return False
        return answer.status == health_pb2.HealthCheckResponse.SERVING

    return check


async def test_the_queue_holds_only_what_was_answered_ok(gateway: Gateway) -> None:
    token = await gateway.register("meter-e")
    ok = await gateway.stub(token).SendReading(request("meter-e"), timeout=10)
    await refused(gateway.stub(token).SendReading(request("meter-f")), Code.PERMISSION_DENIED)
    assert await drain_reading_ids(Topology(gateway.prefix).billing_queue) == [ok.reading_id]


async def test_a_credential_stored_before_tokens_had_kinds_is_a_device_token(
    gateway: Gateway,
) -> None:
    """Documents written before account tokens have no ``kind``: they stay device tokens."""
    key_id, secret = "00112233aabbccdd", "legacy-secret-of-a-device"
    mongo = AsyncMongoClient(MONGODB_URL, serverSelectionTimeoutMS=5000)
    try:
        await mongo[gateway.prefix.strip("-")]["device_credentials"].insert_one(
            {
                "_id": "meter-old",
                "device_id": "meter-old",
                "key_id": key_id,
                "secret_sha256": hashlib.sha256(secret.encode()).hexdigest(),
                "revoked_at": None,
            }
        )
    finally:
        await mongo.close()
    stub = gateway.stub(f"et1.{key_id}.{secret}")
    await stub.SendReading(request("meter-old"), timeout=10)
    await refused(stub.SendReading(request("meter-new")), Code.PERMISSION_DENIED)
    assert await gateway.published() == 1
