"""gRPC client of ingestion_service: one long-lived channel, a deadline on every call."""

from __future__ import annotations

import grpc

from common.convert import reading_to_proto
from common.energy.v1 import ingestion_pb2, ingestion_pb2_grpc
from common.metrics import ClientMetricsInterceptor
from common.models import Reading


class IngestionClient:
    """Forwards validated readings; raises grpc.aio.AioRpcError on failure."""

    def __init__(self, address: str, timeout_s: float) -> None:
        self._channel = grpc.aio.insecure_channel(
            address, interceptors=[ClientMetricsInterceptor()]
        )
        self._stub = ingestion_pb2_grpc.IngestionStub(self._channel)
        self._timeout_s = timeout_s

    async def publish(self, readings: list[Reading]) -> None:
        request = ingestion_pb2.PublishRequest(readings=[reading_to_proto(r) for r in readings])
        await self._stub.Publish(request, timeout=self._timeout_s)

    async def close(self) -> None:
        await self._channel.close()
