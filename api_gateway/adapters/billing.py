"""gRPC client of billing_service's read side: one long-lived channel, a deadline per call."""

from __future__ import annotations

from typing import Any

import grpc

from common.energy.v1 import billing_pb2_grpc
from common.metrics import ClientMetricsInterceptor


class BillingClient:
    """Calls an ``energy.v1.Billing`` RPC by name; raises grpc.aio.AioRpcError on failure."""

    def __init__(self, address: str, timeout_s: float) -> None:
        self._channel = grpc.aio.insecure_channel(
            address, interceptors=[ClientMetricsInterceptor()]
        )
        self._stub = billing_pb2_grpc.BillingStub(self._channel)
        self._timeout_s = timeout_s

    async def call(self, method: str, request: Any) -> Any:
        return await getattr(self._stub, method)(request, timeout=self._timeout_s)

    async def close(self) -> None:
        await self._channel.close()
