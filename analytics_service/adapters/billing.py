"""billing_service's gRPC API as analytics calls it: one long-lived channel, a deadline on
every call, gRPC errors turned into ``BillingCallFailed`` naming the RPC and status."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

import grpc

from common.energy.v1 import billing_pb2, billing_pb2_grpc
from common.metrics import ClientMetricsInterceptor
from common.tls import InternalClientTlsSettings, client_channel

MAX_RECONNECT_BACKOFF_MS = 10_000


class BillingCallFailed(Exception):
    """A call to billing failed; ``code`` (a gRPC status name) is the kind of failure."""

    def __init__(self, rpc: str, code: str, details: str) -> None:
        super().__init__(f"{rpc}: {code}: {details}")
        self.rpc = rpc
        self.code = code


@dataclass(frozen=True)
class CatalogIds:
    """The ids the tariff catalog lists, and when ``make seed`` stored that catalog."""

    loaded_at: datetime
    device_ids: frozenset[str]
    account_ids: tuple[str, ...]


class BillingClient:
    """The RPCs of ``energy.v1.Billing`` that analytics needs."""

    def __init__(
        self, address: str, timeout_s: float, tls: InternalClientTlsSettings | None = None
    ) -> None:
        # gRPC waits up to 120 s between reconnects by default: billing back after a long
        # outage would go unnoticed that long; 10 s matches the retries of billing_sync.
        options = [("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS)]
        self._channel = client_channel(address, tls, [ClientMetricsInterceptor()], options)
        self._stub = billing_pb2_grpc.BillingStub(self._channel)
        self._timeout_s = timeout_s

    async def account_total(self, account_id: str) -> tuple[str, Decimal] | None:
        """The account's month-to-date total and its currency; None if it has no devices."""
        request = billing_pb2.GetAccountBillRequest(account_id=account_id)
        try:
            bill = await self._stub.GetAccountBill(request, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return None  # an account without devices has no bill
            raise _failed("GetAccountBill", error) from error
        return bill.currency, Decimal(bill.total)

    async def catalog_ids(self, known_loaded_at: datetime | None) -> CatalogIds | None:
        """The catalog's ids; None when billing holds the catalog of ``known_loaded_at``."""
        request = billing_pb2.StreamCatalogIdsRequest()
        if known_loaded_at is not None:
            request.known_loaded_at.FromDatetime(known_loaded_at)
        devices: list[str] = []
        accounts: list[str] = []
        loaded_at, unchanged = None, False
        try:
            # The deadline covers the whole stream: every chunk, not each one. The stream is
            # read to its end, so the call ends with its status.
            async for chunk in self._stub.StreamCatalogIds(request, timeout=self._timeout_s):
                unchanged = unchanged or chunk.unchanged
                loaded_at = chunk.loaded_at.ToDatetime(tzinfo=UTC)
                devices.extend(chunk.device_ids)
                accounts.extend(chunk.account_ids)
        except grpc.aio.AioRpcError as error:
            raise _failed("StreamCatalogIds", error) from error
        if unchanged:
            return None
        if loaded_at is None:
            raise BillingCallFailed("StreamCatalogIds", "EMPTY_STREAM", "billing sent no chunk")
        return CatalogIds(loaded_at, frozenset(devices), tuple(accounts))

    async def latest_timestamps(self) -> dict[str, datetime]:
        """The timestamp of each device's latest reading, as billing has cached them."""
        latest: dict[str, datetime] = {}
        request = billing_pb2.StreamLatestTimestampsRequest()
        try:
            async for chunk in self._stub.StreamLatestTimestamps(request, timeout=self._timeout_s):
                for device in chunk.devices:
                    latest[device.device_id] = device.timestamp.ToDatetime(tzinfo=UTC)
        except grpc.aio.AioRpcError as error:
            raise _failed("StreamLatestTimestamps", error) from error
        return latest

    async def close(self) -> None:
        await self._channel.close()


def _failed(rpc: str, error: grpc.aio.AioRpcError) -> BillingCallFailed:
    return BillingCallFailed(rpc, error.code().name, error.details() or "")
