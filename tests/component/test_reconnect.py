"""Ingestion loses RabbitMQ and gets it back: UNAVAILABLE meanwhile, then OK again by itself.

The test cuts a TCP proxy it runs between ingestion and the real broker, so the shared
broker stays up for everything else.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import grpc
import pytest

from common.convert import reading_to_proto
from common.energy.v1 import ingestion_pb2, ingestion_pb2_grpc
from common.models import validate_reading
from common.rabbit import Topology
from ingestion_service.app import IngestionApp
from ingestion_service.settings import IngestionSettings
from tests.conftest import RABBITMQ_URL, delete_topology, ready_count, wait_until


class TcpProxy:
    """Forwards a local port to a target; ``cut`` drops every connection and stops listening."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()

    def hold(self) -> None:
        """Stop forwarding: callers time out; what they send is kept until ``cut`` drops it."""
        self._flowing.clear()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self._server is not None
        self._flowing.set()  # the held data goes nowhere: its connections close below
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        # Not wait_closed(): in Python 3.11 it waits for every accepted connection, and
        # one still opening its upstream side is not in _writers yet.

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                await self._flowing.wait()
                if writer.is_closing():
                    break
                writer.write(data)
                await writer.drain()
        writer.close()
        self._writers.discard(writer)


def through(proxy: TcpProxy) -> str:
    parts = urlsplit(RABBITMQ_URL)
    netloc = f"{parts.username}:{parts.password}@127.0.0.1:{proxy.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def publish_request(minute: int) -> ingestion_pb2.PublishRequest:
    now = datetime.now(UTC)
    reading = validate_reading("meter-1", now - timedelta(minutes=minute), 1.0, now=now)
    return ingestion_pb2.PublishRequest(readings=[reading_to_proto(reading)])


async def test_ingestion_reconnects_by_itself_when_the_broker_returns(prefix: str) -> None:
    target = urlsplit(RABBITMQ_URL)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 5672)
    await proxy.start()
    app = IngestionApp(
        IngestionSettings(
            port=0, topology_prefix=prefix, rabbitmq_url=through(proxy), confirm_timeout_s=2
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
