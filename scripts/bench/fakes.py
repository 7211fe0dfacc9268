"""Fakes the benches and tests put behind a real gateway: an ingestion that only counts,
and an in-process gateway forwarding to it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc

from api_gateway.app import GatewayApp
from api_gateway.settings import GatewaySettings
from common.energy.v1 import ingestion_pb2, ingestion_pb2_grpc


class CountingIngestion(ingestion_pb2_grpc.IngestionServicer):
    """A fake energy.v1.Ingestion that confirms every reading at once and only counts them."""

    def __init__(self) -> None:
        self.published = 0

    async def Publish(
        self, request: ingestion_pb2.PublishRequest, context: grpc.aio.ServicerContext
    ) -> ingestion_pb2.PublishResponse:
        self.published += len(request.readings)
        return ingestion_pb2.PublishResponse(published=len(request.readings))


@asynccontextmanager
async def fake_gateway(fake: ingestion_pb2_grpc.IngestionServicer) -> AsyncIterator[str]:
    """A real GatewayApp on a free port, forwarding to ``fake``; yields its target."""
    server = grpc.aio.server()
    ingestion_pb2_grpc.add_IngestionServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    # Auth and rate limits off: this measures the importer and the gateway's own work.
    settings = GatewaySettings(
        port=0,
        http_port=0,
        ingestion_addr=f"127.0.0.1:{port}",
        auth_enabled=False,
        device_rate_per_s=0,
        global_rate_per_s=0,
    )
    gateway = GatewayApp(settings)
    await gateway.start()
    try:
        yield f"127.0.0.1:{gateway.port}"
    finally:
        await gateway.stop()
        await server.stop(None)
