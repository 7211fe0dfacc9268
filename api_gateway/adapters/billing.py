"""gRPC client of billing_service's read side: one long-lived channel, a deadline per call;
and the catalog's device → account answers account tokens need, cached briefly."""

from __future__ import annotations

from typing import Any

from cachetools import TTLCache

from common.energy.v1 import billing_pb2, billing_pb2_grpc
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


class DeviceAccounts:
    """Which account billing's catalog bills a device to, asked of billing and cached.

    Account tokens read the devices of their account; the gateway holds no catalog, so it
    asks billing (``GetDeviceAccount``) and keeps each answer for ``cache_ttl_s``, at most
    ``max_devices`` of them. A device moved to another account in the catalog stays
    readable by its former account's token for up to ``cache_ttl_s`` on each gateway.
    """

    def __init__(
        self, billing: BillingClient, cache_ttl_s: float, max_devices: int = 100_000
    ) -> None:
        self._billing = billing
        self._cache: TTLCache[str, str] = TTLCache(maxsize=max_devices, ttl=cache_ttl_s)

    async def account_of(self, device_id: str) -> str:
        """The device's account, empty when the catalog does not list it; raises
        grpc.aio.AioRpcError when billing does not answer (or refuses the id)."""
        if device_id in self._cache:
            return self._cache[device_id]
        answer = await self._billing.call(
            "GetDeviceAccount", billing_pb2.GetDeviceAccountRequest(device_id=device_id)
        )
        self._cache[device_id] = answer.account_id
        return str(answer.account_id)
