"""gRPC client of ingestion_service: one long-lived channel, a deadline on every call."""

from __future__ import annotations

from collections.abc import Sequence

from common.energy.v1 import ingestion_pb2, ingestion_pb2_grpc, reading_pb2
from common.interceptors import request_id_client_interceptors
from common.metrics import ClientMetricsInterceptor
from common.tls import InternalClientTlsSettings, client_channel


class IngestionClient:
    """Forwards validated readings (protos with their reading ids); raises
    grpc.aio.AioRpcError on failure."""

    def __init__(
        self, address: str, timeout_s: float, tls: InternalClientTlsSettings | None = None
    ) -> None:
        self._channel = client_channel(
            address, tls, [*request_id_client_interceptors(), ClientMetricsInterceptor()]
        )
        self._stub = ingestion_pb2_grpc.IngestionStub(self._channel)
        self._timeout_s = timeout_s

    async def publish(self, readings: Sequence[reading_pb2.Reading]) -> None:
        request = ingestion_pb2.PublishRequest(readings=readings)
        await self._stub.Publish(request, timeout=self._timeout_s)

    async def close(self) -> None:
        await self._channel.close()
