"""gRPC client of billing_service's read side: one long-lived channel, a deadline per call."""

from __future__ import annotations

from typing import Any

from common.energy.v1 import billing_pb2_grpc
from common.interceptors import request_id_client_interceptors
from common.metrics import ClientMetricsInterceptor
from common.tls import InternalClientTlsSettings, client_channel


class BillingClient:
    """Calls an ``energy.v1.Billing`` RPC by name; raises grpc.aio.AioRpcError on failure."""

    def __init__(
        self, address: str, timeout_s: float, tls: InternalClientTlsSettings | None = None
    ) -> None:
        self._channel = client_channel(
            address, tls, [*request_id_client_interceptors(), ClientMetricsInterceptor()]
        )
        self._stub = billing_pb2_grpc.BillingStub(self._channel)
        self._timeout_s = timeout_s

    async def call(self, method: str, request: Any) -> Any:
        return await getattr(self._stub, method)(request, timeout=self._timeout_s)

    async def close(self) -> None:
        await self._channel.close()
