"""Ingestion loses RabbitMQ and gets it back: UNAVAILABLE meanwhile, then OK again by itself.

The test cuts a TCP proxy it runs between ingestion and the real broker, so the shared
broker stays up for everything else.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
import pytest

from common.convert import reading_to_proto
from common.energy.v1 import ingestion_pb2, ingestion_pb2_grpc
from common.models import validate_reading
from common.rabbit import Topology
from ingestion_service.app import IngestionApp
from ingestion_service.settings import IngestionSettings
from tests.conftest import RABBITMQ_URL, delete_topology, ready_count, wait_until
from tests.tcp_proxy import TcpProxy


def publish_request(minute: int) -> ingestion_pb2.PublishRequest:
    now = datetime.now(UTC)
    reading = validate_reading("meter-1", now - timedelta(minutes=minute), 1.0, now=now)
    return ingestion_pb2.PublishRequest(readings=[reading_to_proto(reading)])


async def test_ingestion_reconnects_by_itself_when_the_broker_returns(prefix: str) -> None:
    proxy = TcpProxy.to_url(RABBITMQ_URL)
    await proxy.start()
    app = IngestionApp(
        IngestionSettings(
            port=0,
            topology_prefix=prefix,
            rabbitmq_url=proxy.url(RABBITMQ_URL),
            confirm_timeout_s=2,
        )
    )
    await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = ingestion_pb2_grpc.IngestionStub(channel)
            await wait_until(_connected(app), what="first connection")
            assert (await stub.Publish(publish_request(1), timeout=5)).published == 1

            await proxy.cut()
            await wait_until(_disconnected(app), what="the loss to be noticed")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Publish(publish_request(2), timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

            await proxy.start()  # the broker is back, on the same address
            await wait_until(_connected(app), timeout_s=60, what="the reconnection")
            assert (await stub.Publish(publish_request(3), timeout=5)).published == 1
        assert await ready_count(Topology(prefix).billing_queue) == 2
    finally:
        await app.stop()
        await proxy.cut()
        await delete_topology(prefix)


def _connected(app: IngestionApp):  # type: ignore[no-untyped-def]
    async def check() -> bool:
        return app.publisher.connected

    return check


def _disconnected(app: IngestionApp):  # type: ignore[no-untyped-def]
    async def check() -> bool:
        return not app.publisher.connected

    return check
